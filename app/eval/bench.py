"""`malhae bench`: prompt and decode speed through malhae's own engine, side by side with upstream llama-bench.

Both sides get the same file, threads, GPU layers and lengths, and each reports the median of several repetitions, so
the ratio is the engine's overhead over llama.cpp itself (the goal: ≥ 97% of llama-bench decode on a CPU, ≥ 95% on a
GPU with full offload). Decode speed excludes the first token, which belongs to prompt processing.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from malhae.errors import UserError
from malhae.runtime.engine import Engine
from malhae.runtime.settings import Sampling

FILLER = "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. "


@dataclass(frozen=True)
class BenchResult:
    prompt_tps: float
    decode_tps: float
    runs: int
    upstream_prompt_tps: float | None = None
    upstream_decode_tps: float | None = None

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def prompt_tokens(engine: Engine, n: int) -> list[int]:
    tokens: list[int] = []
    while len(tokens) < n:
        tokens += engine.tokenize(FILLER)
    return tokens[:n]


def run_engine(engine: Engine, n_prompt: int, n_gen: int, repetitions: int, depth: int = 0) -> tuple[float, float]:
    """Median prompt tokens/s and decode tokens/s (greedy, end tokens suppressed), each measured after `depth`
    tokens already in the cache (llama-bench's -d: a long conversation's cost) and evaluated once, before timing.

    Each repetition cuts the cache back to the depth, as llama-bench starts each test from its depth."""
    greedy = Sampling(temperature=0, repeat_penalty=1.0, max_tokens=n_gen, ignore_eos=True)
    tokens = prompt_tokens(engine, depth + max(n_prompt, 16))
    engine.cache = []
    engine.complete(tokens[:depth] + tokens[depth:depth + 16], Sampling(temperature=0, max_tokens=4,
                                                                       ignore_eos=True))  # warm-up, and the depth
    pp, tg = [], []
    for _ in range(repetitions):
        engine.cache = engine.cache[:depth]  # evaluate the whole prompt after the depth, as llama-bench does
        engine.complete(tokens[:depth + n_prompt], Sampling(temperature=0, max_tokens=1, ignore_eos=True))
        pp.append(engine.stats.prompt_tps)
        engine.cache = engine.cache[:depth]
        _, stats = engine.complete(tokens[:depth + 16], greedy)
        if stats.generated_tokens != n_gen:
            raise UserError(f"the engine generated {stats.generated_tokens} tokens instead of {n_gen}; "
                            "raise --ctx")
        tg.append(stats.decode_tps)
    return statistics.median(pp), statistics.median(tg)
