"""The prompt cache on disk: time to first token cold vs restored, where restoring starts to pay, and file sizes.

    python benchmarks/prompt_cache.py MODEL.gguf [--threads 2] [--doc-tokens 2000] [--rounds 3]

1. TTFT of a question about a ~2,000-token Korean document (the constitution, models/data): cold (a fresh engine,
   an empty cache folder: the whole prompt is evaluated and its state saved after the answer) vs restored (a fresh
   engine, the same folder, another question: the document comes from disk). Alternating, `--rounds` times; the
   median of each and their ratio. Goal (issue 33): restored ≥ 20× faster.
2. The break-even: for prefixes of 16 … 1,024 tokens, the time to evaluate them vs the time to restore their saved
   state (find + read + CRC + llama_state_seq_set_data) and to save it (copy out + write): where restoring costs
   less than evaluating, the cache pays; app.runtime.prompt_cache.MIN_TOKENS is set from this.
3. Bytes per token of a saved state at f16, q8_0 and q4_0 K/V.
4. (--agree) Greedy answers after a restore against a full evaluation, on this model's own kernels: a quantized model's
   batched and single-row kernels may round differently, and a restore evaluates the question in another batch than
   a full evaluation does, so a near tie could part them (the demo's F16 weights agree exactly: tests/).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from malhae.runtime import prompt_cache  # noqa: E402
from malhae.runtime.engine import Engine  # noqa: E402
from malhae.runtime.settings import LoadOptions, Sampling  # noqa: E402

TEXT = Path(__file__).resolve().parents[1] / "models" / "data" / "ko-public-domain" / "constitution.txt"
ONE = Sampling(temperature=0, max_tokens=1)


def document(engine: Engine, n_tokens: int) -> str:
    """The constitution's opening, cut to about n_tokens of this model's tokenizer."""
    text = TEXT.read_text(encoding="utf-8")
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix of the text within n_tokens
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(engine.tokenize(text[:mid])) <= n_tokens else (lo, mid - 1)
    return text[:lo]


def ttft(options: LoadOptions, prompt: str) -> tuple[float, int]:
    """(time to first token, tokens restored) of a fresh engine; the state is saved after the answer."""
    with Engine(options) as engine:
        engine.complete(prompt, ONE)
        return engine.stats.ttft, engine.stats.restored_tokens


def cold_vs_restored(options: LoadOptions, doc: str, rounds: int) -> None:
    cold, warm, restored = [], [], 0
    for i in range(rounds):
        with tempfile.TemporaryDirectory() as folder:
            opts = replace(options, prompt_cache=Path(folder))
            t, _ = ttft(opts, doc + f"\n\n질문 {i}: 대통령의 임기는 몇 년인가?\n답:")
            cold.append(t)
            t, restored = ttft(opts, doc + f"\n\n질문 {i}: 국회의원의 임기는 몇 년인가?\n답:")
            warm.append(t)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"TTFT cold {c:.2f} s, restored {w:.3f} s ({restored} tokens from disk): {c / w:.1f}x "
          f"(rounds: cold {', '.join(f'{x:.2f}' for x in cold)}; restored {', '.join(f'{x:.3f}' for x in warm)})")


def break_even(options: LoadOptions, doc: str) -> None:
    print("| prefix tokens | evaluate (s) | restore (s) | save (s) | state bytes |")
    print("|---:|---:|---:|---:|---:|")
    with Engine(replace(options, prompt_cache=None)) as engine, tempfile.TemporaryDirectory() as folder:
        tokens = engine.tokenize(doc)
        cache = prompt_cache.PromptCache(Path(folder), Path(folder) / "m", "m")
        for n in (16, 32, 64, 128, 256, 512, 1024):
            if n > len(tokens):
                break
            engine.cache = []
            engine.ctx.clear()
            start = time.perf_counter()
            engine.evaluate(tokens[:n])
            evaluate = time.perf_counter() - start
            start = time.perf_counter()
            cache.save(engine.cache, engine.ctx.seq_state(0))
            cache.wait()
            save = time.perf_counter() - start
            engine.ctx.clear()
            start = time.perf_counter()
            entry, _ = cache.find(tokens[:n] + [0], at_least=1)
            state = cache.load(entry)
            assert state is not None and engine.ctx.set_seq_state(state, 0)
            restore = time.perf_counter() - start
            print(f"| {n} | {evaluate:.3f} | {restore:.4f} | {save:.4f} | {entry.state_bytes:,} |")


def bytes_per_token(options: LoadOptions, doc: str) -> None:
    for kind in ("f16", "q8_0", "q4_0"):
        with Engine(replace(options, prompt_cache=None, kv_cache_k=kind, kv_cache_v=kind)) as engine:
            tokens = engine.tokenize(doc)[:512]
            engine.evaluate(tokens)
            size = len(engine.ctx.seq_state(0))
            print(f"{kind}: {size / len(tokens) / 1024:.1f} KiB per token ({size:,} bytes for {len(tokens)} tokens)")


def agree(options: LoadOptions, doc: str, n: int = 5) -> None:
    """Greedy answers after a restore, against the same split in memory (the document evaluated first, then the
    question: what a chat's KV reuse does) and against one full evaluation of the whole prompt."""
    greedy = Sampling(temperature=0, max_tokens=32)
    same_split = same_full = 0
    for i in range(n):
        question = doc + f"\n\n질문 {i}: 제{i + 1}조는 무엇을 정하는가?\n답:"
        with tempfile.TemporaryDirectory() as folder:
            opts = replace(options, prompt_cache=Path(folder))
            with Engine(opts) as engine:  # saves the document
                engine.complete(doc + "\n\n요약:", ONE)
            with Engine(opts) as engine:
                restored = engine.complete(question, greedy)[0]
                assert engine.stats.restored_tokens > 0
        with Engine(replace(options, prompt_cache=None)) as engine:
            full = engine.complete(question, greedy)[0]
            engine.complete(doc + "\n\n요약:", ONE)
            split = engine.complete(question, greedy)[0]  # the KV cache keeps the document
        same_split += restored == split
        same_full += restored == full
    print(f"greedy 32 tokens after a restore: {same_split} of {n} equal to the same split in memory, {same_full} of "
          f"{n} equal to one full evaluation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--doc-tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=(), choices=("ttft", "break-even", "sizes"))
    parser.add_argument("--agree", action="store_true", help="also compare greedy answers (5 questions)")
    args = parser.parse_args()
    options = LoadOptions(model=args.model, threads=args.threads, ctx=2048 + 256, gpu_layers=0)
    with Engine(replace(options, ctx=4096)) as engine:
        doc = document(engine, args.doc_tokens)
        print(f"{args.model.name}, {args.threads} threads, document {len(engine.tokenize(doc))} tokens")
    if "ttft" not in args.skip:
        cold_vs_restored(options, doc, args.rounds)
    if "break-even" not in args.skip:
        break_even(options, doc)
    if "sizes" not in args.skip:
        bytes_per_token(options, doc)
    if args.agree:
        agree(options, doc)


if __name__ == "__main__":
    main()
