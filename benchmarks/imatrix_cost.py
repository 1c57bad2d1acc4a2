"""The importance-matrix step, side by side: `malhae imatrix` vs llama.cpp's `llama-imatrix`, same file, same text.

    python benchmarks/imatrix_cost.py [--workdir DIR] [--chunks 8] [--ctx 512] [--rounds 2] [--threads N]
                                      [--model F16.gguf] [--gpu-layers N]

Builds (once, in --workdir) the random-weight checkpoint shaped like polyglot-ko-1.3b that benchmarks/convert_cost.py
builds and converts it to F16 with malhae, or takes --model. Then, alternating the two tools each round, computes the
importance matrix over the first --chunks chunks of malhae's calibration corpus (--imatrix auto's text) and reports
the wall time and peak resident memory of each (GNU time), their ratios, and how far the two files' sums differ.
Both evaluate the perplexity of the scored halves as they go (llama-imatrix's default; malhae always does), and
llama-imatrix runs on the very llama.cpp libraries malhae loads (app.eval.upstream.same_libraries_env), with the same
weight layout (--no-repack where malhae turns llama.cpp's extra CPU buffers off).

The goal it checks: malhae's step within 1.1× llama-imatrix's time and memory. Random weights cost what real ones
do; what the numbers mean is the collection's overhead (a Python callback per graph node) against upstream's C++.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from malhae.convert import corpus, pipeline  # noqa: E402
from malhae.convert import imatrix as imatrix_file  # noqa: E402
from malhae.eval import upstream  # noqa: E402
from malhae.runtime import llama  # noqa: E402


def main() -> None:
    from convert_cost import make_checkpoint, timed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "malhae-imatrix-cost")
    p.add_argument("--model", type=Path, help="an F16 GGUF to use instead of the 1.3b-shaped one")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded by both tools (a CUDA build: 99)")
    args = p.parse_args()
    exe = upstream.tool_exe("llama-imatrix")
    if exe is None:
        raise SystemExit("llama-imatrix is not built: python benchmarks/build_llama_tools.py")
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = args.workdir / "polyglot-ko-1.3b-shaped-f16.gguf"
        if not model.is_file():
            pipeline.convert(make_checkpoint(args.workdir), "f16", model)
    text = args.workdir / "calibration.txt"
    text.write_text(corpus.calibration_text()[1], encoding="utf-8")
    ours, theirs = args.workdir / "malhae.imatrix.gguf", args.workdir / "upstream.imatrix.gguf"
    common = ["--ctx", str(args.ctx), "--chunks", str(args.chunks), "--threads", str(args.threads)]
    malhae_cmd = [sys.executable, "-m", "malhae", "imatrix", str(model), "--text", str(text), *common, "--gpu-layers",
                  str(args.gpu_layers), "-o", str(ours), "--force"]
    upstream_cmd = [str(exe), "-m", str(model), "-f", str(text), "-c", str(args.ctx), "--chunks", str(args.chunks),
                    "-t", str(args.threads), "-ngl", str(args.gpu_layers), "-o", str(theirs),
                    # the weight layout malhae's engine uses (extra CPU buffers off on AMX CPUs: llama.py)
                    "--repack" if llama.use_extra_buffer_types() else "--no-repack"]
    times: dict[str, list[tuple[float, float]]] = {"malhae": [], "llama-imatrix": []}
    env = upstream.same_libraries_env()
    for r in range(args.rounds):
        order = [("malhae", malhae_cmd), ("llama-imatrix", upstream_cmd)]
        for name, cmd in order if r % 2 == 0 else order[::-1]:
            run_env = env if name == "llama-imatrix" else dict(os.environ, PYTHONPATH=str(ROOT))
            times[name].append(timed(cmd, env=run_env))
            print(f"round {r + 1}: {name} {times[name][-1][0]:.1f} s, {times[name][-1][1]:.0f} MB", flush=True)
    a, b = imatrix_file.read(ours), imatrix_file.read(theirs)
    worst = max(float(np.abs(a.sums[k] - b.sums[k]).max() / np.abs(b.sums[k]).max()) for k in b.sums)
    wall = {k: statistics.median(t for t, _ in v) for k, v in times.items()}
    rss = {k: statistics.median(m for _, m in v) for k, v in times.items()}
    where = f"{args.gpu_layers} layers on the GPU" if args.gpu_layers else "CPU"
    print(f"\n{model.name}, {args.chunks} chunks of {args.ctx} tokens, {args.threads} threads, {where}, "
          f"median of {args.rounds} round(s), alternating")
    print("| tool | wall | peak memory |\n|---|---:|---:|")
    for k in times:
        print(f"| {k} | {wall[k]:.1f} s | {rss[k]:.0f} MB |")
    print(f"| ratio malhae / llama-imatrix | {wall['malhae'] / wall['llama-imatrix']:.3f}× "
          f"| {rss['malhae'] / rss['llama-imatrix']:.3f}× |")
    print(f"\nsame entries: {sorted(a.sums) == sorted(b.sums)}; largest difference of a sum, relative to its tensor's "
          f"largest: {worst:.2e}")


if __name__ == "__main__":
    main()
