"""Decode and prompt speed of malhae's engine vs upstream llama-bench, alternating round by round.

    python benchmarks/decode_speed.py MODEL.gguf --llama-bench PATH [--rounds 5] [-n 128] [-p 512]
                                      [--threads N] [--gpu-layers auto|N]

`malhae bench` runs one side and then the other; on a shared or noisy machine that can favour whichever ran in the
quieter minute. Here each round runs both (engine first, then llama-bench with the same file, threads, GPU layers,
weight repacking and lengths), the ratio is taken per round, and the median ratio is reported with every round shown.
Goal (docs/benchmarks.md): decode ≥ 97% of llama-bench on a CPU, ≥ 95% on a GPU with full offload.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.eval import bench, upstream  # noqa: E402
from app.runtime.engine import Engine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--llama-bench", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", "--gen", type=int, default=128)
    parser.add_argument("-p", "--prompt", type=int, default=512)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--gpu-layers", default="auto")
    args = parser.parse_args()

    rows = []
    with Engine(args.model, n_ctx=max(args.prompt + 16, args.gen + 32), threads=args.threads,
                gpu_layers=args.gpu_layers, notify=print) as engine:
        print(f"{args.model.name}: {engine.threads} threads, {engine.plan.where}", flush=True)
        for r in range(args.rounds):
            pp, tg = bench.run_engine(engine, args.prompt, args.gen, 1)
            up_pp, up_tg = upstream.run_llama_bench(args.llama_bench, args.model, args.prompt, args.gen, engine.threads,
                                                 engine.plan, 1)
            rows.append((pp, up_pp, tg, up_tg))
            print(f"round {r + 1}: pp {pp:8.1f} vs {up_pp:8.1f} ({pp / up_pp:6.1%})   "
                  f"tg {tg:7.2f} vs {up_tg:7.2f} ({tg / up_tg:6.1%})", flush=True)
    pp_ratio = statistics.median(r[0] / r[1] for r in rows)
    tg_ratio = statistics.median(r[2] / r[3] for r in rows)
    print(f"\nmedian over {len(rows)} rounds: prompt (pp{args.prompt}) {pp_ratio:.1%} of llama-bench, "
          f"decode (tg{args.gen}) {tg_ratio:.1%} of llama-bench")
    print(f"median tok/s: malhae pp {statistics.median(r[0] for r in rows):.1f}, "
          f"tg {statistics.median(r[2] for r in rows):.2f}; llama-bench pp {statistics.median(r[1] for r in rows):.1f}"
          f", tg {statistics.median(r[3] for r in rows):.2f}")


if __name__ == "__main__":
    main()
