"""Prompt lookup, replayed: how far the guesses and the draft lengths could take decoding, free of timing noise.

    python benchmarks/lookup_replay.py [-m MODEL.gguf] [--threads 2] [--tokens 300] [--cases all|quote,bill,…]
                                       [--costs verify.json] [--answers answers.json]

benchmarks/speculative.py measures real speed, but on a shared 2-core machine a ratio moves by ±0.1 from round to
round, too much to tell two draft-length rules apart. This script separates the question in two:
1. It records each case's plain greedy answer once (the heavy twin at Q4_K_M by default; `--answers` keeps them).
2. It replays every answer through a policy and adds up what the decodes it asks for would cost, from one table of
   verification costs (`--costs`: `benchmarks/verify_cost.py --json` output; measured here when not given, with the
   prompt's length in the cache). Greedy speculation yields exactly the plain answer, so which guesses are kept is
   known; only the cost table is a model (the median decode time of each row count).

Policies: malhae (app.runtime's Lookup and the Speculator's DraftLength, as `--draft lookup` runs them; a test
checks that the replay proposes and keeps exactly what the engine does); fixed k (every guess chain of up to k tokens
verified, as upstream llama-lookup does with `--spec-draft-n-max k`); and the oracle: the same guesses, verified at
every step as far as makes the whole answer fastest, knowing which will be kept. No rule for lookup's draft lengths
can beat the oracle on this cost table: it is the ceiling of prompt lookup on this machine. Prints a markdown table
of projected speed × plain decoding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.speculative import cases, twin  # noqa: E402
from malhae.runtime.draft import Lookup  # noqa: E402
from malhae.runtime.engine import Engine  # noqa: E402
from malhae.runtime.settings import LoadOptions, Sampling  # noqa: E402
from malhae.runtime.speculate import DraftLength, Speculator  # noqa: E402

FIXED = (1, 2, 3, 4, 8)


def record(model: Path, prompts: dict[str, str], tokens: int, threads: int) -> dict[str, dict[str, list[int]]]:
    """{case: {"prompt": token ids, "answer": plain greedy token ids}}."""
    sampling = Sampling(temperature=0, repeat_penalty=1.0, max_tokens=tokens, ignore_eos=True)
    out = {}
    with Engine(LoadOptions(model=model, ctx=2048, threads=threads)) as engine:
        for case, prompt in prompts.items():
            ids = engine.tokenize(prompt)
            if len(ids) + tokens > engine.n_ctx:
                print(f"{case}: {len(ids)} prompt tokens leave no room for {tokens}; skipped", file=sys.stderr)
                continue
            engine.cache = []
            "".join(engine.generate(ids, sampling))
            out[case] = {"prompt": ids, "answer": list(engine.generated)}
            print(f"{case}: recorded ({len(ids)} + {len(engine.generated)} tokens)", file=sys.stderr)
    return out


def measured_costs(model: Path, threads: int, prompt: int) -> dict[int, float]:
    from benchmarks import verify_cost

    times = verify_cost.measure(model, [1, 2, 3, 4, 5, 6, 8, 12, 16, 17], threads=threads, reps=7, prompt=prompt)
    return {k: statistics.median(ts) for k, ts in times.items()}


def kept(draft: list[int], answer: list[int], j: int) -> int:
    """How many of `draft` equal the answer from position j on."""
    n = 0
    while n < len(draft) and j + n < len(answer) and draft[n] == answer[j + n]:
        n += 1
    return n


def replay(case: dict[str, list[int]], costs: dict[int, float], policy: str | int) -> tuple[float, int, int]:
    """(projected speed × plain, tokens proposed, tokens kept) of one answer under `policy`."""
    if policy == "oracle":
        return oracle(case, costs)
    prompt, answer = case["prompt"], case["answer"]
    spec = Speculator(Lookup(), 16)
    spec.length = length = DraftLength(16, costs=costs)
    j, seconds, proposed, accepted = 1, 0.0, 0, 0  # the first token comes from the prompt's evaluation
    while j < len(answer):
        history, limit = prompt + answer[:j], len(answer) - j - 1
        if policy == "malhae":
            keys, draft = spec.draft_for(history, limit)
            n = kept(draft, answer, j)
            if draft:
                length.observe(keys, n)
        else:
            _, draft = spec.drafter.propose(history, min(limit, int(policy)))
            n = kept(draft, answer, j)
        seconds += length.row_cost(1 + len(draft))
        proposed, accepted, j = proposed + len(draft), accepted + n, j + n + 1
    spec.close()
    return (len(answer) - 1) * length.row_cost(1) / seconds, proposed, accepted


def oracle(case: dict[str, list[int]], costs: dict[int, float]) -> tuple[float, int, int]:
    """The least time any draft length rule could take with lookup's guesses: a lookup's guesses after a history do
    not depend on how the history was reached, so the best number to verify at every position follows by dynamic
    programming from the end of the answer."""
    prompt, answer = case["prompt"], case["answer"]
    lookup, length = Lookup(), DraftLength(16, costs=costs)
    end = len(answer)
    right = [0] * end  # right[j]: how many of the guesses after answer[:j] are kept
    for j in range(1, end):
        _, draft = lookup.propose(prompt + answer[:j], min(16, end - j - 1))
        right[j] = kept(draft, answer, j)
    best, step = [0.0] * (end + 1), [0] * (end + 1)
    for j in range(end - 1, 0, -1):
        best[j], step[j] = min((length.row_cost(k + 1) + best[j + k + 1], k) for k in range(right[j] + 1))
    j, verified = 1, 0
    while j < end:
        verified, j = verified + step[j], j + step[j] + 1
    return (end - 1) * length.row_cost(1) / best[1], verified, verified


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", type=Path, help="the target GGUF (default: the heavy twin at Q4_K_M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--cases", default="all", help="names from benchmarks/speculative.py's cases(), or all")
    parser.add_argument("--costs", type=Path, help="benchmarks/verify_cost.py --json output (default: measure now)")
    parser.add_argument("--answers", type=Path, help="keep the recorded answers here and reuse them next time")
    a = parser.parse_args()
    model = a.model or twin(a.threads)
    prompts = cases(5000)
    if a.cases != "all":
        prompts = {k: v for k, v in prompts.items() if k in a.cases.split(",")}
    if a.answers and a.answers.exists():
        answers = json.loads(a.answers.read_text(encoding="utf-8"))
    else:
        answers = record(model, prompts, a.tokens, a.threads)
        if a.answers:
            a.answers.write_text(json.dumps(answers), encoding="utf-8")
    if a.costs:
        raw = json.loads(a.costs.read_text(encoding="utf-8"))["seconds"]
        costs = {int(k): statistics.median(v) for k, v in raw.items()}
    else:
        longest = max(len(c["prompt"]) for c in answers.values())
        costs = measured_costs(model, a.threads, min(longest, 1800))
    policies: list[str | int] = ["malhae", *FIXED, "oracle"]
    rows = {case: {p: replay(answers[case], costs, p) for p in policies} for case in answers}
    one = costs[1]
    print(f"\n{model.name}, {a.threads} threads, {a.tokens} tokens greedy; verification cost × one token: "
          + ", ".join(f"{k} {c / one:.2f}" for k, c in sorted(costs.items()) if k in (2, 4, 8, 16)))
    names = [f"k={p}" if isinstance(p, int) else p for p in policies]
    print("\n| case | " + " | ".join(names) + " |\n|---|" + "---:|" * len(policies))
    for case, row in rows.items():
        cells = [f"{row[p][0]:.2f}×" + (f" ({row[p][2]}/{row[p][1]})" if p in ("malhae", "oracle") else "")
                 for p in policies]
        print(f"| {case} | " + " | ".join(cells) + " |")
    geo = [statistics.geometric_mean(row[p][0] for row in rows.values()) for p in policies]
    print("| geometric mean | " + " | ".join(f"{g:.2f}×" for g in geo) + " |")


if __name__ == "__main__":
    main()
