"""Quantization loss on the demo model: what each output type of `malhae convert` costs, measured by app.eval.compare
(the library behind `malhae eval compare`) against F16.

    python benchmarks/quant_quality.py [--src models/demo/hf] [--types f16 q8_0 …] [--n-ctx 512] [--threads N]

Converts the committed demo checkpoint (models/demo/hf) with the project's converter into each type, in a temporary
directory, and compares every file with the F16 conversion on the two bills the demo model never saw in training,
over the positions perplexity scores (the second half of each n_ctx window, as llama-perplexity scores them):

- mean KL divergence KL(F16 ‖ type) per scored token, and its 99th percentile: the most sensitive measure;
- top-1 agreement: the share of those positions where the file's most likely next token is F16's;
- held-out perplexity (exactly `malhae eval ppl`'s number) and its ratio to F16's. On text this far from the training
  data it barely moves until Q2_K (the model's own uncertainty dominates), so read it with the other columns.

Why: the tests hold Q8_0 and Q4_K_M to bounds set from these numbers, and the model card and docs/benchmarks.md quote
the table, so one script produces them. A measurement, not a test: nothing here asserts or times anything. The
numbers describe this 8.6 M-parameter model; they are not a prediction for the family's 1.3B-12.8B models.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.eval import compare  # noqa: E402
from app.runtime.llama import Model, init  # noqa: E402
from convert import pipeline  # noqa: E402

BILLS = ROOT / "models" / "data" / "ko-public-domain" / "bills"
HELD_OUT = ("1809898.txt", "1809899.txt")
TYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"]


def held_out_text() -> str:
    return "\n".join((BILLS / name).read_text(encoding="utf-8") for name in HELD_OUT)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=ROOT / "models" / "demo" / "hf")
    p.add_argument("--types", nargs="+", default=TYPES)
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    types = ["f16"] + [t for t in args.types if t != "f16"]  # F16 is the reference
    init(False)
    text = held_out_text()
    rows = []
    with tempfile.TemporaryDirectory(prefix="malhae-quant-") as tmp:
        converted = {t: pipeline.convert(args.src, t, Path(tmp) / f"demo-{t}.gguf", threads=args.threads)
                     for t in types}
        with Model(converted["f16"].path) as reference:
            for type_name, result in converted.items():
                with Model(result.path) as model:
                    r = compare.evaluate(reference, model, text, n_ctx=args.n_ctx, threads=args.threads)
                rows.append((type_name, result, r))
                print(f"{type_name}: done", file=sys.stderr, flush=True)

    r0 = rows[0][2]
    print(f"held-out text: bills {', '.join(HELD_OUT)}; {r0.windows} windows of {r0.n_ctx} tokens; "
          f"{r0.tokens_scored} scored positions (the second half of each window)\n")
    print("| type | size | bits/weight | mean KL from F16 | 99th pct KL | top-1 agreement with F16 "
          "| held-out perplexity | ratio to F16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for type_name, result, r in rows:
        print(f"| {type_name.upper()} | {result.size / 1e6:.2f} MB | {result.bits_per_weight:.2f} | {r.kl_mean:.5f} "
              f"| {r.kl_p99:.5f} | {r.top1:.4f} | {r.ppl_b:.2f} | {r.ppl_ratio:.4f} |")


if __name__ == "__main__":
    main()
