"""Merged or not: which quantized file is closer to the fine-tuned model, in numbers (KL, top-1, perplexity).

    python benchmarks/lora_quality.py --base models/demo/hf --adapter DIR [--text FILE] [--type q4_k_m]

The reference is the base with the adapter merged at F16 (what the fine-tune computes, rounded only to f16). Against
it, with `malhae eval compare`'s measures on the same windows:
- unmerged: the base quantized, the adapter applied at run time (f16 A and B, as `malhae convert ADAPTER` writes);
- merged: the adapter merged into the weights before quantizing (`malhae convert --merge-lora`);
- and, for scale, the quantized base without the adapter (how far the adapter moves the model at all) and the F16
  base with the adapter unmerged (f16 rounding of the two paths alone).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BILLS = ROOT / "models" / "data" / "ko-public-domain" / "bills"
HELD_OUT = ("1809898.txt", "1809899.txt")  # never in the demo's training text, nor in the calibration corpus


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="the base's Hugging Face folder")
    p.add_argument("--adapter", type=Path, required=True, help="a PEFT LoRA adapter folder for it")
    p.add_argument("--text", type=Path, help="UTF-8 text (default: the held-out bills)")
    p.add_argument("--type", default="q4_k_m")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    from malhae.convert import lora, lora_gguf, merge, pipeline
    from malhae.eval import compare
    from malhae.runtime.llama import Model, init
    from malhae.runtime.settings import LoadOptions, Lora
    from malhae.runtime.windows import Layout

    init(False)
    with tempfile.TemporaryDirectory(prefix="malhae-lora-quality-") as tmp:
        work = Path(tmp)
        text = args.text.read_text(encoding="utf-8") if args.text else "\n".join(
            (BILLS / n).read_text(encoding="utf-8") for n in HELD_OUT)
        spec = [merge.Spec(args.adapter)]
        ref = pipeline.convert(args.base, "f16", work / "merged-f16.gguf", merge=spec).path
        merged_q = pipeline.convert(args.base, args.type, work / f"merged-{args.type}.gguf", merge=spec).path
        base_q = pipeline.convert(args.base, args.type, work / f"base-{args.type}.gguf").path
        base_f16 = pipeline.convert(args.base, "f16", work / "base-f16.gguf").path
        adapter = lora_gguf.write(lora.read(args.adapter), lora_gguf.Base.from_gguf(base_f16),
                                  work / "adapter.gguf").path
        layout = Layout.of(args.ctx)
        plain = LoadOptions(threads=args.threads)
        adapted = LoadOptions(threads=args.threads, lora=(Lora(adapter),))
        rows = [(f"{args.type.upper()} base + adapter unmerged", base_q, adapted),
                (f"merged, then {args.type.upper()}", merged_q, plain),
                ("F16 base + adapter unmerged", base_f16, adapted),
                (f"{args.type.upper()} base, no adapter", base_q, plain)]
        print(f"reference: {args.base.name} + {args.adapter.name} merged, F16; text: "
              f"{args.text.name if args.text else 'held-out bills'}; ctx {args.ctx}\n")
        print(f"{'B':<36} {'mean KL':>9} {'p99 KL':>8} {'top-1':>7} {'ppl B/A':>8}")
        with Model(ref) as a:
            for label, path, options in rows:
                with Model(path) as b:
                    r = compare.evaluate(a, b, text, layout, options, reference=plain)
                print(f"{label:<36} {r.kl_mean:>9.5f} {r.kl_p99:>8.4f} {r.top1:>7.3f} {r.ppl_b / r.ppl_a:>8.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
