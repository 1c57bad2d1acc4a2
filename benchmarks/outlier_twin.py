"""A twin of the demo model with outlier channels: the same function, the activation statistics of a large model.

    python benchmarks/outlier_twin.py OUT_DIR [--src models/demo/hf] [--scale 32] [--channels 6] [--seed 0]

Why: the importance matrix matters when a few input columns of a matrix carry far larger activations than the rest,
which is what large language models develop (the "outlier features" of LLM.int8(), from about 6.7B parameters on).
The 8.6M-parameter demo has no such channels, so an imatrix gains it little; real Polyglot-Ko weights cannot be had
here. The twin puts them in without changing what the model computes (the SmoothQuant equivalence, run backwards):

  * a few channels c of each layer norm get weight and bias × s, and the columns c of the matrix the norm feeds
    (attn_qkv after the input norm, ffn_up after the post-attention norm) get ÷ s: the product is unchanged, but those
    inputs are now s times larger than the others;
  * a few value dimensions d (rows of the V part of attn_qkv, and their bias) get × s and the columns d of attn_output
    get ÷ s: attention is linear in V, so again the output is unchanged and attn_output sees outlier inputs.

s is a power of two, so in fp16 the scaled weights are exact (they stay far from fp16's subnormals). A quantizer
without an imatrix spends its precision on the ordinary columns, where the weights are large; with one, on the
columns that meet the large activations. ffn_down is left alone (GELU is not linear).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent


def build(src: Path, out: Path, *, scale: float = 32.0, channels: int = 6, seed: int = 0) -> Path:
    """Write the twin of the checkpoint at `src` into `out` (config, tokenizer, model.safetensors); returns `out`."""
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    hidden, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    head_dim = hidden // heads
    state = {k: v.astype(np.float32) for k, v in load_file(src / "model.safetensors").items()}
    rng = np.random.default_rng(seed)
    s = float(scale)
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        for norm, matrix in (("input_layernorm", "attention.query_key_value"),
                             ("post_attention_layernorm", "mlp.dense_h_to_4h")):
            c = rng.choice(hidden, channels, replace=False)
            state[p + norm + ".weight"][c] *= s
            state[p + norm + ".bias"][c] *= s
            state[p + matrix + ".weight"][:, c] /= s
        d = rng.choice(hidden, channels, replace=False)  # value dimensions, as columns of attn_output
        rows = (d // head_dim) * 3 * head_dim + 2 * head_dim + d % head_dim  # NeoX packs q, k, v per head
        state[p + "attention.query_key_value.weight"][rows] *= s
        state[p + "attention.query_key_value.bias"][rows] *= s
        state[p + "attention.dense.weight"][:, d] /= s
    out.mkdir(parents=True, exist_ok=True)
    for name in src.iterdir():
        if name.is_file() and name.name != "model.safetensors":
            shutil.copy2(name, out / name.name)
    save_file({k: v.astype(np.float16) for k, v in state.items()}, out / "model.safetensors")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--src", type=Path, default=ROOT / "models" / "demo" / "hf")
    p.add_argument("--scale", type=float, default=32.0)
    p.add_argument("--channels", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(build(args.src, args.out, scale=args.scale, channels=args.channels, seed=args.seed))


if __name__ == "__main__":
    main()
