"""Quantization quality of the demo model: what each output type of `malhae convert` costs in agreement and perplexity.

    python benchmarks/quant_quality.py [--src models/demo/hf] [--types f16 q8_0 …] [--n-ctx 512] [--threads N]

Converts the committed demo checkpoint (models/demo/hf) with the project's converter into each type, in a temporary
directory, and measures every file through llama.cpp on the two bills the demo model never saw in training:

- top-1 agreement with F16: the share of all positions of the held-out text (evaluated in non-overlapping windows of
  n_ctx tokens, each from an empty cache) where the quantized file's most likely next token is F16's;
- mean KL divergence of the file's next-token distribution from F16's, over the positions perplexity scores (what
  llama-perplexity --kl-divergence reports): the most sensitive of the three;
- held-out perplexity, computed by app.perplexity exactly as llama-perplexity computes it, and its ratio to F16's.
  On text this far from the training data it barely moves until Q2_K (the model's own uncertainty dominates), so
  read it together with the other two columns.

Why: the tests hold Q8_0 and Q4_K_M to bounds set from these numbers, and the model card quotes the table, so there
is one script that produces them. It is a measurement, not a test: nothing here asserts or times anything. The
numbers describe this 8.6 M-parameter model; they are not a prediction for the family's 1.3B-12.8B models.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.llama import Context, Model  # noqa: E402
from app.perplexity import perplexity, windows  # noqa: E402
from convert import pipeline  # noqa: E402

BILLS = ROOT / "models" / "data" / "ko-public-domain" / "bills"
HELD_OUT = ("1809898.txt", "1809899.txt")
TYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"]


def held_out_text() -> str:
    return "\n".join((BILLS / name).read_text(encoding="utf-8") for name in HELD_OUT)


def evaluate(path: Path, chunks: list[list[int]], n_ctx: int, threads: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The argmax next token at every position of every window, and the log-probabilities at the positions
    perplexity scores (the second half of each window), for the KL divergence from F16."""
    tops, logprobs = [], []
    with Model(path) as model, Context(model, n_ctx=n_ctx, n_batch=min(n_ctx, 512), threads=threads) as ctx:
        for chunk in chunks:
            logits = ctx.logits(chunk)
            tops.append(logits.argmax(-1))
            scored = logits[n_ctx // 2:n_ctx - 1].astype(np.float64)
            peak = scored.max(-1, keepdims=True)
            logprobs.append((scored - peak - np.log(np.exp(scored - peak).sum(-1, keepdims=True))).astype(np.float32))
    return np.concatenate(tops), np.concatenate(logprobs)


def kl_divergence(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean KL(F16 ‖ quantized) per scored position, in nats (as llama-perplexity --kl-divergence reports it)."""
    p = np.exp(ref.astype(np.float64))
    return float((p * (ref.astype(np.float64) - got.astype(np.float64))).sum(-1).mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=ROOT / "models" / "demo" / "hf")
    p.add_argument("--types", nargs="+", default=TYPES)
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    types = ["f16"] + [t for t in args.types if t != "f16"]  # F16 is the reference for both columns

    text = held_out_text()
    rows = []
    with tempfile.TemporaryDirectory(prefix="malhae-quant-") as tmp:
        reference: tuple[np.ndarray, np.ndarray] | None = None
        ref_ppl = float("nan")
        chunks: list[list[int]] = []
        for type_name in types:
            result = pipeline.convert(args.src, type_name, Path(tmp) / f"demo-{type_name}.gguf", threads=args.threads)
            if not chunks:
                with Model(result.path, vocab_only=True) as vocab:
                    chunks = windows(vocab.tokenize(text, parse_special=False), args.n_ctx)
            top, logprobs = evaluate(result.path, chunks, args.n_ctx, args.threads)
            ppl, scored = perplexity(result.path, text, n_ctx=args.n_ctx, threads=args.threads)
            if reference is None:
                reference, ref_ppl = (top, logprobs), ppl
            rows.append((type_name, result.size, result.bits_per_weight, float((top == reference[0]).mean()),
                         kl_divergence(reference[1], logprobs), ppl, ppl / ref_ppl))
            print(f"{type_name}: done", file=sys.stderr, flush=True)

    positions = sum(len(c) for c in chunks)
    print(f"held-out text: bills {', '.join(HELD_OUT)}; {len(chunks)} windows of {args.n_ctx} tokens; top-1 over "
          f"{positions} positions; perplexity over {scored} tokens (second half of each window)\n")
    print("| type | size | bits/weight | top-1 agreement with F16 | KL divergence from F16 | held-out perplexity "
          "| ratio to F16 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for type_name, size, bpw, agree, kld, ppl, ratio in rows:
        print(f"| {type_name.upper()} | {size / 1e6:.2f} MB | {bpw:.2f} | {agree:.4f} | {kld:.5f} | {ppl:.2f} "
              f"| {ratio:.4f} |")

if __name__ == "__main__":
    main()
