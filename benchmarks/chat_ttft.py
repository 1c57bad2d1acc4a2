"""Time to first token on turn 1 vs turn 10 of a chat: the KV cache makes a late turn cost only its own tokens.

    python benchmarks/chat_ttft.py MODEL.gguf [--turns 10] [--answer-tokens 32] [--repeat 3] [--threads N]
                                  [--gpu-layers auto|N]

A conversation of short Korean messages goes through the REPL's own path (app.chat.conversation builds and fits each
prompt, the engine evaluates only what is not cached, answers are kept as the REPL keeps them). Per turn it reports
the prompt size, how much of it was already in the KV cache, the engine's time to first token and the wall time from
the message to its first piece (which also counts tokenizing and fitting the whole conversation). The last turn is
then measured once more with the cache emptied: what the turn would cost without reuse. Medians over --repeat runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from malhae.chat.conversation import Conversation  # noqa: E402
from malhae.runtime import templates  # noqa: E402
from malhae.runtime.engine import Engine  # noqa: E402
from malhae.runtime.settings import (
    LoadOptions,  # noqa: E402
    Sampling,  # noqa: E402
)

MESSAGES = ["안녕하세요", "대한민국의 수도는 어디인가요?", "헌법 제1조는 무엇인가요?", "국회의원의 임기는 몇 년인가요?",
            "대통령의 임기는요?", "고마워요", "법원은 무엇을 하나요?", "헌법재판소는요?", "국민의 의무를 알려 주세요",
            "마지막 질문입니다", "하나 더 물어볼게요", "정말 마지막이에요"]


def turn(engine: Engine, conv: Conversation, message: str, sampling: Sampling) -> dict:
    start = time.perf_counter()
    prepared = conv.ask(message, engine.tokenize, engine.n_ctx)
    first = None
    pieces = []
    for piece in engine.generate(prepared.tokens, sampling):
        if first is None:
            first = time.perf_counter() - start
        pieces.append(piece)
    conv.answer("".join(pieces).strip())
    s = engine.stats
    return {"prompt": s.prompt_tokens, "cached": s.cached_tokens, "ttft": s.ttft * 1000,
            "wall": (first if first is not None else time.perf_counter() - start) * 1000, "dropped": prepared.dropped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=None)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--gpu-layers", default="auto")
    args = parser.parse_args()

    with Engine(LoadOptions(model=args.model, ctx=args.ctx, threads=args.threads, gpu_layers=args.gpu_layers),
                notify=print) as engine:
        template = templates.for_model(engine.name)
        where = engine.plan.where
        print(f"{args.model.name}: {engine.options.threads} threads, {where}, context {engine.n_ctx}, template "
              f"{template.name}, answers of {args.answer_tokens} tokens", flush=True)
        runs: list[list[dict]] = []
        cold: list[dict] = []
        for _ in range(args.repeat):
            engine.cache = []
            conv = Conversation(template, Sampling(seed=1, max_tokens=args.answer_tokens, ignore_eos=True))
            sampling = conv.answer_sampling()
            rows = [turn(engine, conv, MESSAGES[i % len(MESSAGES)], sampling) for i in range(args.turns)]
            runs.append(rows)
            conv.undo()  # the last turn again, from an empty cache
            engine.cache = []
            cold.append(turn(engine, conv, MESSAGES[(args.turns - 1) % len(MESSAGES)], replace(sampling)))

    def med(i: int, key: str) -> float:
        return statistics.median(rows[i][key] for rows in runs)

    print(f"\n{'turn':>4} {'prompt':>7} {'cached':>7} {'evaluated':>9} {'ttft ms':>8} {'wall ms':>8}")
    for i in range(args.turns):
        dropped = "  (oldest turns dropped)" if any(rows[i]["dropped"] for rows in runs) else ""
        print(f"{i + 1:>4} {med(i, 'prompt'):>7.0f} {med(i, 'cached'):>7.0f} "
              f"{med(i, 'prompt') - med(i, 'cached'):>9.0f} {med(i, 'ttft'):>8.1f} {med(i, 'wall'):>8.1f}{dropped}")
    last = args.turns - 1
    cold_ttft = statistics.median(c["ttft"] for c in cold)
    cold_prompt = statistics.median(c["prompt"] for c in cold)
    print(f"\nmedian over {args.repeat} runs: time to first token turn 1 {med(0, 'ttft'):.1f} ms, turn {args.turns} "
          f"{med(last, 'ttft'):.1f} ms (wall {med(0, 'wall'):.1f} / {med(last, 'wall'):.1f} ms, including tokenizing "
          f"and fitting the conversation); turn {args.turns} without KV reuse ({cold_prompt:.0f} tokens evaluated): "
          f"{cold_ttft:.1f} ms")


if __name__ == "__main__":
    main()
