"""A 1.27B-parameter "heavy twin" of the bundled demo model: the demo's exact function at a real model's cost.

    python benchmarks/heavy_twin.py [--out DIR] [--type q4_k_m] [--ff 102400] [--layers 24] [--seed 0]
                                    [--threads N] [--check]

Why: speculative decoding pays off only when decoding is memory-bound, i.e. when every token reads far more weight
bytes than the CPU can stream from cache. The demo (GPT-NeoX, 6 layers, hidden 256, ff 1024, ~6M parameters) fits in
cache, so a draft/verify speed-up measured on it would mean nothing; a random model of the right size would be heavy
but its drafts would never be accepted. The twin is both: it reads ~1.27B weights per token and yet its greedy output
is the demo's, so acceptance rates are the demo's and costs are a 1.3B model's.

How (GPT-NeoX layer: x + attn(ln1(x)) + mlp(ln2(x)) with parallel residual; x + attn(ln1(x)) then + mlp(ln2(·))
without):
  * the 6 trained layers keep their weights; their MLP is widened to `ff` with zero up-projection rows and biases
    (GELU(0) = 0) and zero down-projection columns, so the extra units contribute exactly 0;
  * layers 6..`layers`-1 are identity layers: random (N(0, 0.02)) QKV and MLP-up weights and biases, so llama.cpp does
    all the work of a real layer, but zero attention-output weight AND bias and zero MLP-down weight AND bias, so both
    branches add exactly 0 and the residual stream passes through unchanged — under either residual form. Their
    layer norms are ones/zeros (any values would do; they only feed the zeroed branches).
  * embeddings, final norm, output head, rotary and attention settings are the demo's, untouched.

The checkpoint is written one safetensors shard per layer (with a model.safetensors.index.json), so building it holds
one layer (~105 MB) at a time, never the 2.5 GB model; then malhae's own converter (convert.pipeline.convert) makes the
F16 GGUF, and llama.cpp's quantizer (convert.quantize, the step the pipeline itself runs for k-quants) makes the other
types from that F16 file instead of writing a second 2.5 GB staging copy. Every product is cached under --out: an
existing checkpoint with the same parameters is reused, and so is a GGUF made from it (one older than the checkpoint
is made again).

--check proves the claim: the greedy continuations (64 tokens) of a few Korean prompts from the bundled constitution
text, by llama.cpp through malhae's runtime, from the twin's F16 GGUF and the demo's F16 GGUF must be identical; the
quantized twin's agreement is reported too, but quantization changes the function, so it is not required to match.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from malhae.runtime.settings import LoadOptions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEMO_HF = ROOT / "models" / "demo" / "hf"
DEMO_GGUF = ROOT / "models" / "malhae-demo-ko-f16.gguf"
PROMPT_TEXT = ROOT / "models" / "data" / "ko-public-domain" / "constitution.txt"
DEFAULT_OUT = Path("/tmp/twin")
NAME = "heavy-twin"
STAMP = "heavy_twin.json"  # written last: its presence (with matching parameters) means the checkpoint is complete
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
INIT_STD = 0.02  # GPT-NeoX's initializer_range: realistic magnitudes for the random (but muted) weights


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _widened_layer(weights: dict[str, np.ndarray], p: str, ff: int) -> dict[str, np.ndarray]:
    """A trained layer with its MLP widened to `ff` by zero units: same output, `ff / ff0` times the work."""
    layer = {k: v for k, v in weights.items() if k.startswith(p)}
    up_w, up_b = layer[p + "mlp.dense_h_to_4h.weight"], layer[p + "mlp.dense_h_to_4h.bias"]
    down_w = layer[p + "mlp.dense_4h_to_h.weight"]
    ff0, hidden = up_w.shape
    wide_up_w = np.zeros((ff, hidden), dtype=up_w.dtype)
    wide_up_w[:ff0] = up_w
    wide_up_b = np.zeros(ff, dtype=up_b.dtype)
    wide_up_b[:ff0] = up_b
    wide_down_w = np.zeros((hidden, ff), dtype=down_w.dtype)
    wide_down_w[:, :ff0] = down_w
    layer.update({p + "mlp.dense_h_to_4h.weight": wide_up_w, p + "mlp.dense_h_to_4h.bias": wide_up_b,
                  p + "mlp.dense_4h_to_h.weight": wide_down_w})  # dense_4h_to_h.bias: the trained one, kept
    return layer


def _identity_layer(p: str, hidden: int, ff: int, dtype: np.dtype, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A layer that costs a full layer's compute and adds exactly 0 to the residual stream."""
    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * INIT_STD).astype(dtype)

    def zeros(*shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    return {
        p + "input_layernorm.weight": np.ones(hidden, dtype=dtype), p + "input_layernorm.bias": zeros(hidden),
        p + "post_attention_layernorm.weight": np.ones(hidden, dtype=dtype),
        p + "post_attention_layernorm.bias": zeros(hidden),
        p + "attention.query_key_value.weight": rand(3 * hidden, hidden),
        p + "attention.query_key_value.bias": rand(3 * hidden),
        p + "attention.dense.weight": zeros(hidden, hidden), p + "attention.dense.bias": zeros(hidden),
        p + "mlp.dense_h_to_4h.weight": rand(ff, hidden), p + "mlp.dense_h_to_4h.bias": rand(ff),
        p + "mlp.dense_4h_to_h.weight": zeros(hidden, ff), p + "mlp.dense_4h_to_h.bias": zeros(hidden),
    }


def _check_identity(layer: dict[str, np.ndarray], p: str) -> None:
    """Both branch outputs must be zero, weight and bias, or the layer is not the identity."""
    muted = ("attention.dense.weight", "attention.dense.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")
    for name in muted:
        if np.any(layer[p + name]):
            raise AssertionError(f"{p + name} is not all zero: layer {p} would change the residual stream")


def build(src_hf_dir: Path, out_dir: Path, *, ff: int = 102400, layers: int = 24, seed: int = 0) -> Path:
    """Write the twin of the GPT-NeoX checkpoint `src_hf_dir` into `out_dir` (sharded safetensors, config, tokenizer)
    and return `out_dir`; a complete twin already there with the same parameters is reused as it is."""
    cfg = json.loads((src_hf_dir / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") != "gpt_neox":
        raise ValueError(f"{src_hf_dir} is a {cfg.get('model_type')!r} model; the twin is made for GPT-NeoX")
    hidden, ff0, n0 = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    if ff < ff0 or layers < n0:
        raise ValueError(f"the twin can only grow the model: ff {ff} < {ff0} or layers {layers} < {n0}")
    params = {"source": str(src_hf_dir.resolve()), "ff": ff, "layers": layers, "seed": seed}
    stamp = out_dir / STAMP
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == params:
        return out_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    for old in out_dir.glob("model*.safetensors*"):  # a killed build or one with other parameters
        old.unlink()
    # the demo is ~12 MB: loading it whole is fine (bf16 checkpoints would need another reader: numpy has no bf16)
    weights = load_file(src_hf_dir / "model.safetensors")
    dtype = weights["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].dtype
    rng = np.random.default_rng(seed)
    n_shards = layers + 1
    weight_map: dict[str, str] = {}
    total = 0

    def write(i: int, tensors: dict[str, np.ndarray]) -> None:
        nonlocal total
        name = _shard_name(i, n_shards)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out_dir / name,
                  metadata={"format": "pt"})  # "pt": transformers refuses shards without a format it knows
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(v.nbytes for v in tensors.values())

    write(1, {k: v for k, v in weights.items() if ".layers." not in k})  # embeddings, final norm, head
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        if i < n0:
            write(i + 2, _widened_layer(weights, p, ff))
        else:
            layer = _identity_layer(p, hidden, ff, dtype, rng)
            _check_identity(layer, p)
            write(i + 2, layer)
            del layer

    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    cfg.update(intermediate_size=ff, num_hidden_layers=layers)  # rotary, heads, norms, vocab: the demo's, unchanged
    cfg.pop("_name_or_path", None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    for name in TOKENIZER_FILES:
        if (src_hf_dir / name).is_file():
            shutil.copyfile(src_hf_dir / name, out_dir / name)
    stamp.write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
    return out_dir


def gguf_path(out_dir: Path, type_name: str) -> Path:
    return out_dir / f"{NAME}-{type_name}.gguf"


def _fresh(path: Path, hf_dir: Path) -> bool:
    """Whether a cached GGUF was made from the checkpoint now in `hf_dir`: a twin rebuilt with another --ff, --layers
    or --seed is newer than every GGUF made from its predecessor, which must not be passed off as its own."""
    made_from = hf_dir / STAMP if (hf_dir / STAMP).is_file() else hf_dir / "config.json"
    return path.stat().st_mtime >= made_from.stat().st_mtime


def make_gguf(hf_dir: Path, out_dir: Path, type_name: str, *, threads: int | None = None) -> Path:
    """The twin as a GGUF of `type_name` (cached). F16 (and the other directly written types) comes from malhae's
    converter; a quantizer type is made by llama.cpp's quantizer from the F16 GGUF, which is the very step
    convert.pipeline takes after writing its own temporary F16 — so the bytes are the same, without 2.5 GB written
    twice."""
    from malhae import files
    from malhae.convert import pipeline, quantize
    from malhae.convert import types as out_types
    from malhae.runtime.llama import init

    otype = out_types.get(type_name)
    target = gguf_path(out_dir, otype.name)
    if target.exists():
        if _fresh(target, hf_dir):
            return target
        target.unlink()
    init(verbose=False)
    if otype.direct is not None:
        pipeline.convert(hf_dir, otype.name, target, name=NAME, threads=threads)
        return target
    f16 = make_gguf(hf_dir, out_dir, "f16", threads=threads)
    with files.partial(target, "quantized") as tmp:
        quantize.quantize(f16, tmp, int(otype.ftype), threads)
        os.replace(tmp, target)
    return target


# --- --check: same greedy text as the demo ---------------------------------------------------------------------

@dataclass
class Greedy:
    prompt_tokens: list[list[int]]
    continuations: list[list[int]]
    logits: list[np.ndarray]  # per prompt: every prompt row, then every generation step; to show Δ is exactly 0
    seconds_per_token: float


def prompts(n: int = 3, chars: int = 40) -> list[str]:
    """`n` Korean prompts: the openings of paragraphs spread over the bundled constitution text."""
    lines = [line.strip() for line in PROMPT_TEXT.read_text(encoding="utf-8").splitlines() if len(line.strip()) > chars]
    return [lines[i * (len(lines) - 1) // max(1, n - 1)][:chars] for i in range(n)]


def greedy(path: Path, texts: list[str], n_new: int = 64, threads: int = 2) -> Greedy:
    """Argmax continuation by llama.cpp: prompt in one batch, then one token per decode, as generation does.

    Logits are asked for on every prompt row, not just the last: llama.cpp drops the rows nobody reads before its
    last layer, and the demo's last layer is a trained one while the twin's is an identity layer, so with only the
    last row wanted the demo's layer 5 runs on 1 row and the twin's on all of them — another matmul kernel, and
    logits that differ in the last bits (seen: 3e-4). With all rows the two compute the same shapes and agree exactly.
    ms/token is only indicative: other work on the machine slows it (benchmarks/verify_cost.py measures costs).
    """
    from malhae.runtime.llama import Batch, Context, Model

    out = Greedy([], [], [], 0.0)
    seconds, steps = 0.0, 0
    with Model(path) as model:
        tokenized = [model.tokenize(t) for t in texts]
        n_ctx = max(len(t) for t in tokenized) + n_new + 8
        with Context(model, LoadOptions(ctx=n_ctx, threads=threads)) as ctx, Batch(n_ctx) as batch:
            for tokens in tokenized:
                ctx.clear()
                batch.fill(tokens, range(len(tokens)))
                ctx.decode(batch)
                rows = [ctx.output_logits(len(tokens)).copy()]
                new, pos = [int(rows[0][-1].argmax())], len(tokens)
                start = time.perf_counter()
                while len(new) < n_new:
                    batch.fill([new[-1]], [pos])
                    ctx.decode(batch)
                    rows.append(ctx.output_logits(1).copy())
                    new.append(int(rows[-1][0].argmax()))
                    pos += 1
                seconds += time.perf_counter() - start
                steps += n_new - 1
                out.prompt_tokens.append(tokens)
                out.continuations.append(new)
                out.logits.append(np.concatenate(rows))
    out.seconds_per_token = seconds / max(1, steps)
    return out


def _agreement(ref: Greedy, other: Greedy) -> list[int]:
    """Per prompt: how many leading continuation tokens agree (len == n_new: all of them)."""
    rows = []
    for a, b in zip(ref.continuations, other.continuations, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        rows.append(n)
    return rows


def check(twin_f16: Path, twin_other: Path | None, *, threads: int, n_new: int = 64) -> bool:
    """Print the agreement table; True when the F16 twin's continuations equal the demo's exactly."""
    texts = prompts()
    runs = {"demo f16": greedy(DEMO_GGUF, texts, n_new, threads), "twin f16": greedy(twin_f16, texts, n_new, threads)}
    if twin_other is not None:
        runs[f"twin {twin_other.stem.removeprefix(NAME + '-')}"] = greedy(twin_other, texts, n_new, threads)
    ref = runs["demo f16"]
    print(f"\ngreedy continuations, {n_new} tokens, {threads} threads; prompts:")
    for i, t in enumerate(texts):
        print(f"  {i + 1}. {t!r} ({len(ref.prompt_tokens[i])} tokens)")
    print("\n| model | tokens agreeing with demo f16, per prompt | max \\|Δ logit\\| | ms/token |")
    print("|---|---|---|---|")
    exact = True
    for label, run in runs.items():
        same_prompt = run.prompt_tokens == ref.prompt_tokens
        agree = _agreement(ref, run)
        # over the prompt rows and the steps both models took alike (after a divergence the inputs differ)
        delta = max(float(np.abs(a[:len(p) + n] - b[:len(p) + n]).max())
                    for a, b, p, n in zip(ref.logits, run.logits, ref.prompt_tokens, agree, strict=True))
        print(f"| {label} | {' / '.join(f'{n}/{n_new}' for n in agree)}{'' if same_prompt else ' (prompt differs!)'} "
              f"| {delta:.3g} | {run.seconds_per_token * 1000:.1f} |")
        if label == "twin f16":
            exact = same_prompt and all(n == n_new for n in agree)
    print(f"\ntwin f16 {'==' if exact else '!='} demo f16")
    return exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--type", default="q4_k_m", help="GGUF type to make (default q4_k_m; f16 is always made)")
    parser.add_argument("--src", type=Path, default=DEMO_HF, help="the checkpoint to twin (default: the demo)")
    parser.add_argument("--ff", type=int, default=102400)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="for quantizing and --check (default 2)")
    parser.add_argument("--check", action="store_true", help="compare greedy output with the demo GGUF")
    args = parser.parse_args()

    start = time.perf_counter()
    hf = build(args.src, args.out / "hf", ff=args.ff, layers=args.layers, seed=args.seed)
    print(f"checkpoint {hf} ({time.perf_counter() - start:.1f} s)", flush=True)
    made = {}
    for type_name in dict.fromkeys(["f16", args.type.lower()]):
        t0 = time.perf_counter()
        made[type_name] = make_gguf(hf, args.out, type_name, threads=args.threads)
        print(f"{made[type_name]} ({made[type_name].stat().st_size / 2**30:.2f} GiB, {time.perf_counter() - t0:.1f} s)",
              flush=True)
    if args.check:
        if args.src.resolve() != DEMO_HF.resolve():
            raise SystemExit("--check compares with the demo GGUF: it needs --src to be the demo checkpoint")
        other = made.get(args.type.lower()) if args.type.lower() != "f16" else None
        if not check(made["f16"], other, threads=args.threads):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
