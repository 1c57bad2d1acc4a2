"""llama-server's LoRA API: `GET /lora-adapters` lists the adapters given at start (`--lora`), `POST /lora-adapters`
sets the scales requests run with, and a request's own `lora: [{"id": 0, "scale": 0.5}]` picks its set.

llama-server's semantics, so that its clients work: an id is the adapter's place in the start's `--lora` list; a
list of {id, scale} sets every adapter it names and turns every other one off (scale 0); a request without `lora`
runs with the scales last POSTed (at start: those of `--lora`). Requests with different sets run side by side, taking
turns at the decode (app/runtime/slots.py). Stricter than llama-server where its leniency hides a mistake: an unknown
id, a duplicate id, a scale that is not a finite number within ±MAX_SCALE, or an unknown key is a 400 naming it.
"""

from __future__ import annotations

from malhae.errors import UserError
from malhae.runtime import lora
from malhae.runtime.settings import Lora
from malhae.serve import fields
from malhae.serve.errors import ApiError

# an entry's keys: GET's own keys are accepted back, so that a client may POST what it read with other scales
ENTRY_KEYS = ("id", "scale", "path", "name")


def listing(loaded: tuple[Lora, ...], scales: list[float]) -> list[dict]:
    """GET's answer: each adapter's id, file (its name, never the directory, as /v1/models shows the model) and the
    scale requests without `lora` run with."""
    return [{"id": i, "path": a.path.name, "name": a.name, "scale": scale}
            for i, (a, scale) in enumerate(zip(loaded, scales, strict=True))]


def parse(value: object, loaded: tuple[Lora, ...], name: str) -> list[float]:
    """A `[{"id", "scale"}, …]` list as every adapter's scale (an adapter not named: 0), or an ApiError naming
    `name` (the field, or "body" for POST)."""
    usage = 'an array of {"id": N, "scale": X} (ids from GET /lora-adapters), e.g. [{"id": 0, "scale": 0.5}]'
    if not isinstance(value, list):
        raise _bad(f"{name} must be {usage}, not {fields.kind(value)}", name)
    if len(value) > max(len(loaded), 1):
        raise _bad(f"{name} has {len(value)} entries; this server has {_count(loaded)}", name)
    scales = [0.0] * len(loaded)
    seen: set[int] = set()
    for i, entry in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(entry, dict):
            raise _bad(f"{where} must be an object such as {{\"id\": 0, \"scale\": 0.5}}, not {fields.kind(entry)}",
                       name)
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            raise _bad(f"{where}: unknown key {unknown[0]!r}; an entry has id and scale", name)
        ident, scale = entry.get("id"), entry.get("scale")
        if isinstance(ident, bool) or not isinstance(ident, int):
            raise _bad(f"{where}.id must be a whole number (an id from GET /lora-adapters), not "
                       f"{fields.kind(ident) if ident is not None else 'missing'}", name)
        if not 0 <= ident < len(loaded):
            raise _bad(f"{where}: no adapter has id {ident}; this server has {_count(loaded)}", name)
        if ident in seen:
            raise _bad(f"{where}: id {ident} is given twice; give each adapter once", name)
        seen.add(ident)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise _bad(f"{where}.scale must be a number (1 = as trained, 0 = off), not "
                       f"{fields.kind(scale) if scale is not None else 'missing'}", name)
        try:
            scales[ident] = lora.parse_scale(scale, f"{where}.scale")
        except UserError as e:
            raise _bad(str(e), name) from None
    return scales


def chosen(loaded: tuple[Lora, ...], scales: list[float]) -> tuple[Lora, ...]:
    """The set a job runs with: the loaded adapters at these scales, in their order."""
    return tuple(Lora(a.path, float(s)) for a, s in zip(loaded, scales, strict=True))


def _count(loaded: tuple[Lora, ...]) -> str:
    if not loaded:
        return "no adapters (start it with --lora FILE to serve one)"
    return f"{len(loaded)} adapter{'s' if len(loaded) > 1 else ''} (ids 0 to {len(loaded) - 1})"


def _bad(message: str, name: str) -> ApiError:
    return ApiError(message, param=name, code="invalid_lora")


# --- the handlers (routed in app.serve.server) -------------------------------------------------------------------

async def get(request, svc) -> list[dict]:
    return listing(svc.loras, svc.lora_scales)


async def post(request, svc) -> dict:
    """Set the scales of requests without `lora` (llama-server's answer: {"success": true}); requests already
    running keep theirs. The event loop's thread alone reads and writes the scales, so no lock is needed."""
    svc.lora_scales[:] = parse(await fields.read_json(request, array=True), svc.loras, "body")  # the loaded model's
    return {"success": True}


def for_request(svc, body: fields.Body) -> tuple[Lora, ...]:
    """The adapter set a completion request runs with: its own `lora` (ids not named: off), else the server's."""
    given = body.data.get("lora")
    return chosen(svc.loras, svc.lora_scales if given is None else parse(given, svc.loras, "lora"))
