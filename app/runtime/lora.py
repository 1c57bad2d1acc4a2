"""LoRA adapters at run time: `--lora FILE|NAME[:SCALE]` read, the file checked against its model, the set named.

llama.cpp applies them (`llama_adapter_lora_init` once per model and file, `llama_set_adapters_lora` per context:
app.runtime.llama); this module decides what may be applied. Everything is checked from the GGUF headers before a
byte of the model is loaded: a model given as an adapter, an adapter given as a model, and an adapter of another
model (its tensor shapes against the base's) are each one line naming both files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gguf import Keys

from malhae.errors import UserError
from malhae.runtime.gguf_info import GGUFInfo, read_info
from malhae.runtime.settings import Lora

MAX_SCALE = 100.0  # llama.cpp takes any float; past this an adapter only produces noise (and -1000 was a typo)
MAX_ADAPTERS = 16  # per model: each is a pass over its tensors in every matmul it touches
USAGE = "--lora FILE|NAME[:SCALE], e.g. --lora koalpaca-qlora or --lora adapter.gguf:0.5"


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter GGUF's header: what `malhae info` and `models` show, and what it is checked with."""

    path: Path
    name: str
    rank: int
    alpha: float  # as llama.cpp applies it (alpha / rank; malhae writes PEFT's scale × rank)
    targets: tuple[str, ...]  # the kinds of tensors adapted: attn_qkv, attn_output, ffn_up, ffn_down, output
    base: str | None  # the model it was trained on, as its adapter_config.json said
    size: int
    pairs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # base tensor → (lora_a's ggml shape, lora_b's)

    @classmethod
    def read(cls, path: Path) -> AdapterInfo:
        info = read_info(path)
        return cls.of(info)

    @classmethod
    def of(cls, info: GGUFInfo) -> AdapterInfo:
        path = info.path
        if info.metadata.get(Keys.General.TYPE) != "adapter":
            raise UserError(f"{path.name} is a model, not a LoRA adapter: give it with -m (an adapter is made from "
                            "a PEFT folder with `malhae convert ADAPTER_FOLDER --base MODEL`)")
        if info.metadata.get(Keys.Adapter.TYPE) != "lora":
            raise UserError(f"{path.name} is a {info.metadata.get(Keys.Adapter.TYPE) or 'unknown'} adapter; "
                            "--lora takes LoRA adapters")
        shapes = {t.name: t.shape for t in info.tensors}
        pairs = {}
        for name, shape in shapes.items():
            if name.endswith(".lora_a"):
                base = name.removesuffix(".lora_a")
                if base + ".lora_b" not in shapes:
                    raise UserError(f"{path.name} is not a valid adapter: {base}.lora_b is missing")
                pairs[base] = (shape, shapes[base + ".lora_b"])
        if not pairs:
            raise UserError(f"{path.name} holds no LoRA tensors; convert the adapter again")
        alpha = info.metadata.get(Keys.Adapter.LORA_ALPHA, 0.0)
        rank = next(iter(pairs.values()))[0][1]
        base = info.text(Keys.General.BASE_MODEL_NAME.format(id=0))
        return cls(path, info.name or path.stem, int(rank), float(alpha) if isinstance(alpha, (int, float)) else 0.0,
                   targets(pairs), base, info.file_size, pairs)

    def check_fits(self, model: GGUFInfo) -> None:
        """Refuse an adapter of another model: each pair's shapes against the tensor it adapts (llama.cpp's own
        check, said before loading and in words)."""
        tensors = {t.name: t.shape for t in model.tensors}
        if model.architecture != "gptneox" or model.metadata.get(Keys.General.TYPE) == "adapter":
            raise UserError(f"{model.path.name} cannot take the adapter {self.path.name}: give a GPT-NeoX model "
                            "with -m and the adapter with --lora")
        for name, (a, b) in self.pairs.items():
            target = tensors.get(name + ".weight", tensors.get(name))
            if target is None or len(target) != 2 or target[0] != a[0] or target[1] != b[1] or a[1] != b[0]:
                there = "is missing" if target is None else f"is {target[1]}×{target[0]}"
                raise UserError(f"the adapter {self.path.name} does not fit {model.path.name}: {name} {there} "
                                f"there and {b[1]}×{a[0]} in the adapter; use it with the model it was trained on"
                                + (f" ({self.base})" if self.base else ""))


def other_base(trained_on: str | None, names: list[str | None]) -> bool:
    """Whether an adapter trained on `trained_on` (its adapter_config.json's base_model_name_or_path) is applied to a
    model known by none of `names` (its name, source, file): by the last part of each, so a hub id, a local folder
    and a quantized file of the same model agree (polyglot-ko-5.8b-q4_k_m is polyglot-ko-5.8b)."""
    def short(name: str) -> str:
        return name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower().removesuffix(".gguf")

    known = [short(n) for n in names if n]
    if not trained_on or not known:
        return False
    want = short(trained_on)
    return not any(want in n or n in want for n in known)


def base_note(info: AdapterInfo, model: GGUFInfo) -> str | None:
    """One line when an adapter that fits by shape was trained on a model of another name: it runs, and what it
    computes only approximates its training (a QLoRA trained on a 4-bit base and run on a Q4_K_M one is such a
    case, and fine)."""
    if not other_base(info.base, [model.name, model.source, model.path.name]):
        return None
    return (f"the adapter {info.path.name} was trained on {info.base}, not {model.name or model.path.name}; their "
            "shapes fit, so it applies, but it only approximates what it learned there")


def split_scale(text: str, usage: str) -> tuple[str, float]:
    """`WHAT[:SCALE]` → (WHAT, scale; 1 when none is given). A path that exists with a colon in its name is taken
    whole; a tail with a path separator is part of the path, not a scale."""
    head, sep, tail = text.rpartition(":")
    if sep and head and "/" not in tail and "\\" not in tail and not Path(text).exists():
        return head, parse_scale(tail, f"{usage} {text}")
    return text, 1.0


def targets(names) -> tuple[str, ...]:
    """The kinds of tensors adapted, in order (attn_qkv, ffn_up, output, …), from the base tensors' GGUF names."""
    return tuple(dict.fromkeys(n.split(".")[-2] if n.startswith("blk.") else n.split(".")[0] for n in names))


def parse(value: str, resolve: Callable[[str], Path], usage: str = "--lora") -> Lora:
    """`FILE|NAME[:SCALE]` as typed: `resolve` (the store's rule) turns a name into a file; the scale is bounded."""
    text = value.strip()
    if not text:
        raise UserError(f"{usage} needs a value: {USAGE}")
    text, scale = split_scale(text, usage)
    try:
        path = resolve(text)
    except UserError as e:
        raise UserError(f"{usage} {text}: {e}") from None
    if not path.is_file():
        raise UserError(f"{usage} {text}: " + (f"{path} is a directory; convert a PEFT folder first with `malhae "
                                               "convert FOLDER --base MODEL --add`" if path.is_dir()
                                               else f"adapter file {path} does not exist"))
    return Lora(path, scale)


def parse_scale(raw: object, where: str) -> float:
    try:
        scale = float(raw) if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError):
        scale = math.nan
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise UserError(f"{where}: the scale must be a number from -{MAX_SCALE:g} to {MAX_SCALE:g} (1 = as "
                        "trained, 0 = off)")
    return scale


def check(loras: tuple[Lora, ...], model: GGUFInfo) -> list[AdapterInfo]:
    """Every adapter of a run read and checked against its model before either is loaded."""
    if len(loras) > MAX_ADAPTERS:
        raise UserError(f"{len(loras)} adapters at once; malhae applies at most {MAX_ADAPTERS} (merge some with "
                        "`malhae convert --merge-lora`)")
    seen = set()
    infos = []
    for lora in loras:
        key = lora.path.resolve()
        if key in seen:
            raise UserError(f"--lora {lora.name} is given twice; give it once with the scale you want")
        seen.add(key)
        info = AdapterInfo.read(lora.path)
        info.check_fits(model)
        infos.append(info)
    return infos


def identity(loras: tuple[Lora, ...]) -> list[list[object]]:
    """What the prompt cache keys a state on (a state computed with other adapters is another state): each file's
    name, size and modification time, and its scale."""
    out = []
    for lora in loras:
        st = lora.path.stat()
        out.append([lora.path.name, st.st_size, st.st_mtime_ns, lora.scale])
    return out


def describe(loras: tuple[Lora, ...]) -> str:
    return ", ".join(str(lora) for lora in loras) or "none"
