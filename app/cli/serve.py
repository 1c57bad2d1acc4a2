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
) -> None:
    """Serve a model over HTTP (OpenAI and Ollama APIs) for other programs: editors, Open WebUI, lm-eval, scripts."""
    from malhae import ui
    from malhae.runtime import kv, templates
    from malhae.runtime.engine import check_model_file
    from malhae.serve import server
    from malhae.store import models

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
    loaded, _ = o.settings_for("serve", **load, parallel=parallel)
    path = models.resolve(model, ui.note)
    check_model_file(path)  # a wrong file is one line now, not a server that starts and then stops
    options = server.Options(load=replace(loaded, model=path), model_id=path.stem, host=host, port=port, queue=queue,
                             template=template, api_key=api_key, allow_origins=tuple(allow_origin),
                             allow_hosts=tuple(allow_host), access_log=not quiet, notify=ui.note)
    srv = server.Server(options)  # binds now: a port in use is an error before anything loads
    if not server.is_loopback(host) and not api_key:
        ui.err.print(f"[bold yellow]malhae: warning:[/] serving on {host} without --api-key: anyone who can reach "
                     "this machine can use the model; set --api-key KEY (or MALHAE_API_KEY)")
    ui.note(f"loading {path.name}; serving on {srv.url} (OpenAI: {srv.url}/v1, Ollama: {srv.url}/api)")

    def ready() -> None:
        svc = srv.state.service
        adapters = f"; LoRA {', '.join(map(str, svc.loras))} (GET /lora-adapters)" if svc.loras else ""
        ui.note(f"ready: {svc.model_id}, {parallel} slot{'s' if parallel > 1 else ''} of {svc.n_ctx} tokens (KV cache "
                f"{kv.summary(svc.engine.ctx)}){adapters}; Ctrl-C stops")

    srv.serve_forever(ready)
    ui.note("stopped")
