"""`malhae serve`: an OpenAI- and Ollama-compatible HTTP server on a local model (app/serve)."""

from __future__ import annotations

import re
from dataclasses import replace

import typer

from malhae.cli import options as o
from malhae.errors import UserError
from malhae.serve import guard

MAX_PARALLEL = 64
MAX_QUEUE = 4096
MAX_LOADED = 64


@o.load_flags()
def serve(
    load: dict[str, object],
    model: o.LocalModelOption = None,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 reaches every network "
                             "(set --api-key then)."),
    port: int = typer.Option(8080, "--port", help="TCP port (0: any free one)."),
    parallel: int = typer.Option(4, "--parallel", "-np", help="Requests generated at once (slots); each has its own "
                                 "--ctx of KV cache."),
    queue: int = typer.Option(64, "--queue", help="Requests that may wait for a slot; more get 503 (Retry-After)."),
    template: o.Template = None,
    api_key: str | None = typer.Option(None, "--api-key", envvar="MALHAE_API_KEY", show_envvar=True,
                                       help="Require `Authorization: Bearer KEY` on every endpoint but /health."),
    allow_origin: list[str] = typer.Option([], "--allow-origin", metavar="ORIGIN", help="A web page origin "
                                           "(http://host:port, or *) whose scripts may call the server from a "
                                           "browser (CORS); repeatable."),
    allow_host: list[str] = typer.Option([], "--allow-host", metavar="NAME",
                                         help="A name clients reach the server by, besides localhost, its address and "
                                         "this machine's name (requests naming another Host are refused: DNS "
                                         "rebinding); repeatable, * for any."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No access log (a line per request on stderr)."),
    keep_alive: str | None = typer.Option(None, "--keep-alive", metavar="DURATION", help="How long a model stays "
                                          "loaded after its last request: 5m, 1h, 30s, 0 (unload at once), -1 (keep) "
                                          "(default: config.toml's keep_alive, else 5m). Requests may say their own."),
    max_loaded: int = typer.Option(3, "--max-loaded", help="Models in memory at once; loading one more unloads the "
                                   "least recently used idle one."),
    max_memory: float | None = typer.Option(None, "--max-memory", metavar="GIB", help="RAM the loaded models may "
                                            "take in all, in GiB (default: 80% of this machine's); the least recently "
                                            "used idle models make room."),
) -> None:
    """Serve your models over HTTP (OpenAI and Ollama APIs) for other programs: editors, Open WebUI, lm-eval,
    scripts. Without -m every model in `malhae models` is served by name, loaded on demand and unloaded when idle;
    with -m that model only, loaded at start."""
    from malhae import ui, units
    from malhae.runtime import kv, templates
    from malhae.runtime.engine import check_model_file
    from malhae.serve import server
    from malhae.store import models, served

    missing = server.missing_extra()
    if missing:
        raise UserError(missing)
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: a port is a whole number from 0 to 65535, e.g. --port 8080")
    if not 1 <= parallel <= MAX_PARALLEL:
        raise UserError(f"--parallel {parallel}: give 1 to {MAX_PARALLEL} slots, e.g. --parallel 4")
    if not 0 <= queue <= MAX_QUEUE:
        raise UserError(f"--queue {queue}: give 0 to {MAX_QUEUE} waiting requests, e.g. --queue 64")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty; give a key (or leave it out to serve without one)")
    if template:
        templates.get(template)
    for origin in allow_origin:
        if origin != "*" and not guard.is_origin(origin):
            raise UserError(f"--allow-origin {origin!r}: give a page's origin as scheme://host[:port] (no path), "
                            "e.g. --allow-origin http://localhost:3000, or * for any page")
    for name in allow_host:
        if name != "*" and not re.fullmatch(r"[A-Za-z0-9_.-]+|\[?[0-9A-Fa-f:.]+\]?", name):
            raise UserError(f"--allow-host {name!r}: give a host name or address without scheme, port or path, "
                            "e.g. --allow-host my-pc.lan, or * for any")
    if not 1 <= max_loaded <= MAX_LOADED:
        raise UserError(f"--max-loaded {max_loaded}: give 1 to {MAX_LOADED} models, e.g. --max-loaded 3")
    memory = units.gib_bytes("--max-memory", max_memory) if max_memory is not None else None
    loaded, _ = o.settings_for("serve", **load, parallel=parallel)
    if model is None:  # the whole store, by name
        if load.get("lora"):
            raise UserError("--lora applies to one model: give -m MODEL too, or give a model its adapters with "
                            "`malhae models set NAME lora=ADAPTER` (an adapter's own name is served as well)")
        if loaded.lora:
            ui.note("config.toml's lora is not applied to a server of every model; give a model its adapters with "
                    "`malhae models set NAME lora=ADAPTER`")
        base = replace(loaded, lora=())
        options = server.Options(load=base, model_id=None, names=served.Served(base, template=template),
                                 max_loaded=max_loaded,
                                  max_memory=memory, keep_alive=o.keep_alive(keep_alive), host=host, port=port,
                                  queue=queue, template=template, api_key=api_key,
                                  allow_origins=tuple(allow_origin), allow_hosts=tuple(allow_host),
                                  access_log=not quiet, notify=ui.note)
        where = "the store's models by name, each loaded when first asked for"
    else:
        if keep_alive is not None or max_memory is not None:
            raise UserError("--keep-alive and --max-memory are for a server of every model; with -m the model stays "
                            "loaded (leave out -m to load and unload models by name)")
        path = models.resolve(model, ui.note)
        check_model_file(path)  # a wrong file is one line now, not a server that starts and then stops
        one = replace(loaded, model=path)
        options = server.Options(load=one, model_id=path.stem, names=served.pinned(one, path.stem, template),
                                 host=host, port=port,
                                 queue=queue, template=template, api_key=api_key, allow_origins=tuple(allow_origin),
                                 allow_hosts=tuple(allow_host), access_log=not quiet, notify=ui.note)
        where = f"loading {path.name}"
    srv = server.Server(options)  # binds now: a port in use is an error before anything loads
    if not server.is_loopback(host) and not api_key:
        ui.err.print(f"[bold yellow]malhae: warning:[/] serving on {host} without --api-key: anyone who can reach "
                     "this machine can use the model; set --api-key KEY (or MALHAE_API_KEY)")
    ui.note(f"{where}; serving on {srv.url} (OpenAI: {srv.url}/v1, Ollama: {srv.url}/api)")

    def ready() -> None:
        svc = srv.state.service
        if svc is None:  # the store: nothing loads until asked for
            count = len(srv.state.names.known())
            ui.note(f"ready: {count} model{'s' if count != 1 else ''} (GET /api/tags), each kept "
                    f"{units.duration_text(options.keep_alive)} after its last request, at most {max_loaded} at "
                    "once; Ctrl-C stops")
            return
        adapters = f"; LoRA {', '.join(map(str, svc.loras))} (GET /lora-adapters)" if svc.loras else ""
        ui.note(f"ready: {svc.model_id}, {parallel} slot{'s' if parallel > 1 else ''} of {svc.n_ctx} tokens (KV cache "
                f"{kv.summary(svc.engine.ctx)}){adapters}; Ctrl-C stops")

    srv.serve_forever(ready)
    ui.note("stopped")
