"""The KV cache's types side by side with llama-bench -ctk/-ctv -fa: speed at each type, and the bytes allocated.

    python benchmarks/kv_cache.py [MODEL.gguf] --llama-bench PATH [--rounds 5] [-n 64] [-p 512] [--depth 1536]
                                  [--threads 2] [--kv-tokens 2048]

Default model: the 1.3b-shaped Q4_K_M that `python benchmarks/decode_speed.py --shaped …` builds in
/tmp/malhae-decode-speed. Issue 33's goal: decode and prompt ≥ 0.97× llama-bench at every type, and the K/V bytes
llama.cpp reports equal to the planner's figure.

What runs (2 threads unless told, CPU unless --gpu-layers says otherwise):
- f16 with flash attention off and on, q8_0 and q4_0 with it on (a quantized V needs it): malhae's decode (tg) and
  prompt (pp) tokens/s against llama-bench's with the same file, threads, layers, K/V types and -fa;
- f16 and q8_0 with flash attention at depth --depth (llama-bench -d; malhae evaluates that many tokens first and
  each test starts from them), where a smaller cache costs a CPU the most;
- the K/V bytes for a context of --kv-tokens: the planner's (offload.model_sizes), what llama.cpp reports in malhae
  (llama.Context.kv_report) and in llama-bench (its -v log), per type.

Like benchmarks/decode_speed.py, each round runs both sides of every case one after the other (the timing loops are
app.eval.bench.run_engine and app.eval.upstream.run_llama_bench), the ratio is taken per round and the median ratio
is reported, so a noisy minute does not favour one side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from malhae.eval import bench, upstream  # noqa: E402
from malhae.runtime import kv, offload  # noqa: E402
from malhae.runtime.engine import Engine  # noqa: E402
from malhae.runtime.settings import LoadOptions  # noqa: E402

SHAPED = Path("/tmp/malhae-decode-speed/polyglot-ko-1.3b-shaped-q4_k_m.gguf")
AT_ZERO = (("f16", "off"), ("f16", "on"), ("q8_0", "on"), ("q4_0", "on"))  # (K and V's type, flash attention)
AT_DEPTH = (("f16", "on"), ("q8_0", "on"))


@dataclass
class Case:
    cache: str
    flash_attn: str
    depth: int
    engine: Engine
    rounds: list[tuple[float, float, float, float]]  # (malhae pp, llama-bench pp, malhae tg, llama-bench tg)

    @property
    def label(self) -> str:
        return f"{self.cache}, FA {self.flash_attn}" + (f", depth {self.depth:,}" if self.depth else "")


def options(args: argparse.Namespace, cache: str, flash_attn: str, ctx: int) -> LoadOptions:
    return LoadOptions(model=args.model, ctx=ctx, threads=args.threads, gpu_layers=args.gpu_layers,
                       kv_cache_k=cache, kv_cache_v=cache, flash_attn=flash_attn)


def ratio(case: Case, mine: int, theirs: int) -> float:
    return statistics.median(r[mine] / r[theirs] for r in case.rounds)


def speed_table(cases: list[Case], args: argparse.Namespace) -> str:
    lines = [f"| cache | malhae pp{args.prompt} | llama-bench pp{args.prompt} | ratio | malhae tg{args.gen} | "
             f"llama-bench tg{args.gen} | ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        pp, up_pp, tg, up_tg = (statistics.median(r[i] for r in c.rounds) for i in range(4))
        lines.append(f"| {c.label} | {pp:.1f} | {up_pp:.1f} | {ratio(c, 0, 1):.1%} | {tg:.2f} | {up_tg:.2f} | "
                     f"{ratio(c, 2, 3):.1%} |")
    return "\n".join(lines)


def kv_table(args: argparse.Namespace) -> str:
    """The bytes for --kv-tokens at each type: planner, malhae's context, llama-bench's (not timed)."""
    lines = ["| cache | tokens (cells) | planner MiB | malhae (llama.cpp) MiB | llama-bench MiB | equal |",
             "|---|---:|---:|---:|---:|---|"]
    n_cells = kv.cells(args.kv_tokens)
    for cache in ("f16", "q8_0", "q4_0"):
        with Engine(options(args, cache, "on", args.kv_tokens)) as engine:
            sizes = offload.model_sizes(engine.info, n_cells, kv_types=(cache, cache))
            planned = round(sizes.kv_bytes_per_layer * sizes.n_layer / 2**20, 2)
            mine = engine.ctx.kv_report
            theirs = upstream.llama_bench_kv(args.llama_bench, engine.options, engine.plan, args.kv_tokens)
        equal = mine is not None and theirs is not None and planned == mine.mib == theirs.mib
        lines.append(f"| {cache} | {args.kv_tokens:,} ({n_cells:,}) | {planned:.2f} | "
                     f"{mine.mib if mine else '—'} | {theirs.mib if theirs else '—'} | {'yes' if equal else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?", default=SHAPED)
    parser.add_argument("--llama-bench", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", "--gen", type=int, default=64)
    parser.add_argument("-p", "--prompt", type=int, default=512)
    parser.add_argument("--depth", type=int, default=1536, help="0 leaves out the depth cases")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu-layers", default="0")
    parser.add_argument("--kv-tokens", type=int, default=2048, help="the context whose K/V bytes are compared")
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"{args.model} does not exist; build it with python benchmarks/decode_speed.py --shaped "
                     f"--workdir {SHAPED.parent} --llama-bench {args.llama_bench}, or give a GGUF")
    if not args.llama_bench.is_file():
        parser.error(f"--llama-bench {args.llama_bench} does not exist (python benchmarks/build_llama_tools.py)")

    plan = [(c, fa, 0) for c, fa in AT_ZERO] + ([(c, fa, args.depth) for c, fa in AT_DEPTH] if args.depth else [])
    need = max(args.prompt + 16, 16 + args.gen + 8)
    cases = [Case(c, fa, d, Engine(options(args, c, fa, d + need)), []) for c, fa, d in plan]
    try:
        print(f"{args.model.name}: {cases[0].engine.options.threads} threads, {cases[0].engine.plan.where}",
              flush=True)
        for r in range(args.rounds):
            for c in cases:
                pp, tg = bench.run_engine(c.engine, args.prompt, args.gen, 1, c.depth)
                test = upstream.BenchTest(args.prompt, args.gen, 1, c.depth)
                up_pp, up_tg = upstream.run_llama_bench(args.llama_bench, c.engine.options, c.engine.plan, test)
                c.rounds.append((pp, up_pp, tg, up_tg))
                print(f"round {r + 1}, {c.label}: pp {pp:7.1f} vs {up_pp:7.1f} ({pp / up_pp:6.1%})   "
                      f"tg {tg:6.2f} vs {up_tg:6.2f} ({tg / up_tg:6.1%})", flush=True)
    finally:
        for c in cases:
            c.engine.close()
    print(f"\nmedian of {args.rounds} rounds (ratios: median of the per-round ratios), {args.threads} threads:\n")
    print(speed_table(cases, args))
    print(f"\nK/V bytes for a context of {args.kv_tokens:,} tokens:\n")
    print(kv_table(args))


if __name__ == "__main__":
    main()
