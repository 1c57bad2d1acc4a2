"""Which model file a command runs: the one given, else the bundled demo model (said once), else an error.

The model store and configured defaults (names instead of paths) extend this resolution later; every command goes
through it so that they all agree.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from app.errors import UserError

DEMO_MODEL = "malhae-demo-ko-f16.gguf"


def demo_model() -> Path | None:
    path = Path(str(resources.files("models").joinpath(DEMO_MODEL)))
    return path if path.is_file() else None


def resolve(model: str | None, notify=None) -> Path:
    if model:
        return Path(model).expanduser()
    demo = demo_model()
    if demo is None:
        raise UserError("no model given: pass --model FILE.gguf (make one from a Polyglot-Ko checkpoint with "
                        "`malhae convert`)")
    if notify:
        notify(f"no model given: using the bundled demo model ({demo.name}), a tiny model trained on the Korean "
               "constitution — not an assistant. Pass --model FILE.gguf for a real one.")
    return demo
