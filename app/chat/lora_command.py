"""`/lora` in `malhae chat`: the LoRA adapters on the running model, listed, added, rescaled and removed mid-chat.

Apart from app.chat.repl (which dispatches every /command) so that the REPL stays one screenful per concern; Chat
takes these methods as a mixin. A change of the set goes through Engine.set_lora, which checks the adapters against
the model first and then clears the KV cache: what it holds was computed with the old set, so the next answer reads
the whole conversation again with the new one. The conversation itself never changes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from malhae.errors import UserError
from malhae.runtime import lora
from malhae.runtime.engine import check_model_file
from malhae.runtime.settings import LoadOptions, Lora

USAGE = "/lora NAME|FILE [SCALE] adds an adapter or rescales it · /lora off NAME removes one · /lora off removes all"


class LoraCommand:
    """The /lora command and what /model, /save and /load need to know of adapters (mixed into Chat, whose engine,
    load options, resolver and output it uses)."""

    def cmd_lora(self, arg: str) -> None:
        if self.engine.remote:
            raise UserError(f"/lora is for a local model: the server at {self.engine.where} chooses its own "
                            "adapters (malhae serve -m MODEL --lora NAME)")
        applied = self.engine.options.lora
        words = arg.split()
        if not words:
            self._list_adapters()
            return
        if words[0].lower() in ("off", "none"):
            loras = () if len(words) == 1 else self._without(applied, arg.split(None, 1)[1].strip())
        else:
            loras = self._with(applied, self._parse_lora(arg.strip()))
        if loras == applied:
            self.info(f"adapters: {lora.describe(loras)} (unchanged)")
            return
        self.engine.set_lora(loras)  # checked first (another model's adapter: one line, nothing changed)
        self.load = replace(self.load, lora=loras)
        again = "; the next answer reads the conversation again" if self.conv.exchanges else ""
        self.info(f"adapters: {lora.describe(loras)}{again}")

    def _list_adapters(self) -> None:
        if not self.engine.options.lora:
            self.info("no adapters applied (none)")
        for applied, info in zip(self.engine.options.lora, self.engine.adapters, strict=True):
            self.info(f"{applied.name} · scale {applied.scale:g} · rank {info.rank} · {', '.join(info.targets)} "
                      f"({applied.path})")
        self.dim(USAGE)

    def _parse_lora(self, text: str) -> Lora:
        """NAME|FILE, NAME:SCALE (as --lora takes it) or NAME SCALE; a file name with spaces is taken whole."""
        head, _, tail = text.rpartition(" ")
        if not head or Path(text).expanduser().is_file():
            return lora.parse(text, lambda word: self.resolve(word, None), "/lora")
        scale = lora.parse_scale(tail, f"/lora {text}")
        return replace(lora.parse(head.strip(), lambda word: self.resolve(word, None), "/lora"), scale=scale)

    def _with(self, applied: tuple[Lora, ...], new: Lora) -> tuple[Lora, ...]:
        """The set with `new` added at the end, or in its place at its new scale; scale 0 removes it."""
        at = next((i for i, a in enumerate(applied) if a.path.resolve() == new.path.resolve()), None)
        if new.scale == 0:
            if at is None:
                raise UserError(f"{new.name} is not applied, so there is nothing to remove; {USAGE}")
            return applied[:at] + applied[at + 1:]
        return applied + (new,) if at is None else applied[:at] + (new,) + applied[at + 1:]

    def _without(self, applied: tuple[Lora, ...], name: str) -> tuple[Lora, ...]:
        kept = tuple(a for a in applied if name not in (a.name, a.path.name, str(a.path)))
        if len(kept) == len(applied):
            raise UserError(f"no adapter {name!r} is applied (applied: {lora.describe(applied)}); /lora lists them")
        return kept

    def fitting(self, load: LoadOptions) -> LoadOptions:
        """/model: the adapters go on to the new model where they fit it; those made for another model are left
        off and said, rather than refusing the switch."""
        if not load.lora:
            return load
        info = check_model_file(load.model)
        kept = []
        for applied in load.lora:
            try:
                lora.AdapterInfo.read(applied.path).check_fits(info)
                kept.append(applied)
            except UserError:
                self.note(f"the adapter {applied} does not fit {load.model.name} and is left off (/lora adds it "
                          "back on the model it was made for)")
        return replace(load, lora=tuple(kept))

    def adapter_names(self) -> tuple[str, ...]:
        """The adapters applied as --lora writes them ("name", "name:0.5"), for /save and /show."""
        return () if self.engine.remote else tuple(map(str, self.engine.options.lora))

    def adapters_shown(self) -> str:
        """/show's model line: the adapters on it, if any."""
        names = self.adapter_names()
        return f" · LoRA adapters {', '.join(names)}" if names else ""

    def saved_with(self, model: str | None, adapters: tuple[str, ...]) -> None:
        """/load: what the file was saved with, where it differs from what runs (nothing of it is loaded)."""
        if model and model != self.engine.name:
            self.dim(f"it was saved with model {model}; continuing with {self.engine.name}")
        if adapters != self.adapter_names():
            now = ", ".join(self.adapter_names()) or "none"
            self.dim(f"it was saved with the adapters {', '.join(adapters) or 'none'}; continuing with {now} (/lora "
                     "changes them)")
