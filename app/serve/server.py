"""The HTTP server: routes, the API key, errors as JSON, loading the model while /health says 503, and uvicorn.

The socket is bound before anything else (a port in use is a one-line error, and port 0 picks a free one for
tests), then uvicorn serves while the model loads in a thread: clients polling /health see 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import UserError

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
    path: Path
    model_id: str
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 4
    queue: int = 64
    n_ctx: int | None = None
    threads: int | None = None
    gpu_layers: str | int | None = "auto"
    device: str | None = None  # --device (None: auto)
    template: str | None = None
    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()
    verbose: bool = False
    notify: Callable[[str], None] = field(default=lambda message: None)
    draft: str | Path | None = None  # speculative decoding while one request generates alone
    draft_max: int | None = None


class State:
    """What the routes read: the Service once loaded (None while loading), or why loading failed."""

    def __init__(self) -> None:
        self.service = None
        self.error: str | None = None
        self.ready = threading.Event()


def build_app(state: State, api_key: str | None, allow_origins: tuple[str, ...] = ()):
    """The Starlette application; every route's ApiError (and any bug) becomes OpenAI's JSON error shape.

    `allow_origins`: web pages (scheme://host:port, or "*") whose scripts may call the server from a browser (CORS).
    None by default: a page on any site could otherwise drive the local model through the user's browser."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from app.serve import fields, ollama_api, openai_api
    from app.serve.errors import ApiError
    from app.serve.fields import Body

    key = api_key.encode() if api_key else None

    def error_response(e: ApiError, ollama: bool) -> Response:
        body = {"error": e.message} if ollama else e.body()
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    def route(path: str, handler, methods: tuple[str, ...] = ("GET",), *, needs_model: bool = True,
              ollama: bool = False) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                if key is not None and path != "/health":
                    given = request.headers.get("authorization", "")
                    token = given[7:].strip() if given[:7].lower() == "bearer " else ""
                    if not hmac.compare_digest(token.encode(), key):
                        raise ApiError("a valid API key is needed: send the header `Authorization: Bearer KEY`"
                                       if not token else "the API key is not valid", 401, code="invalid_api_key")
                svc = state.service
                if needs_model and svc is None:
                    raise ApiError("the model is still loading; retry shortly", 503, code="loading",
                                   kind="server_error", headers={"Retry-After": "2"})
                result = await handler(request, svc) if needs_model else await handler(request)
                return result if isinstance(result, Response) else JSONResponse(result)
            except ApiError as e:
                return error_response(e, ollama)
            except UserError as e:  # a rule of the runtime (an empty prompt, a context too small)
                return error_response(ApiError(str(e)), ollama)
            except Exception as e:  # a bug: the request fails, the server goes on
                traceback.print_exc()
                return error_response(ApiError(f"internal error ({type(e).__name__}: {e})", 500,
                                               kind="server_error"), ollama)

        return Route(path, endpoint, methods=list(methods))

    async def health(request):
        if state.service is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        sched = state.service.scheduler
        return {"status": "ok", "slots_idle": len(sched.slots) - sched.active, "slots_busy": sched.active,
                "waiting": len(sched.waiting)}

    async def models(request, svc):
        return {"object": "list", "data": [_model_card(svc)]}

    async def tokenize(request, svc):
        body = Body(await fields.read_json(request), ("prompt", "content", "add_special_tokens", "model",
                                                      "with_pieces", "parse_special"))
        text = body.get("prompt", (str,)) if "prompt" in body.data else body.get("content", (str,), "")
        special = body.flag("add_special_tokens", True)
        # counting a long text is the point here: unbounded, in a thread (llama_tokenize frees the GIL)
        parse = body.flag("parse_special", True)  # llama-server's: False reads "<|endoftext|>" as plain text
        tokens = await asyncio.to_thread(svc.tokenize, text, add_special=special, bounded=False, parse_special=parse)
        out = {"tokens": tokens, "count": len(tokens), "max_model_len": svc.n_ctx}
        if body.flag("with_pieces"):
            out["pieces"] = [svc.token_text(t) for t in tokens]
        return out

    async def detokenize(request, svc):
        body = Body(await fields.read_json(request), ("tokens", "model"))
        tokens = body.get("tokens", (list,), [])
        text = svc.detokenize(svc.check_ids(tokens, "tokens"))
        return {"prompt": text, "content": text}

    async def tokenizer_info(request, svc):
        return {"model": svc.model_id, "tokenizer_model": svc.engine.info.text("tokenizer.ggml.model"),
                "eos_token": svc.eos_text,
                "bos_token": svc.special_text("tokenizer.ggml.bos_token_id"),
                "pad_token": svc.special_text("tokenizer.ggml.padding_token_id"),
                "chat_template": svc.chat_template, "model_max_length": svc.n_ctx, "max_model_len": svc.n_ctx,
                "vocab_size": svc.n_vocab, "add_bos_token": svc.engine.model.bos is not None}

    async def version(request):
        return ollama_api.version()

    async def tags(request, svc):
        return ollama_api.tags(svc)

    async def ps(request, svc):
        return ollama_api.ps(svc)

    async def root(request):  # Ollama's clients (and people) check that something answers here
        return PlainTextResponse("malhae is running (OpenAI API at /v1, Ollama API at /api)\n")

    async def not_found(request, exc):
        e = ApiError(f"no such endpoint: {request.method} {request.url.path}", 404, code="not_found")
        return error_response(e, request.url.path.startswith("/api/"))

    async def bad_method(request, exc):
        return JSONResponse(ApiError(f"{request.method} is not allowed on {request.url.path}", 405,
                                     code="method_not_allowed").body(), status_code=405)

    routes = [
        route("/health", health, needs_model=False),
        route("/v1/models", models),
        route("/v1/completions", openai_api.completions, ("POST",)),
        route("/v1/chat/completions", openai_api.chat, ("POST",)),
        route("/tokenize", tokenize, ("POST",)),
        route("/detokenize", detokenize, ("POST",)),
        route("/tokenizer_info", tokenizer_info),
        Route("/", root, methods=["GET", "HEAD"]),
        route("/api/version", version, needs_model=False, ollama=True),
        route("/api/show", ollama_api.show, ("POST",), ollama=True),
        route("/api/ps", ps, ollama=True),
        route("/api/tags", tags, ollama=True),
        route("/api/generate", ollama_api.generate, ("POST",), ollama=True),
        route("/api/chat", ollama_api.chat, ("POST",), ollama=True),
    ]
    middleware = []
    if allow_origins:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    return Starlette(routes=routes, middleware=middleware, exception_handlers={404: not_found, 405: bad_method})


def _model_card(svc) -> dict:
    return {"id": svc.model_id, "object": "model", "created": svc.created, "owned_by": "malhae",
            "context_length": svc.n_ctx, "max_model_len": svc.n_ctx,
            "meta": {"n_ctx": svc.n_ctx, "n_ctx_train": svc.engine.model.n_ctx_train, "n_vocab": svc.n_vocab,
                     "parallel": len(svc.scheduler.slots), "file": str(svc.engine.path)}}


def make_uvicorn(config):
    """A uvicorn server that ends the answers in progress itself when it stops: plain uvicorn waits out its graceful
    timeout, then cancels the streams and logs each one as an exception with a traceback."""
    import uvicorn

    from app.serve.jobs import Dispatcher

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
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(build_app(self.state, options.api_key, options.allow_origins), log_level="warning",
                                access_log=False,
                                lifespan="off", timeout_graceful_shutdown=3)
        self.uvicorn = make_uvicorn(config)
        self._thread: threading.Thread | None = None
        self._loader = threading.Thread(target=self._load, name="malhae-load", daemon=True)

    @property
    def url(self) -> str:
        host = self.options.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    def _load(self) -> None:
        from app.serve.service import Service

        o = self.options
        try:
            self.state.service = Service.load(o.path, model_id=o.model_id, parallel=o.parallel, queue=o.queue,
                                              n_ctx=o.n_ctx, threads=o.threads, gpu_layers=o.gpu_layers,
                                              template=o.template, verbose=o.verbose, notify=o.notify,
                                              draft=o.draft, draft_max=o.draft_max, device=o.device)
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
        if self.state.service is not None:
            self.state.service.close()
            self.state.service = None
        self.sock.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
