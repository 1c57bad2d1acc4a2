"""Decode and prompt speed of malhae's engine vs upstream llama-bench, alternating round by round.

    python benchmarks/decode_speed.py MODEL.gguf --llama-bench PATH [--rounds 5] [-n 128] [-p 512]
                                      [--threads N] [--gpu-layers auto|N] [--device NAME] [--expect-full]
    python benchmarks/decode_speed.py --shaped [--workdir DIR] …   # the 1.3b-shaped Q4_K_M, built once

`--shaped` builds (once, in --workdir) the random-weight checkpoint shaped like polyglot-ko-1.3b that
benchmarks/convert_cost.py builds and converts it to Q4_K_M: the GPU check of the offload planner (issue 17) is
`--shaped --expect-full` with a GPU build, which fails unless `--gpu-layers auto` put every layer on the GPU.

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

from malhae.eval import bench, upstream  # noqa: E402
from malhae.runtime.engine import Engine  # noqa: E402
from malhae.runtime.settings import LoadOptions  # noqa: E402


def shaped_q4(workdir: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from convert_cost import make_checkpoint

    from malhae.convert import pipeline

    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "polyglot-ko-1.3b-shaped-q4_k_m.gguf"
    if not model.is_file():
        pipeline.convert(make_checkpoint(workdir), "q4_k_m", model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--shaped", action="store_true", help="the 1.3b-shaped Q4_K_M (built once in --workdir)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/malhae-decode-speed"))
    parser.add_argument("--device", help="as malhae's --device (default: auto)")
    parser.add_argument("--expect-full", action="store_true", help="fail unless every layer is offloaded")
    parser.add_argument("--llama-bench", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", "--gen", type=int, default=128)
    parser.add_argument("-p", "--prompt", type=int, default=512)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--gpu-layers", default="auto")
    args = parser.parse_args()
    if (args.model is None) == (not args.shaped):
        parser.error("give MODEL.gguf or --shaped")
    if args.shaped:
        args.model = shaped_q4(args.workdir)

    rows = []
    with Engine(LoadOptions(model=args.model, ctx=max(args.prompt + 16, args.gen + 32), threads=args.threads,
                            gpu_layers=args.gpu_layers, device=args.device), notify=print) as engine:
        threads = engine.options.threads
        print(f"{args.model.name}: {threads} threads, {engine.plan.where} ({engine.plan.reason})", flush=True)
        if args.expect_full and not engine.plan.full:
            raise SystemExit(f"not every layer is on the GPU: {engine.plan.where}")
        for r in range(args.rounds):
            pp, tg = bench.run_engine(engine, args.prompt, args.gen, 1)
            up_pp, up_tg = upstream.run_llama_bench(args.llama_bench, engine.options, engine.plan,
                                                    upstream.BenchTest(args.prompt, args.gen))
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
