"""What the server says about its models without running one: /v1/models, /api/tags, /api/show, /api/ps, /health.

The store's models are listed whether loaded or not (Open WebUI's model picker, `ollama.list()`); /api/show reads a
model's header, never loading it; /api/ps and /health say what is in memory (app.serve.residency). A file's name is
shown, never its directory: a client has no business knowing where the store lies on this machine.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from pathlib import Path

from malhae import units
from malhae.errors import Broken, NotFound, UserError
from malhae.runtime import templates
from malhae.runtime.gguf_info import GGUFInfo, read_info
from malhae.serve import fields
from malhae.serve.errors import ApiError
from malhae.serve.fields import Body

NEVER = "0001-01-01T00:00:00Z"  # Ollama's zero time: a model that is never unloaded
OLLAMA_PARAMETERS = {"ctx": "num_ctx", "max_tokens": "num_predict"}  # the rest keep their names in a Modelfile


async def resolve(state, name: object):
    """The Target a request's `model` names (app.store.served; in a thread: it reads the store), or the ApiError
    its client reads: 404 listing the names, 500 for a model file that cannot be read. A name that no longer
    resolves lets its loaded model go (its file was removed or broken)."""
    try:
        return await asyncio.to_thread(state.names.resolve, name)
    except (NotFound, Broken) as e:
        if isinstance(name, str):
            state.pool.drop_stale(name.strip())
        if isinstance(e, NotFound):
            raise ApiError(str(e), 404, code="model_not_found", param="model") from None
        raise ApiError(str(e), 500, code="model_unreadable", kind="server_error") from None
    except UserError as e:
        raise ApiError(str(e), param="model", code="invalid_model") from None


def loading() -> ApiError:
    return ApiError("the model is still loading; retry shortly", 503, code="loading", kind="server_error",
                    headers={"Retry-After": "2"})


def serving(request):
    """The server's State once it can answer about its models (503 while its -m model loads)."""
    state = request.app.state.malhae
    if health(state) is None:
        raise loading()
    return state


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat().replace("+00:00", "Z")


def _mtime(path: Path) -> str:
    try:
        return _iso(path.stat().st_mtime)
    except OSError:  # removed meanwhile: listed as of now
        return _iso(time.time())


def details(info: GGUFInfo | None = None, entry=None) -> dict:
    """Ollama's `details` of a model, from its header (or from a store entry, which read it already)."""
    arch = (info.architecture if info else entry.architecture) or "gptneox"
    if info is not None:
        size, quant = str(info.metadata.get("general.size_label") or units.params(info.n_params or None)), \
            info.file_type or ""
    else:
        size, quant = units.params(entry.params), entry.type
    return {"format": "gguf", "family": arch, "families": [arch], "parameter_size": size,
            "quantization_level": quant.upper()}


def _tag(entry) -> dict:
    out = {"name": entry.name, "model": entry.name, "size": entry.size, "modified_at": _mtime(entry.path),
           "digest": "", "details": details(entry=entry)}
    if entry.adapter:  # an adapter preset: runs on its base
        out["details"]["parent_model"] = entry.base or ""
    return out


async def tags(state) -> dict:
    if state.names.pinned is not None:
        return {"models": [_pinned_tag(state.service)]}
    entries = await asyncio.to_thread(state.names.entries)
    return {"models": [_tag(e) for e in entries]}


def _pinned_tag(svc) -> dict:
    path = svc.engine.path
    return {"name": svc.model_id, "model": svc.model_id, "size": path.stat().st_size, "modified_at": _mtime(path),
            "digest": "", "details": details(svc.engine.info)}


def _card(entry, loaded) -> dict:
    """An OpenAI model card; a loaded model's tells its context and slots (meta, as llama-server's does)."""
    card = {"id": entry.name, "object": "model", "created": int(entry.path.stat().st_mtime)
            if entry.path.exists() else 0, "owned_by": "malhae"}
    svc = loaded.get(entry.name)
    if svc is not None:
        card |= {"context_length": svc.n_ctx, "max_model_len": svc.n_ctx,
                 "meta": {"n_ctx": svc.n_ctx, "n_ctx_train": svc.engine.model.n_ctx_train, "n_vocab": svc.n_vocab,
                          "parallel": len(svc.scheduler.slots), "file": svc.engine.path.name}}
    card.setdefault("meta", {})["size"] = entry.size
    card["meta"] |= {"type": entry.type, "loaded": svc is not None} | ({"adapter_of": entry.base} if entry.adapter
                                                                        else {})
    return card


def _loaded(state) -> dict:
    return {r.key: r.service for r in state.pool.snapshot() if r.service is not None}


async def models(state) -> dict:
    if state.names.pinned is not None:
        return {"object": "list", "data": [pinned_card(state.service)]}
    entries = await asyncio.to_thread(state.names.entries)
    loaded = _loaded(state)
    return {"object": "list", "data": [_card(e, loaded) for e in entries]}


async def model(state, wanted: str) -> dict:
    """OpenAI's `GET /v1/models/{id}` (the openai client's models.retrieve): 404 for a name not served."""
    if state.names.pinned is not None:
        svc = state.service
        if wanted != svc.model_id:
            raise ApiError(f"the model {wanted!r} does not exist; this server serves {svc.model_id!r}", 404,
                           code="model_not_found", param="model")
        return pinned_card(svc)
    target = await resolve(state, wanted)
    entries = await asyncio.to_thread(state.names.entries)
    entry = next(e for e in entries if e.name == target.name)
    return _card(entry, _loaded(state))


def pinned_card(svc) -> dict:
    return {"id": svc.model_id, "object": "model", "created": svc.created, "owned_by": "malhae",
            "context_length": svc.n_ctx, "max_model_len": svc.n_ctx,
            "meta": {"n_ctx": svc.n_ctx, "n_ctx_train": svc.engine.model.n_ctx_train, "n_vocab": svc.n_vocab,
                     "parallel": len(svc.scheduler.slots), "file": svc.engine.path.name}}


async def show(state, request) -> dict:
    """`ollama show` and `ollama run` ask this first: a model's details, template, parameters and header; the
    model is not loaded for it."""
    body = Body(await fields.read_json(request), ("model", "name", "verbose"))
    name = body.get("model", (str,)) or body.get("name", (str,))
    target = await resolve(state, name)
    info = await asyncio.to_thread(read_info, target.options.model)
    loaded = _loaded(state).get(target.key)
    if loaded is not None:
        template = loaded.view(target).chat_template
    else:
        chosen = templates.get(target.template) if target.template else templates.for_gguf(target.key, info.metadata)
        own = info.metadata.get("tokenizer.chat_template")
        template = own if isinstance(own, str) and own.strip() and not target.template else chosen.chat_template
    scalars = {k: v for k, v in info.metadata.items() if isinstance(v, (str, int, float, bool))
               and not k.startswith("tokenizer.chat_template")}
    own_ctx = target.options.ctx if target.options.ctx != state.names.base.ctx else None
    params = dict(target.sampling) | ({"ctx": own_ctx} if own_ctx else {})
    lines = "".join(f"{OLLAMA_PARAMETERS.get(k, k)} {v}\n" for k, v in params.items())
    adapters = "".join(f"ADAPTER {a.path.name}\n" for a in target.adapters)
    out = {"modelfile": f"FROM {target.options.model.name}\n{adapters}", "parameters": lines, "template": template,
           "details": details(info), "model_info": scalars, "capabilities": ["completion", "tools"],
           "modified_at": _mtime(target.options.model)}
    return out | ({"system": target.system} if target.system else {})


def ps(state) -> dict:
    """Each model in memory (or loading): its memory as planned, its context and slots, and when it goes."""
    out = []
    now, wall = time.monotonic(), time.time()
    for r in state.pool.snapshot():
        svc = r.service
        if r.pinned or r.keep_alive is None:
            expires = NEVER
        elif r.expires is not None:
            expires = _iso(wall + max(0.0, r.expires - now))
        else:  # busy or loading: keep_alive after its requests end
            expires = _iso(wall + r.keep_alive)
        parallel = r.target.options.parallel
        entry = {"name": r.key, "model": r.key, "size": r.need.ram + r.need.vram, "size_vram": r.need.vram,
                 "digest": "", "expires_at": expires, "state": r.state, "slots": parallel,
                 "slots_busy": svc.scheduler.active if svc is not None else 0, "requests": r.busy,
                 "pinned": r.pinned}
        if svc is not None:
            entry |= {"context_length": svc.n_ctx, "details": details(svc.engine.info), "where": svc.engine.where}
        out.append(entry)
    return {"models": out}


def health(state) -> dict | None:
    """What /health answers once the server can serve (None: still loading its -m model)."""
    if state.names is None or state.names.pinned is not None and state.service is None:
        return None
    snapshot = state.pool.snapshot()
    slots = [r.service.scheduler for r in snapshot if r.service is not None]
    out = {"status": "ok", "slots_idle": sum(len(s.slots) - s.active for s in slots),
           "slots_busy": sum(s.active for s in slots), "waiting": sum(len(s.waiting) for s in slots)}
    if state.names.pinned is None:
        out |= {"models_loaded": len(slots), "models_loading": sum(r.state == "loading" for r in snapshot)}
    return out
