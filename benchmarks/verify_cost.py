"""What it costs to verify a draft: k tokens in ONE llama_decode, relative to decoding one token.

    python benchmarks/verify_cost.py -m MODEL.gguf [--threads 2] [--reps 15] [--prompt 200] [--ks 1,2,4,8,16]
                                     [--gpu-layers 0] [--no-mmap] [--json OUT.json]

Speculative decoding wins only if checking k drafted tokens in one batch costs much less than k single-token decodes:
the speed-up is (accepted tokens + 1) per verify, divided by the verify's cost in units of one token. On a
memory-bound model the weights are read once per batch whatever k is, so the cost should grow far slower than k —
this script measures by how much, on the machine at hand.

Each measurement is what a verify does: one sequence, the k tokens at the positions right after a prompt of ~200
tokens already in the KV cache, logits wanted for all k rows (every drafted position is checked). The k tokens are then
removed from the cache (llama_memory_seq_rm), so every measurement starts from the same cache. Machines are noisy
(other work, frequency changes), so the k values are interleaved round by round — in a rotated order, so no k always
runs first — and the table shows medians; "× one token" is the median over rounds of t(k) / t(1) in the same round.

Keep --threads at most the number of idle cores. When other processes want the same cores, llama.cpp's threads wait for
each other at every op of the graph, and a decode of any k can take seconds instead of tens of milliseconds (seen on a
2-core VM while tests ran beside it: a third of the decodes took 2.5-3 s, 1 token or 16 alike). A "min ms" far below
the median, or a wide spread in --json's rounds, says a run was disturbed: run it again in a quiet minute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import llama_cpp as lc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from malhae.runtime.llama import Batch, Context, Model  # noqa: E402
from malhae.runtime.settings import LoadOptions  # noqa: E402

TEXT = ROOT / "models" / "data" / "ko-public-domain" / "constitution.txt"
WARMUP = 2  # untimed passes over every k: first-touch of weights and compute buffers, thread pool start


def _tokens(model: Model, n: int) -> list[int]:
    """`n` tokens of real Korean text (the content does not change the cost, but real text keeps it honest)."""
    tokens = model.tokenize(TEXT.read_text(encoding="utf-8"))
    if len(tokens) < n:
        raise SystemExit(f"{TEXT} gives only {len(tokens)} tokens, {n} needed")
    return tokens[:n]


def measure(path: Path, ks: list[int], *, threads: int, reps: int, prompt: int = 200, gpu_layers: int = 0,
            mmap: bool = True) -> dict[int, list[float]]:
    """Seconds of one llama_decode of k tokens, `reps` times per k, interleaved; {k: [seconds per round]}.

    The weights are memory-mapped as malhae's engine maps them (`mmap=False` reads them in instead, to rule out
    pages the kernel drops and reads again).
    """
    times: dict[int, list[float]] = {k: [] for k in ks}
    with Model(path, n_gpu_layers=gpu_layers, use_mmap=mmap) as model:
        tokens = _tokens(model, prompt + max(ks))
        head, draft = tokens[:prompt], tokens[prompt:]
        n_batch = max(prompt, max(ks))
        with Context(model, LoadOptions(ctx=prompt + max(ks) + 8, batch=n_batch, threads=threads)) as ctx, \
                Batch(n_batch) as batch:
            memory = lc.llama_get_memory(ctx.ptr)
            batch.fill(head, range(prompt))
            ctx.decode(batch)

            def once(k: int) -> float:
                batch.fill(draft[:k], range(prompt, prompt + k))  # logits wanted on every row, as a verify does
                start = time.perf_counter()
                ctx.decode(batch)
                lc.llama_synchronize(ctx.ptr)  # a GPU backend may still be computing when llama_decode returns
                seconds = time.perf_counter() - start
                if not lc.llama_memory_seq_rm(memory, 0, prompt, -1):
                    raise RuntimeError("llama_memory_seq_rm refused to drop the verified tokens")
                return seconds

            for _ in range(WARMUP):
                for k in ks:
                    once(k)
            for r in range(reps):
                shift = r % len(ks)
                for k in ks[shift:] + ks[:shift]:
                    times[k].append(once(k))
    return times


def table(times: dict[int, list[float]]) -> str:
    """Markdown: k, median ms, median ratio to k=1 (paired by round), ms per token, and the fastest run (other work on
    the machine only ever adds time, so a median far above it says the numbers were disturbed)."""
    base = min(times)
    lines = ["| k | median ms | × one token | ms per token | min ms |", "|---:|---:|---:|---:|---:|"]
    for k, ts in times.items():
        median = statistics.median(ts)
        ratio = statistics.median(t / b for t, b in zip(ts, times[base], strict=True))
        lines.append(f"| {k} | {median * 1000:.1f} | {ratio:.2f} | {median * 1000 / k:.1f} | {min(ts) * 1000:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15, help="rounds; each round measures every k once (default 15)")
    parser.add_argument("--prompt", type=int, default=200, help="tokens already in the KV cache (default 200)")
    parser.add_argument("--ks", default="1,2,4,8,16", help="batch sizes to compare (default 1,2,4,8,16)")
    parser.add_argument("--gpu-layers", type=int, default=0, help="layers to offload (default 0: CPU only)")
    parser.add_argument("--no-mmap", action="store_true", help="read the weights into memory instead of mapping them")
    parser.add_argument("--json", type=Path, help="also write every round's seconds here, {k: [...]}")
    args = parser.parse_args()
    ks = sorted({int(k) for k in args.ks.split(",")})
    if ks[0] != 1:
        ks.insert(0, 1)  # the unit every other k is measured in

    start = time.perf_counter()
    times = measure(args.model, ks, threads=args.threads, reps=args.reps, prompt=args.prompt,
                    gpu_layers=args.gpu_layers, mmap=not args.no_mmap)
    size = args.model.stat().st_size / 2**30
    print(f"{args.model.name} ({size:.2f} GiB): {args.threads} threads, {args.gpu_layers} GPU layers, "
          f"weights {'in memory' if args.no_mmap else 'mapped'}, "
          f"prompt {args.prompt} tokens, {args.reps} rounds ({time.perf_counter() - start:.0f} s)\n")
    print(table(times))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "threads": args.threads, "prompt": args.prompt,
                                         "seconds": times}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
