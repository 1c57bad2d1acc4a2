"""Ollama's `/api/pull` and `/api/delete` on the store: `malhae pull` and `malhae models rm` for its clients
(`ollama pull`, Open WebUI's model manager), through the same rules (app.store.pull, app.store.removal).

A pull downloads from the Hugging Face hub and converts: minutes, gigabytes, every core. One runs at a time; a
client that leaves does not stop it (the store's write is atomic either way). Offline it is one error line. A model
is deleted only when no request is using it; it is unloaded first.
"""

from __future__ import annotations

import asyncio
import json

from starlette.responses import StreamingResponse

from malhae.errors import NotFound, UserError
from malhae.serve import fields, listing
from malhae.serve.errors import ApiError
from malhae.serve.fields import Body

DEFAULT_TYPE = "q4_k_m"  # `malhae pull`'s


def _store_only(state) -> None:
    if state.names.pinned is not None:
        raise ApiError("this server serves one model (started with -m); start `malhae serve` without -m to manage "
                       "the store over HTTP", code="pinned")


def _name(body: Body) -> str:
    name = body.get("model", (str,)) or body.get("name", (str,))
    if not name or not name.strip():
        raise ApiError("give the model's name: {\"model\": \"NAME\"}", param="model", code="invalid_value")
    return name.strip()[:256]


async def delete(request) -> dict:
    """`DELETE /api/delete {"model": NAME}`: unloaded (if idle), then removed with its settings file."""
    state = listing.serving(request)
    _store_only(state)
    name = _name(Body(await fields.read_json(request), ("model", "name")))
    if state.pool.busy(name):
        raise ApiError(f"{name} is answering requests; delete it once they end", 409, code="model_busy")
    try:
        entry = await asyncio.to_thread(state.names.find, name)
    except NotFound as e:
        raise ApiError(str(e), 404, code="model_not_found", param="model") from None
    await state.pool.expire(entry.name)
    done = await asyncio.to_thread(state.names.delete, entry)
    return {"status": "success", "deleted": entry.name, "settings_deleted": done.settings_file is not None}


def _split(model: str) -> tuple[str, str]:
    """Ollama's NAME:TAG as `malhae pull NAME --type TAG` (latest: malhae's default type)."""
    name, _, tag = model.rpartition(":") if ":" in model else (model, "", "")
    return name, (tag if tag and tag != "latest" else DEFAULT_TYPE)


async def pull(request):
    """`POST /api/pull {"model": "polyglot-ko-1.3b:q4_k_m"}`: a catalog name or hub id, with the output type as
    its tag; streams {"status", "completed", "total"} lines, then {"status": "success"}, as Ollama's pull does."""
    state = listing.serving(request)
    _store_only(state)
    body = Body(await fields.read_json(request), ("model", "name", "stream", "insecure"))
    model, stream = _name(body), body.flag("stream", True)
    body.flag("insecure")
    name, type_name = _split(model)
    if state.pulling:
        raise ApiError("a pull is already running (one at a time); retry once it ends", 409, code="pull_running")
    state.pulling = True
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def progress(stage: str, done: int, total: int) -> None:  # on the pull's thread
        loop.call_soon_threadsafe(events.put_nowait, {"status": stage, "completed": done, "total": total})

    def run() -> str:
        try:
            return state.names.pull(name, type_name, progress)
        finally:
            state.pulling = False

    job = loop.run_in_executor(None, run)
    first = asyncio.ensure_future(events.get())
    await asyncio.wait({job, first}, return_when=asyncio.FIRST_COMPLETED)
    if job.done() and not first.done():  # finished or failed before any progress: one answer, not a stream
        first.cancel()
        return _outcome(job)
    if not stream:
        first.cancel()
        await asyncio.wait({job})
        return _outcome(job)
    return StreamingResponse(_lines(first.result(), events, job), media_type="application/x-ndjson")


def _outcome(job) -> dict:
    try:
        stored = job.result()
    except UserError as e:
        raise ApiError(str(e), code="pull_failed") from None
    return {"status": "success", "model": stored}


async def _lines(first: dict, events: asyncio.Queue, job):
    yield (json.dumps({"status": "pulling"}) + "\n").encode()
    yield (json.dumps(first) + "\n").encode()
    while not job.done() or not events.empty():
        getter = asyncio.ensure_future(events.get())
        await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield (json.dumps(getter.result()) + "\n").encode()
        else:
            getter.cancel()
    try:
        yield (json.dumps(_outcome(job)) + "\n").encode()
    except ApiError as e:
        yield (json.dumps({"error": e.message}) + "\n").encode()
    except Exception as e:  # a bug: said on the stream, whose status line has gone already
        yield (json.dumps({"error": f"internal error ({type(e).__name__}: {e})"}) + "\n").encode()
