"""Read a PEFT LoRA adapter of a GPT-NeoX model: its adapter_config.json and its weights, into one checked value.

This is how the Polyglot-Ko family is fine-tuned (KoAlpaca's QLoRA on polyglot-ko-12.8b, KULLM before merging): a
folder with `adapter_config.json` and `adapter_model.safetensors` (or `.bin`, read with weights_only as base models
are). What PEFT computes for one adapted linear layer is W·x + s·B·A·x, with s = lora_alpha / r, or lora_alpha / √r
under `use_rslora`, and per-module ranks and alphas where `rank_pattern` / `alpha_pattern` name them. Everything
else an adapter may carry (DoRA's magnitudes, a bias on B, trained biases, whole modules saved, a LoRA on the
embedding) is read too, so that merging can apply it and running unmerged can refuse it by name. `fan_in_fan_out`
changes nothing here: it describes Conv1D layers, and PEFT turns it off for GPT-NeoX's nn.Linear (A and B keep their
shapes either way).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from malhae import files
from malhae.convert.checkpoint import read_file
from malhae.convert.tensors import as_f32
from malhae.errors import UserError

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MAX_CONFIG = 1 << 20  # an adapter_config.json is 1-2 KB
MAX_RANK = 1 << 16
PREFIX = "base_model.model."
# PEFT's module names for GPT-NeoX (transformers 5 names the output head lm_head, 4 embed_out)
ALIASES = {"lm_head": "embed_out"}
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                       r"lora_magnitude_vector)(?:\.(?P<adapter>(?!weight$|bias$)[\w-]+))?(?:\.(?P<param>weight|bias))?$")


class AdapterError(UserError):
    pass


def is_adapter(folder: Path) -> bool:
    """A PEFT adapter's folder: its config or its weights (a folder with the weights alone is an adapter missing
    its config, which read() says, not a model missing config.json)."""
    return any((folder / name).is_file() for name in (CONFIG, *WEIGHTS))


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    rslora: bool
    dora: bool
    bias: str  # PEFT's "none", "all" or "lora_only": which biases were trained
    modules_to_save: tuple[str, ...]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    fan_in_fan_out: bool
    base: str | None  # base_model_name_or_path: what it was trained on

    def scaling(self, module: str) -> float:
        """PEFT's scale for one module: its alpha over its rank (or the rank's square root under rslora)."""
        r = _pattern(self.rank_pattern, module, self.r)
        alpha = _pattern(self.alpha_pattern, module, self.alpha)
        return alpha / (math.sqrt(r) if self.rslora else r)


def _pattern(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: a key matches a module whose name ends with it (as a regular expression)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class Pair:
    """One adapted module: delta = scaling · B·A (an embedding's is (B·A)ᵀ), in f32, in HF's layout."""

    module: str  # the HF parameter it changes, e.g. gpt_neox.layers.0.attention.query_key_value.weight
    a: np.ndarray | None = None  # (r, in); an embedding's (r, vocab)
    b: np.ndarray | None = None  # (out, r); an embedding's (d, r)
    scaling: float = 1.0
    embedding: bool = False
    magnitude: np.ndarray | None = None  # DoRA: the trained norm of each output row
    b_bias: np.ndarray | None = None  # lora_bias: B's own bias, added (scaled) to the layer's

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self, rows: slice = slice(None)) -> np.ndarray:
        """scaling · B·A for these output rows (all by default), f32."""
        if self.embedding:
            return self.scaling * (self.b @ self.a[:, rows]).T
        return self.scaling * (self.b[rows] @ self.a)


@dataclass
class Adapter:
    folder: Path
    config: LoraConfig
    pairs: dict[str, Pair]  # by the HF parameter each changes
    whole: dict[str, np.ndarray] = field(default_factory=dict)  # tensors it replaces: trained biases, saved modules
    nbytes: int = 0
    # the shapes of the base's embedding layers PEFT saved beside a LoRA on them (save_embedding_layers): frozen
    # copies, equal to the base's unless the vocabulary was resized (which check_fits refuses)
    embeddings: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.resolve().name

    def files(self) -> list[Path]:
        """Its own files (a conversion's -o must not be one of them)."""
        return [self.folder / name for name in (CONFIG, *WEIGHTS) if (self.folder / name).exists()]

    def unmergeable_at_run_time(self) -> str | None:
        """What llama.cpp's run-time LoRA cannot apply, as a phrase (None: nothing)."""
        if any(p.magnitude is not None for p in self.pairs.values()) or self.config.dora:
            return "DoRA (use_dora: a trained magnitude per row)"
        if any(p.b_bias is not None for p in self.pairs.values()):
            return "a bias on lora_B (lora_bias)"
        if any(p.embedding for p in self.pairs.values()):
            return "a LoRA on the token embedding (embed_in)"
        saved = [n for n in self.whole if not n.endswith(".bias")]
        if saved:
            return f"whole modules saved with it (modules_to_save: {saved[0].removesuffix('.weight')})"
        if self.whole:
            return f"trained biases (bias={self.config.bias!r})"
        return None


def read(folder: Path) -> Adapter:
    """The adapter in `folder`, checked for what it says of itself (its base is checked later, by its shapes)."""
    if not folder.is_dir():
        raise AdapterError(f"{folder} is not a directory: give the folder of a PEFT adapter "
                           f"({CONFIG} and adapter_model.safetensors)")
    config = read_config(folder)
    weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise AdapterError(f"no adapter weights in {folder}: expected {' or '.join(WEIGHTS)} beside {CONFIG}")
    tensors = read_file(weights)
    pairs: dict[str, Pair] = {}
    whole: dict[str, np.ndarray] = {}
    embeddings: dict[str, tuple[int, ...]] = {}
    for key, raw in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"{weights.name}: tensor {key!r} is not a PEFT adapter's (they start with {PREFIX}); "
                               "is this a base model's file?")
        data = as_f32(raw.dtype, raw.data)
        if not np.isfinite(data).all():
            raise AdapterError(f"{weights.name}: tensor {key} holds NaN or infinite values; the adapter is corrupt "
                               "or its training diverged")
        m = _LORA_KEY.fullmatch(key[len(PREFIX):])
        if m is None:  # a whole tensor: a trained bias, or a module saved with the adapter
            name = _canonical(key[len(PREFIX):])
            if name.endswith(".base_layer.weight"):  # PEFT's save_embedding_layers: the base's own, frozen
                embeddings[name.replace(".base_layer.", ".")] = data.shape
            else:
                whole[name.replace(".base_layer.", ".")] = data
            continue
        module = _canonical(m["module"])
        pair = pairs.setdefault(module + ".weight", Pair(module + ".weight", scaling=config.scaling(m["module"])))
        kind, param = m["kind"], m["param"]
        if kind in ("lora_A", "lora_embedding_A"):
            pair.a = data
        elif kind == "lora_B" and param == "bias":
            pair.b_bias = data
        elif kind in ("lora_B", "lora_embedding_B"):
            pair.b = data
        else:
            pair.magnitude = data
        pair.embedding = pair.embedding or kind.startswith("lora_embedding")
    for pair in pairs.values():
        _check_pair(pair, weights.name)
    if not pairs and not whole:
        raise AdapterError(f"{weights.name} holds no LoRA weights; download the adapter again")
    return Adapter(folder, config, pairs, whole, sum(t.data.nbytes for t in tensors.values()), embeddings)


def _canonical(name: str) -> str:
    head, _, rest = name.partition(".")
    return f"{ALIASES.get(head, head)}{'.' + rest if rest else ''}"


def _check_pair(pair: Pair, where: str) -> None:
    module = pair.module.removesuffix(".weight")
    if pair.a is None or pair.b is None:
        raise AdapterError(f"{where}: {module} has lora_{'A' if pair.a is None else 'B'} missing; download the "
                           "adapter again")
    if pair.a.ndim != 2 or pair.b.ndim != 2 or pair.a.shape[0] != pair.b.shape[1]:
        raise AdapterError(f"{where}: {module}'s lora_A {list(pair.a.shape)} and lora_B {list(pair.b.shape)} do not "
                           "multiply; the adapter is corrupt")
    if not 1 <= pair.rank <= MAX_RANK:
        raise AdapterError(f"{where}: {module} has rank {pair.rank}; expected 1 to {MAX_RANK}")
    if pair.magnitude is not None and pair.magnitude.shape != (pair.b.shape[0],):
        raise AdapterError(f"{where}: {module}'s DoRA magnitude has shape {list(pair.magnitude.shape)}, not one "
                           "value per output row; the adapter is corrupt")


def read_config(folder: Path) -> LoraConfig:
    path = folder / CONFIG
    if not path.is_file():
        raise AdapterError(f"no {CONFIG} in {folder}: give the folder of a PEFT LoRA adapter")
    raw = files.parse_json(files.read_user_bytes(path, "", limit=MAX_CONFIG), str(path),
                           "download the adapter's adapter_config.json again")
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} is not a JSON object; download the adapter again")
    kind = raw.get("peft_type", "LORA")
    if kind != "LORA":
        raise AdapterError(f"{path}: a {kind} adapter; malhae converts LoRA adapters (peft_type LORA)")

    def number(key: str, value: object, *, whole: bool = False, low: float = 0.0) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and value >= low and (not whole or float(value).is_integer()) and abs(value) <= MAX_RANK * 1e3
        if not ok:
            shown = repr(value)[:40]
            raise AdapterError(f"{path}: {key} is {shown}; expected a {'whole ' if whole else ''}number "
                               f"{'of at least 1' if low else '0 or more'}; download the adapter again")
        return float(value)

    r = int(number("r", raw.get("r"), whole=True, low=1))
    alpha = number("lora_alpha", raw.get("lora_alpha", r))

    def table(key: str, whole: bool) -> dict:
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise AdapterError(f"{path}: {key} is not an object; download the adapter again")
        return {str(k): (int if whole else float)(number(f"{key}[{k!r}]", v, whole=whole, low=1 if whole else 0))
                for k, v in value.items()}

    def flag(key: str) -> bool:
        value = raw.get(key) or False
        if not isinstance(value, bool):
            raise AdapterError(f"{path}: {key} is {value!r}; expected true or false")
        return value

    bias = raw.get("bias", "none") or "none"
    if bias not in ("none", "all", "lora_only"):
        raise AdapterError(f"{path}: bias is {bias!r}; expected none, all or lora_only")
    saved = raw.get("modules_to_save") or []
    base = raw.get("base_model_name_or_path")
    if raw.get("layers_to_transform") is not None and raw.get("layer_replication"):
        raise AdapterError(f"{path}: layer_replication changes the model's layers; malhae cannot convert it")
    return LoraConfig(r=r, alpha=alpha, rslora=flag("use_rslora"), dora=flag("use_dora"), bias=bias,
                      modules_to_save=tuple(str(s) for s in saved) if isinstance(saved, list) else (),
                      rank_pattern=table("rank_pattern", True), alpha_pattern=table("alpha_pattern", False),
                      fan_in_fan_out=flag("fan_in_fan_out"), base=base if isinstance(base, str) and base else None)

