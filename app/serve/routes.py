"""The HTTP handlers and the one wrapper every route goes through (API key, loading state, errors as JSON).

Module-level functions rather than closures inside build_app, so that each can be read and tested on its own; what
they share — the server's State and the API key — travels on the Starlette application (`request.app.state`, set
once by `install`), the place Starlette gives for exactly that. This module imports Starlette at the top, so only
build_app imports it: `import app.serve.server` must work without the `serve` extra (see server.missing_extra).
"""

from __future__ import annotations

import asyncio
import hmac
import traceback
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from malhae.errors import UserError
from malhae.runtime.target import UNSET
from malhae.serve import fields, listing, ollama_api
from malhae.serve.errors import ApiError
from malhae.serve.fields import Body
from malhae.serve.service import Service
from malhae.serve.sse import JobStream

Handler = Callable[..., Awaitable[object]]  # (request) or (request, svc) -> a Response or a JSON-able value


def install(app: Starlette, state: object, api_key: str | None) -> None:
    """Give the routes what they share: the server's State (the Service once loaded; typed loosely because server
    imports this module, not the other way round) and the API key (None: open)."""
    app.state.malhae = state
    app.state.api_key = api_key.encode() if api_key else None


def error_response(e: ApiError, ollama: bool) -> Response:
    """OpenAI's error shape, or Ollama's `{"error": "…"}` on its routes (its clients read only that)."""
    body = {"error": e.message} if ollama else e.body()
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def route(path: str, handler: Handler, methods: tuple[str, ...] = ("GET",), *, needs_model: bool = True,
          ollama: bool = False, reads_body: bool = True) -> Route:
    """`handler` behind the rules every route shares, in one place so that no route can forget one: the API key
    (all but /health, which load balancers poll without one), the model a request names (handlers that need one get
    it as their second argument, loaded on demand and held until the answer is complete: app.serve.residency), and
    every ApiError, UserError or bug as a JSON error — a bug fails the request, never the server. `reads_body`: the
    JSON body names the model (`model`) and how long to keep it (`keep_alive`); else the default model (or
    `?model=`)."""
    async def endpoint(request: Request) -> Response:
        try:
            key = request.app.state.api_key
            if key is not None and path != "/health":
                given = request.headers.get("authorization", "")
                token = given[7:].strip() if given[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(token.encode(), key):
                    raise ApiError("a valid API key is needed: send the header `Authorization: Bearer KEY`"
                                   if not token else "the API key is not valid", 401, code="invalid_api_key")
            if not needs_model:
                result = await handler(request)
            else:
                result = await _with_model(request, handler, reads_body and request.method == "POST")
            return result if isinstance(result, Response) else JSONResponse(result)
        except ApiError as e:
            return error_response(e, ollama)
        except ClientDisconnect:  # gone before its body arrived: nothing was queued, nobody to answer (logged 499)
            return Response(status_code=499)
        except UserError as e:  # a rule of the runtime (an empty prompt, a context too small, a bad keep_alive)
            return error_response(ApiError(str(e)), ollama)
        except Exception as e:  # a bug: the request fails, the server goes on
            traceback.print_exc()
            return error_response(ApiError(f"internal error ({type(e).__name__}: {e})", 500,
                                           kind="server_error"), ollama)

    return Route(path, endpoint, methods=list(methods))


async def _with_model(request: Request, handler: Handler, reads_body: bool) -> object:
    """Run `handler` with the model the request names, held (a Lease) until its answer is complete: a streamed
    answer gives it back when the stream ends. Ollama's requests that run nothing (an empty prompt or message list)
    only load the model, or with keep_alive 0 unload it (app.serve.ollama_api.runs_nothing)."""
    state = request.app.state.malhae
    if listing.health(state) is None:
        raise listing.loading()
    data = await fields.read_json(request) if reads_body else {}
    request.state.json = data if reads_body else None
    name = data.get("model") if reads_body else request.query_params.get("model")
    target = await listing.resolve(state, name)
    given = data.get("keep_alive")
    keep_alive = state.pool.keep_alive_for(target, UNSET if given is None else given)
    if reads_body and ollama_api.runs_nothing(request.url.path, data):
        if keep_alive == 0:
            was = await state.pool.expire(target.key)
            return ollama_api.idle_answer(request.url.path, target.name, "unload") | {"loaded": was}
        (await state.pool.acquire(target, keep_alive)).release()
        return ollama_api.idle_answer(request.url.path, target.name, "load")
    lease = await state.pool.acquire(target, keep_alive)
    try:
        result = await handler(request, lease.service)
    except BaseException:
        lease.release()
        raise
    if isinstance(result, JobStream):
        result.ended.append(lease.release)
    else:
        lease.release()
    return result


# --- the handlers: (request) when they work without the model, else (request, svc) --------------------------------

async def health(request: Request) -> object:
    """503 while the -m model loads (clients poll this until ready), then what the slots are doing."""
    answer = listing.health(request.app.state.malhae)
    return JSONResponse({"status": "loading"}, status_code=503) if answer is None else answer


async def models(request: Request) -> dict:
    return await listing.models(listing.serving(request))


async def model(request: Request) -> dict:
    return await listing.model(listing.serving(request), request.path_params["model_id"])


async def show(request: Request) -> dict:
    return await listing.show(listing.serving(request), request)


async def tokenize(request: Request, svc: Service) -> dict:
    """llama-server's /tokenize: counting a long text is the point here, so unbounded, in a thread (llama_tokenize
    frees the GIL)."""
    body = Body(await fields.read_json(request), ("prompt", "content", "add_special_tokens", "model",
                                                  "with_pieces", "parse_special"))
    text = body.get("prompt", (str,)) if "prompt" in body.data else body.get("content", (str,), "")
    special = body.flag("add_special_tokens", True)
    parse = body.flag("parse_special", True)  # llama-server's: False reads "<|endoftext|>" as plain text
    tokens = await asyncio.to_thread(svc.tokenize, text, add_special=special, bounded=False, parse_special=parse)
    out = {"tokens": tokens, "count": len(tokens), "max_model_len": svc.n_ctx}
    if body.flag("with_pieces"):
        out["pieces"] = [svc.token_text(t) for t in tokens]
    return out


async def detokenize(request: Request, svc: Service) -> dict:
    body = Body(await fields.read_json(request), ("tokens", "model"))
    tokens = body.get("tokens", (list,), [])
    text = svc.detokenize(svc.check_ids(tokens, "tokens"))
    return {"prompt": text, "content": text}


async def tokenizer_info(request: Request, svc: Service) -> dict:
    """What vLLM's and lm-eval's clients ask to set themselves up without the tokenizer files."""
    return {"model": svc.model_id, "tokenizer_model": svc.engine.info.text("tokenizer.ggml.model"),
            "eos_token": svc.eos_text,
            "bos_token": svc.special_text("tokenizer.ggml.bos_token_id"),
            "pad_token": svc.special_text("tokenizer.ggml.padding_token_id"),
            "chat_template": svc.chat_template, "model_max_length": svc.n_ctx, "max_model_len": svc.n_ctx,
            "vocab_size": svc.n_vocab, "add_bos_token": svc.engine.model.bos is not None}


async def version(request: Request) -> dict:
    return ollama_api.version()


async def tags(request: Request) -> dict:
    return await listing.tags(listing.serving(request))


async def ps(request: Request) -> dict:
    return listing.ps(listing.serving(request))


async def root(request: Request) -> Response:
    """Ollama's clients (and people) check that something answers here; no API key, nothing to leak."""
    return PlainTextResponse("malhae is running (OpenAI API at /v1, Ollama API at /api)\n")


async def not_found(request: Request, exc: Exception) -> Response:
    """An unknown path, as a JSON error in the shape its API's clients read (Ollama's under /api/)."""
    e = ApiError(f"no such endpoint: {request.method} {request.url.path}", 404, code="not_found")
    return error_response(e, request.url.path.startswith("/api/"))


async def bad_method(request: Request, exc: Exception) -> Response:
    return JSONResponse(ApiError(f"{request.method} is not allowed on {request.url.path}", 405,
                                 code="method_not_allowed").body(), status_code=405)
