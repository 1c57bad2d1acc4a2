"""Read a GPT-NeoX config.json written by transformers 4 or 5 into the numbers llama.cpp needs.

The published Polyglot-Ko files carry transformers-4 keys (`rotary_pct`, `rotary_emb_base`, no
`use_parallel_residual`); files saved by transformers 5 carry `rope_parameters` instead. Both must work, and nothing
is assumed that the file does not say (the rotary fraction in particular varies across the family's fine-tunes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from malhae import files
from malhae.errors import UserError

SUPPORTED_ARCHITECTURES = ("GPTNeoXForCausalLM",)
MAX_CONFIG = 1 << 24  # a config.json is a few KB; 16 MB is no model's
# llama.cpp's gptneox graph uses the tanh GELU; these activations are the same function or close approximations of it.
GELU_ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python")


# ceilings far above any GPT-NeoX published (polyglot-ko-12.8b: 5,120 wide, 40 layers, 40 heads, 20,480 in the MLP,
# 30,080 tokens, 2,048 positions) and low enough that nothing sized from them is allocated before the weights are read
LIMITS = {"hidden_size": 1 << 16, "num_attention_heads": 1 << 10, "num_hidden_layers": 1 << 10,
          "intermediate_size": 1 << 18, "vocab_size": 1 << 22, "max_position_embeddings": 1 << 24}
SHOWN = 60  # characters of a wrong value quoted in an error


class ConfigError(UserError):
    pass


def _wrong(path: Path, key: str, value: object, expected: str) -> ConfigError:
    shown = repr(value)
    shown = shown if len(shown) <= SHOWN else shown[:SHOWN] + "…"
    return ConfigError(f"{path}: {key!r} is {shown}; expected {expected}; download the model's config.json again")


@dataclass(frozen=True)
class NeoXConfig:
    n_layer: int
    n_embd: int
    n_head: int
    n_ff: int
    n_vocab: int
    n_ctx: int
    rotary_fraction: float
    rope_theta: float
    layer_norm_eps: float
    parallel_residual: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    name_or_path: str | None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_rot(self) -> int:
        return int(self.rotary_fraction * self.head_dim)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every HF parameter this config implies (buffers excluded)."""
        d, f, v = self.n_embd, self.n_ff, self.n_vocab
        shapes: dict[str, tuple[int, ...]] = {
            "gpt_neox.embed_in.weight": (v, d),
            "gpt_neox.final_layer_norm.weight": (d,),
            "gpt_neox.final_layer_norm.bias": (d,),
        }
        if not self.tie_word_embeddings:
            shapes["embed_out.weight"] = (v, d)
        for i in range(self.n_layer):
            p = f"gpt_neox.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (d,), p + "input_layernorm.bias": (d,),
                p + "post_attention_layernorm.weight": (d,), p + "post_attention_layernorm.bias": (d,),
                p + "attention.query_key_value.weight": (3 * d, d), p + "attention.query_key_value.bias": (3 * d,),
                p + "attention.dense.weight": (d, d), p + "attention.dense.bias": (d,),
                p + "mlp.dense_h_to_4h.weight": (f, d), p + "mlp.dense_h_to_4h.bias": (f,),
                p + "mlp.dense_4h_to_h.weight": (d, f), p + "mlp.dense_4h_to_h.bias": (d,),
            })
        return shapes


def _int_or_none(value: object) -> int | None:
    if isinstance(value, list):  # transformers allows a list of eos ids; the first is the canonical one
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def read_config(model_dir: Path) -> NeoXConfig:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir} is not a directory: give the folder of a Hugging Face model "
                          "(config.json, tokenizer.json and the weights)")
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir}: give the folder of a Hugging Face model "
                          "(config.json, tokenizer.json and the weights)")
    data = files.read_user_bytes(path, "", limit=MAX_CONFIG)
    raw = files.parse_json(data, str(path), "download the model's config.json again")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a JSON object; download the model's config.json again")

    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise _wrong(path, "architectures", archs, "a list of names")
    model_type = raw.get("model_type")
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and not (not archs and model_type == "gpt_neox"):
        found = ", ".join(archs) or f"model_type {model_type!r}"
        raise ConfigError(f"{model_dir} is a {found} model; malhae converts GPT-NeoX models "
                          "(GPTNeoXForCausalLM: the Polyglot-Ko family, KoAlpaca-Polyglot, KULLM-Polyglot)")

    def need(key: str) -> int:
        value = raw.get(key)
        if value is None:
            raise ConfigError(f"{path} lacks a positive integer {key!r}; it is not a complete GPT-NeoX config")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= LIMITS[key]:
            raise _wrong(path, key, value, f"a positive integer up to {LIMITS[key]:,}")
        return value

    def number(key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _wrong(path, key, value, "a number")
        return float(value)

    def table(key: str, value: object) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _wrong(path, key, value, "an object (or none)")
        return value

    def first(*places: tuple[str, dict, str]) -> tuple[str, object]:
        """The first of several spellings of one setting that the file gives: (its name, its value)."""
        for name, where, key in places:
            if key in where:
                return name, where[key]
        return places[0][0], None

    n_embd, n_head = need("hidden_size"), need("num_attention_heads")
    if n_embd % n_head:
        raise ConfigError(f"{path}: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}")

    rope = table("rope_parameters", raw.get("rope_parameters"))
    rope_type = rope.get("rope_type", "default")
    scaling = table("rope_scaling", raw.get("rope_scaling"))
    if rope_type != "default" or (scaling and scaling.get("type", scaling.get("rope_type")) not in (None, "default")):
        raise ConfigError(f"{path} asks for RoPE scaling ({scaling or rope_type}); malhae converts unscaled "
                          "GPT-NeoX models only")
    name, fraction = first(("rope_parameters.partial_rotary_factor", rope, "partial_rotary_factor"),
                           ("rotary_pct", raw, "rotary_pct"), ("partial_rotary_factor", raw, "partial_rotary_factor"))
    if fraction is None:
        raise ConfigError(f"{path} gives no rotary fraction (rotary_pct or rope_parameters.partial_rotary_factor)")
    if not 0 < number(name, fraction) <= 1:
        raise _wrong(path, name, fraction, "a fraction of the head, above 0 and at most 1")
    name, theta = first(("rope_parameters.rope_theta", rope, "rope_theta"),
                        ("rotary_emb_base", raw, "rotary_emb_base"), ("rope_theta", raw, "rope_theta"))
    if theta is None:
        raise ConfigError(f"{path} gives no RoPE base (rotary_emb_base or rope_parameters.rope_theta)")
    theta = number(name, theta)

    def text(key: str) -> str | None:
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise _wrong(path, key, value, "a text")
        return value or None

    act = raw.get("hidden_act", "gelu")
    if act not in GELU_ACTIVATIONS:
        raise ConfigError(f"{path}: activation {act!r} is not supported by llama.cpp's GPT-NeoX (GELU only)")
    if raw.get("attention_bias", True) is False:
        raise ConfigError(f"{path}: attention without bias (attention_bias=false) is not supported by llama.cpp's "
                          "GPT-NeoX")

    return NeoXConfig(
        n_layer=need("num_hidden_layers"),
        n_embd=n_embd,
        n_head=n_head,
        n_ff=need("intermediate_size"),
        n_vocab=need("vocab_size"),
        n_ctx=need("max_position_embeddings"),
        rotary_fraction=float(fraction),
        rope_theta=theta,
        layer_norm_eps=number("layer_norm_eps", raw.get("layer_norm_eps", 1e-5)),
        parallel_residual=bool(raw.get("use_parallel_residual", True)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=_int_or_none(raw.get("bos_token_id")),
        eos_token_id=_int_or_none(raw.get("eos_token_id")),
        pad_token_id=_int_or_none(raw.get("pad_token_id")),
        name_or_path=text("_name_or_path"),
    )
