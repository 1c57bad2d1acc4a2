"""Quantization loss on the demo model: what each output type of `malhae convert` costs, with and without an
importance matrix, measured by app.eval.compare (the library behind `malhae eval compare`) against F16.

    python benchmarks/quant_quality.py [--src models/demo/hf | --outliers] [--types f16 q8_0 …] [--imatrix]
                                       [--n-ctx 512] [--threads N]

Converts the committed demo checkpoint (models/demo/hf) with the project's converter into each type, in a temporary
directory, and compares every file with the F16 conversion on the two bills the demo model never saw in training,
over the positions perplexity scores (the second half of each n_ctx window, as llama-perplexity scores them):

- mean KL divergence KL(F16 ‖ type) per scored token, and its 99th percentile: the most sensitive measure;
- top-1 agreement: the share of those positions where the file's most likely next token is F16's;
- held-out perplexity (exactly `malhae eval ppl`'s number) and its ratio to F16's. On text this far from the training
  data it barely moves until Q2_K (the model's own uncertainty dominates), so read it with the other columns.

--imatrix also makes every quantizer type with the importance matrix `--imatrix auto` computes (computed once on the
F16 over malhae's calibration corpus, which never holds the held-out bills, and reused for every type), and prints
both side by side; the types that need one appear only with it. --outliers measures the demo's outlier twin instead
(benchmarks/outlier_twin.py: the same function, with the outlier activation channels of a large model).

Why: the tests hold Q8_0 and Q4_K_M to bounds set from these numbers, and the model card and docs/benchmarks.md quote
the tables, so one script produces them. A measurement, not a test: nothing here asserts or times anything. The
numbers describe this 8.6 M-parameter model; they are not a prediction for the family's 1.3B-12.8B models.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from malhae.convert import corpus, importance, pipeline  # noqa: E402
from malhae.convert import imatrix as imatrix_file  # noqa: E402
from malhae.convert import types as out_types  # noqa: E402
from malhae.eval import compare  # noqa: E402
from malhae.runtime.llama import Model, init  # noqa: E402
from malhae.runtime.settings import LoadOptions  # noqa: E402
from malhae.runtime.windows import Layout  # noqa: E402

TYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"]
ALL_QUANTIZED = [t.name for t in out_types.TYPES.values() if t.direct is None]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=ROOT / "models" / "demo" / "hf")
    p.add_argument("--outliers", action="store_true", help="measure the demo's outlier twin")
    p.add_argument("--types", nargs="+", default=None, help=f"default: {' '.join(TYPES)}; with --imatrix every "
                   "quantizer type")
    p.add_argument("--imatrix", action="store_true", help="also with the importance matrix --imatrix auto makes")
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    wanted = args.types or (["f16", "q8_0", *ALL_QUANTIZED] if args.imatrix else TYPES)
    types = ["f16"] + [t for t in wanted if t != "f16"]  # F16 is the reference
    init(False)
    text = corpus.held_out_text()
    rows = []
    with tempfile.TemporaryDirectory(prefix="malhae-quant-") as tmp:
        src = args.src
        if args.outliers:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            import outlier_twin

            src = outlier_twin.build(args.src, Path(tmp) / "outlier-twin")
        f16 = pipeline.convert(src, "f16", Path(tmp) / "f16.gguf", threads=args.threads)
        im_path, im_seconds = None, 0.0
        if args.imatrix:
            started = time.perf_counter()
            datasets, calibration = importance.calibration(None)
            with Model(f16.path) as model:
                im, _, _ = importance.compute(model, calibration, None, LoadOptions(threads=args.threads),
                                              datasets=datasets)
            im_path = Path(tmp) / "auto.imatrix.gguf"
            imatrix_file.write(im, im_path)
            im_seconds = time.perf_counter() - started
        with Model(f16.path) as reference:
            for type_name in types:
                otype = out_types.get(type_name)
                variants = [None] if otype.direct is not None else ([] if otype.needs_imatrix else [None])
                if im_path is not None and otype.direct is None:
                    variants.append(im_path)
                row = []
                for used in variants:
                    tag = "im" if used else "plain"
                    result = f16 if type_name == "f16" else pipeline.convert(
                        src, type_name, Path(tmp) / f"{type_name}-{tag}.gguf", threads=args.threads, imatrix=used)
                    with Model(result.path) as model:
                        r = compare.evaluate(reference, model, text, Layout.of(args.n_ctx),
                                             LoadOptions(threads=args.threads))
                    row.append((used is not None, result, r))
                rows.append((type_name, row))
                print(f"{type_name}: done", file=sys.stderr, flush=True)

    r0 = rows[0][1][0][2]
    print(f"model: {'outlier twin of ' if args.outliers else ''}{args.src.name}; held-out text: "
          f"{', '.join(p.name for p in corpus.manifest().held_out)}; {r0.windows} windows of {r0.n_ctx} tokens; "
          f"{r0.tokens_scored} scored positions (the second half of each window)")
    if args.imatrix:
        print(f"importance matrix: --imatrix auto's ({corpus.manifest().name}, ctx 512), {im_seconds:.1f} s\n")
        print("| type | size | bits/weight | mean KL without → with | top-1 without → with "
              "| ppl ratio to F16 without → with |")
        print("|---|---:|---:|---:|---:|---:|")
        for type_name, row in rows:
            by = {with_im: (res, r) for with_im, res, r in row}
            res = (by.get(True) or by[False])[0]

            def cell(fmt: str, attr: str, by=by) -> str:
                a = format(getattr(by[False][1], attr), fmt) if False in by else "—"
                b = format(getattr(by[True][1], attr), fmt) if True in by else ""
                return f"{a} → {b}" if b else a

            print(f"| {type_name.upper()} | {res.size / 1e6:.2f} MB | {res.bits_per_weight:.2f} "
                  f"| {cell('.5f', 'kl_mean')} | {cell('.4f', 'top1')} | {cell('.4f', 'ppl_ratio')} |")
        return
    print("\n| type | size | bits/weight | mean KL from F16 | 99th pct KL | top-1 agreement with F16 "
          "| held-out perplexity | ratio to F16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for type_name, row in rows:
        _, result, r = row[0]
        print(f"| {type_name.upper()} | {result.size / 1e6:.2f} MB | {result.bits_per_weight:.2f} | {r.kl_mean:.5f} "
              f"| {r.kl_p99:.5f} | {r.top1:.4f} | {r.ppl_b:.2f} | {r.ppl_ratio:.4f} |")


if __name__ == "__main__":
    main()
