"""The HTTP server: the route table (its handlers, the API key and errors as JSON are in app.serve.routes), loading
the model while /health says 503, and uvicorn.

The socket is bound before anything else (a port in use is a one-line error, and port 0 picks a free one for
tests), then uvicorn serves while the model loads in a thread: clients polling /health see 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from malhae.errors import UserError
from malhae.runtime.settings import LoadOptions

LOOPBACK_NAMES = ("localhost",)


def missing_extra() -> str | None:
    """None when the web stack is installed, else the one line saying how to install it."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        return f"`malhae serve` needs the server extra ({e.name} is missing): pip install 'malhae[serve]'"
    return None


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Options:
    """How to serve: the models as `load` says (its parallel: each model's slots), which models, and the HTTP side.

    `model_id` set: that model only (`load.model`, loaded at start, never unloaded: `malhae serve -m`); None: the
    whole store by name (`names`: app.store.served), loaded on demand (app.serve.residency)."""

    load: LoadOptions
    model_id: str | None = None
    names: object = None  # what names are served (app.store.served; None: `load.model` as model_id, as given)
    max_loaded: int = 3  # models in memory at once (Ollama's OLLAMA_MAX_LOADED_MODELS default for a CPU)
    max_memory: int | None = None  # bytes of RAM the models may take in all (None: RAM_SHARE of this machine's)
    keep_alive: float | None = 300.0  # seconds an idle model stays (None: for ever)
    host: str = "127.0.0.1"
    port: int = 8080
    queue: int = 64
    template: str | None = None
    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()  # Host names answered besides this machine's own (app.serve.guard)
    access_log: bool = False  # a line per request on stderr (`malhae serve` turns it on; --quiet off)
    notify: Callable[[str], None] = field(default=lambda message: None)


RAM_SHARE = 0.8  # of physical memory, the default --max-memory: the rest is the system's and other programs'


class State:
    """What the routes read: the names served and the models in memory (None until the server is built), the -m
    model's Service once loaded, or why loading it failed."""

    def __init__(self) -> None:
        self.names = None  # app.serve.names.Names
        self.pool = None  # app.serve.residency.Pool
        self.service = None  # the -m model's (None in store mode, and while it loads)
        self.error: str | None = None
        self.ready = threading.Event()
        self.pulling = False  # a POST /api/pull is running (one at a time: app.serve.store_api)


def build_app(state: State, api_key: str | None, allow_origins: tuple[str, ...] = (), *, bound: str = "127.0.0.1",
              allow_hosts: tuple[str, ...] = (), access_log: bool = False):
    """The Starlette application: the route table (the handlers and the rules every route shares are in
    app.serve.routes, which imports Starlette and so is imported only here), CORS, and around them the Host and
    Origin guard (app.serve.guard) and the access log.

    `allow_origins`: web pages (scheme://host:port, or "*") whose scripts may call the server from a browser (CORS).
    None by default: a page on any site could otherwise drive the local model through the user's browser. `bound`:
    the address listened on, and `allow_hosts` more names, for the Host check."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Route

    from malhae.serve import adapters, ollama_api, openai_api, routes, store_api
    from malhae.serve.access_log import AccessLog
    from malhae.serve.guard import Guard, Hosts
    from malhae.serve.routes import route

    table = [
        route("/health", routes.health, needs_model=False),
        route("/v1/models", routes.models, needs_model=False),
        route("/v1/models/{model_id:path}", routes.model, needs_model=False),
        route("/v1/completions", openai_api.completions, ("POST",)),
        route("/v1/chat/completions", openai_api.chat, ("POST",)),
        route("/tokenize", routes.tokenize, ("POST",)),
        route("/detokenize", routes.detokenize, ("POST",)),
        route("/tokenizer_info", routes.tokenizer_info),
        route("/lora-adapters", adapters.get),  # llama-server's: the default model's (or ?model=)
        route("/lora-adapters", adapters.post, ("POST",), reads_body=False),
        Route("/", routes.root, methods=["GET", "HEAD"]),
        route("/api/version", routes.version, needs_model=False, ollama=True),
        route("/api/show", routes.show, ("POST",), needs_model=False, ollama=True),
        route("/api/ps", routes.ps, needs_model=False, ollama=True),
        route("/api/tags", routes.tags, needs_model=False, ollama=True),
        route("/api/generate", ollama_api.generate, ("POST",), ollama=True),
        route("/api/pull", store_api.pull, ("POST",), needs_model=False, ollama=True),
        route("/api/delete", store_api.delete, ("DELETE",), needs_model=False, ollama=True),
        route("/api/chat", ollama_api.chat, ("POST",), ollama=True),
    ]
    # outermost first: the log sees every request, refused ones too; the guard runs before CORS and the API key
    middleware = [Middleware(AccessLog)] if access_log else []
    middleware.append(Middleware(Guard, hosts=Hosts(bound, allow_hosts), origins=allow_origins))
    if allow_origins:
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=table, middleware=middleware,
                    exception_handlers={404: routes.not_found, 405: routes.bad_method})
    routes.install(app, state, api_key)
    return app


def make_uvicorn(config):
    """A uvicorn server that ends the answers in progress itself when it stops: plain uvicorn waits out its graceful
    timeout, then cancels the streams and logs each one as an exception with a traceback."""
    import uvicorn

    from malhae.serve.jobs import Dispatcher

    class Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            Dispatcher.of(asyncio.get_running_loop()).stop_all()
            await super().shutdown(sockets)

    return Uvicorn(config)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or a one-line UserError (port in use, no such address, not allowed)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"cannot serve on host {host!r}: {e.strerror}; use an address such as 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    # getaddrinfo's protocol (TCP), not 0: asyncio turns Nagle's algorithm off only on sockets that say TCP, and with
    # it on every answer on a kept-alive connection waited ~40 ms for the client's delayed ACK (lm-eval reuses them)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        hint = "choose another with --port" if e.errno in (98, 48) else "check --host and --port"
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; {hint}") from None
    sock.set_inheritable(False)
    return sock


class Server:
    """A running server: bound at once, serving in a thread (start) or in the calling thread (serve_forever)."""

    def __init__(self, options: Options) -> None:
        import uvicorn

        self.options = options
        self.state = State()
        self.sock = bind(options.host, options.port)
        self._make_pool()
        self.port = self.sock.getsockname()[1]
        app = build_app(self.state, options.api_key, options.allow_origins, bound=options.host,
                        allow_hosts=options.allow_hosts, access_log=options.access_log)
        # uvicorn's own access log is off: app.serve.access_log writes one that escapes what clients sent
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3)
        self.uvicorn = make_uvicorn(config)
        self._thread: threading.Thread | None = None
        self._loader = threading.Thread(target=self._load, name="malhae-load", daemon=True)

    @property
    def url(self) -> str:
        host = self.options.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    def _make_pool(self) -> None:
        from malhae.runtime import hardware
        from malhae.runtime.target import Pinned, Target
        from malhae.serve.residency import Pool
        from malhae.serve.service import Service

        o = self.options

        def load(target, start=None):
            return Service.load(target.options, model_id=target.key, queue=o.queue, template=target.template,
                                notify=o.notify, start=start)

        budget = o.max_memory if o.max_memory is not None else int(hardware.total_ram() * RAM_SHARE)
        self.state.names = o.names or Pinned(Target(o.model_id, o.model_id, o.load, template=o.template), o.load)
        self.state.pool = Pool(loader=load, max_loaded=o.max_loaded, max_memory=budget, keep_alive=o.keep_alive,
                               queue=o.queue, notify=o.notify)

    def _load(self) -> None:
        """Load the -m model (store mode loads nothing at start)."""
        o = self.options
        try:
            if o.model_id is not None:
                self.state.service = self.state.pool.load_now(self.state.names.resolve(None))
        except Exception as e:  # UserError or a bug: the server cannot serve, so it stops
            self.state.error = str(e) if isinstance(e, UserError) else f"internal error ({type(e).__name__}: {e})"
            self.uvicorn.should_exit = True
        finally:
            self.state.ready.set()

    def start(self) -> Server:
        """Serve in a background thread (tests, embedding); returns once the model is loaded."""
        self._loader.start()
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self._thread.start()
        self.state.ready.wait()
        if self.state.error:
            self.stop()
            raise UserError(self.state.error)
        return self

    def serve_forever(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve in this thread until Ctrl-C or SIGTERM (uvicorn's own handlers); a model that fails to load
        ends it with that error."""
        def announce() -> None:
            self.state.ready.wait()
            if on_ready is not None and not self.state.error:
                on_ready()

        self._loader.start()
        threading.Thread(target=announce, daemon=True).start()
        try:
            self.uvicorn.run(sockets=[self.sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C or SIGTERM it stopped for: that is a normal stop
            pass
        finally:
            self.state.ready.wait()
            self.close()
        if self.state.error:
            raise UserError(self.state.error)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.close()

    def close(self) -> None:
        self.state.service = None
        if self.state.pool is not None:
            self.state.pool.close()
        self.sock.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
