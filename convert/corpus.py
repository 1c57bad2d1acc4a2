"""The Korean text malhae calibrates importance matrices on, and the text it must never calibrate on.

Both are named in one place, `models/calibration.toml` (data): the sources of `--imatrix auto` and the two held-out
bills the demo model is evaluated on (train.py, the tests and the benchmarks take the held-out text from here too).
The sources are interleaved piece by piece (pieces of about PIECE_BYTES, cut at paragraph breaks), so that a run cut
short with `--chunks` still sees the constitution, bills and dialogues alike rather than the first document only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PIECE_BYTES = 2048


@dataclass(frozen=True)
class Manifest:
    name: str
    held_out: tuple[Path, ...]
    sources: tuple[tuple[str, tuple[Path, ...]], ...]  # (kind, files)


@cache
def manifest() -> Manifest:
    root = Path(str(resources.files("malhae.models")))
    raw = tomllib.loads((root / "calibration.toml").read_text(encoding="utf-8"))
    held = tuple(root / p for p in raw["held_out"])
    sources = tuple((s["kind"], tuple(root / p for p in s["files"])) for s in raw["source"])
    leaked = [p for _, paths in sources for p in paths if p in held]
    if leaked:  # calibrating on the evaluation text would flatter every measurement made on it
        raise RuntimeError(f"models/calibration.toml lists the held-out {leaked[0].name} as calibration text")
    return Manifest(raw["name"], held, sources)


def held_out_text() -> str:
    """The evaluation text: the held-out bills joined by a newline (as the tests, benchmarks and train.py join them)."""
    return "\n".join(p.read_text(encoding="utf-8") for p in manifest().held_out)


def pieces(text: str, size: int = PIECE_BYTES) -> list[str]:
    """`text` cut at paragraph breaks into pieces of at least `size` bytes (the last may be shorter)."""
    out: list[str] = []
    current: list[str] = []
    length = 0
    for para in text.split("\n\n"):
        current.append(para)
        length += len(para.encode("utf-8")) + 2
        if length >= size:
            out.append("\n\n".join(current))
            current, length = [], 0
    if current and any(p.strip() for p in current):
        out.append("\n\n".join(current))
    return out


def calibration_text() -> tuple[str, str]:
    """(dataset name, text) for `--imatrix auto`: the sources' pieces taken round-robin."""
    m = manifest()
    queues = [[piece for path in paths for piece in pieces(path.read_text(encoding="utf-8").strip())]
              for _, paths in m.sources]
    mixed: list[str] = []
    for i in range(max(len(q) for q in queues)):
        mixed.extend(q[i] for q in queues if i < len(q))
    return m.name, "\n\n".join(mixed)
