"""Speculative decoding: check several drafted tokens in one llama_decode, keep those the target would have chosen.

Decode is bound by reading the weights once per llama_decode, so evaluating the next token together with k guesses
costs far less than k+1 decodes (on a GPU almost nothing more; on 2 CPU cores 1.5× for 2 rows, 2.9× for 4, 5.5× for
8). At each drafted position the target's own sampler chain samples once, exactly as plain decoding would after the
same tokens; a guess is kept while it equals that sample, and the first sample that differs is kept instead of the
guess, with the rest of the draft dropped from the KV cache. So greedy output is plain decoding's, and sampled output
follows the same distribution — with the same seed the same text, since the sampler draws once per output token
either way.

Whether to draft, and how much, is decided per step by `DraftLength` from what it has measured: the cost of a decode
of r rows on this machine and the rate at which drafted tokens of each kind were accepted, so that a draft is
verified only as far as its expected tokens per second beat plain decoding's.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

import llama_cpp as lc

from malhae.errors import UserError
from malhae.runtime.draft import Drafter
from malhae.runtime.llama import Batch
from malhae.runtime.sampler import Sampler

PRIOR_ACCEPT = 0.7  # how often an untried kind of drafted token is assumed to be accepted …
PRIOR_WEIGHT = 2.0  # … worth this many observations
DECAY = 0.97  # older observations fade, so the length follows the text (a quoted passage ends, a new one starts)
PRIOR_ROW_COST = 0.6  # an unmeasured extra row costs this × one token (2 CPU cores measure 0.5-0.65; a GPU ~0.02)
EXPLORE_AFTER = 32  # steps without drafting before one short draft tries again (≤ 1.6% of plain speed on a CPU)


class DraftLength:
    """How many drafted tokens to verify: the k that maximises expected tokens per second.

    Every drafted token comes with its kind (`key`: for a lookup the n-gram length, how often it was seen and whether
    all its occurrences agreed; for a draft model how sure the draft was), and each kind's chance of being accepted
    when all before it were is measured as the run goes. With p_i the chance of the i-th drafted token, a draft of k
    yields E(k) = 1 + p_1 + p_1·p_2 + … tokens for one decode of k+1 rows (plus drafting k tokens, for a draft
    model), whose cost is measured too; k = 0 is plain decoding. Measured per kind of token, not per position in the
    draft: a 4-gram guess seen once is then not judged by the 1-gram guesses that began other drafts (ten answers of
    the heavy twin replayed by benchmarks/lookup_replay.py: 1.20× plain per position, 1.27× per kind, geometric
    means; measured side by side, the two were within 4% of each other, per kind ahead on three prompts of six)."""

    def __init__(self, draft_max: int, *, costs: dict[int, float] | None = None,
                 draft_cost: float | None = None) -> None:
        """`costs` (rows → seconds) and `draft_cost` (seconds per drafted token) fix what is otherwise measured: for
        tests and benchmarks that need the same choices whatever the machine's load."""
        self.draft_max = draft_max
        self.fixed = costs is not None
        self.cost: dict[int, float] = dict(costs or {})  # rows → seconds of one decode (median of recent ones)
        self.draft_cost = draft_cost
        self._times: dict[int, deque[float]] = {}
        self.tried: dict[Hashable, float] = {}  # kind of token → times verified, and times kept (both decayed)
        self.kept: dict[Hashable, float] = {}
        self.skipped = 0  # steps in a row where no draft paid
        self._explore = False

    def row_cost(self, rows: int) -> float:
        """Seconds for a decode of `rows`: measured, else interpolated between measured sizes, else extrapolated
        along the slope of the two largest measured, else along PRIOR_ROW_COST from one token's (itself estimated
        from the smallest measured size when plain decoding has not run yet)."""
        cost = self.cost
        if rows in cost:
            return cost[rows]
        if not cost:
            return 1.0 + PRIOR_ROW_COST * (rows - 1)
        below = sorted(r for r in cost if r < rows)
        above = [r for r in cost if r > rows]
        if below and above:
            lo, hi = below[-1], min(above)
            return cost[lo] + (cost[hi] - cost[lo]) * (rows - lo) / (hi - lo)
        if len(below) >= 2:  # beyond the longest measured: continue its slope
            a, b = below[-2:]
            return cost[b] + max((cost[b] - cost[a]) / (b - a), 0.0) * (rows - b)
        r0 = min(cost)
        one = cost[1] if 1 in cost else cost[r0] / (1.0 + PRIOR_ROW_COST * (r0 - 1))
        return cost[r0] + PRIOR_ROW_COST * one * (rows - r0)

    def accept_rate(self, key: Hashable) -> float:
        """The chance a drafted token of this kind is accepted when all before it were; an untried kind is assumed
        to be accepted PRIOR_ACCEPT of the time, so a new kind of guess gets tried."""
        return (self.kept.get(key, 0.0) + PRIOR_ACCEPT * PRIOR_WEIGHT) / (self.tried.get(key, 0.0) + PRIOR_WEIGHT)

    def _best(self, rates: list[float], draft_seconds: float) -> int:
        best_k, best_rate = 0, 1.0 / self.row_cost(1)
        expected, reach = 1.0, 1.0
        for k, p in enumerate(rates, 1):
            reach *= p
            expected += reach
            rate = expected / (self.row_cost(k + 1) + k * draft_seconds)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def _skip(self) -> int:
        """Nothing paid this step. What did not pay may pay now (the text moved on to something quoted): after
        EXPLORE_AFTER such steps, one token is tried (≤ 1.6% of plain speed on a CPU)."""
        self.skipped += 1
        if self.skipped < EXPLORE_AFTER:
            return 0
        self.skipped, self._explore = 0, True
        return 1

    def reach(self, limit: int, draft_seconds: float = 0.0) -> int:
        """How many tokens a drafter that spends time on each (a draft model) should draft at most: as many as
        would pay if every one were of the best kind measured so far."""
        limit = min(limit, self.draft_max)
        if limit <= 0:
            return 0
        if self.draft_cost is not None:
            draft_seconds = self.draft_cost
        best = max((self.accept_rate(key) for key in self.tried), default=PRIOR_ACCEPT)
        k = self._best([best] * limit, draft_seconds)
        return k if k else self._skip()

    def cut(self, keys: list[Hashable]) -> int:
        """How many of the drafted tokens, of these kinds in this order, to verify. Drafting them is done, so only
        the verification's rows are weighed."""
        keys = keys[:self.draft_max]
        if not keys:
            return 0
        k = self._best([self.accept_rate(key) for key in keys], 0.0)
        if self._explore:
            self._explore = False
            return max(k, 1)
        if not k:
            return self._skip()
        self.skipped = 0
        return k

    def timed(self, rows: int, seconds: float) -> None:
        """A decode of `rows` took `seconds`. The median of the last few: a machine that is busy elsewhere stalls
        a decode now and then (a second, on 2 shared cores), and one stall must not make a length look too dear to
        try again."""
        if self.fixed:
            return
        times = self._times.setdefault(rows, deque(maxlen=9))
        times.append(seconds)
        self.cost[rows] = sorted(times)[len(times) // 2]

    def observe(self, keys: list[Hashable], accepted: int) -> None:
        """A draft of tokens of these kinds had its first `accepted` kept; the one after them, if any, was rejected,
        and those after that were never really tried."""
        for i, key in enumerate(keys[:accepted + 1]):
            self.tried[key] = self.tried.get(key, 0.0) * DECAY + 1.0
            self.kept[key] = self.kept.get(key, 0.0) * DECAY + (1.0 if i < accepted else 0.0)


@dataclass
class Counts:
    proposed: int = 0
    accepted: int = 0


class Speculator:
    """A drafter, its DraftLength, and the batch one verification decodes: what an Engine (or a server slot) needs to
    speculate. One per model; it carries no state of a generation other than what it learned."""

    def __init__(self, drafter: Drafter, draft_max: int, source: object = None) -> None:
        self.drafter = drafter
        self.source = source  # what it was made from ("lookup", a Path), so that asking for it again reloads nothing
        self.counts = Counts()
        self.batch: Batch | None = None
        self.resize(draft_max)

    def resize(self, draft_max: int) -> None:
        """Verify at most `draft_max` drafted tokens per decode from now on (what was measured starts again)."""
        if self.batch is not None:
            self.batch.close()
        self.draft_max = draft_max
        self.length = DraftLength(self.draft_max)
        self.batch = Batch(self.draft_max + 1)

    @property
    def name(self) -> str:
        return self.drafter.name

    def draft_for(self, history: list[int], limit: int) -> tuple[list[Hashable], list[int]]:
        """(keys, draft): what to verify after `history`, at most `limit` tokens: the drafter's guesses (as many as
        could pay, for a drafter that spends time on each), cut to the length DraftLength finds best."""
        if limit <= 0:
            return [], []
        drafter, length = self.drafter, self.length
        most = min(limit, self.draft_max) if drafter.cheap else length.reach(limit, drafter.seconds_per_token)
        keys, draft = drafter.propose(history, most) if most > 0 else ([], [])
        k = length.cut(keys[:most])
        return keys[:k], draft[:k]

    def advance(self, ctx, chain: Sampler, seq: int, history: list[int], limit: int) -> list[int]:
        """Decode the last token of `history` (at position len(history) - 1 of sequence `seq`) with a draft of at
        most `limit` tokens, when one pays; return the tokens sampled after it: the accepted draft and one more.

        The KV cache then holds history and the accepted draft, nothing else."""
        length = self.length
        keys, draft = self.draft_for(history, limit)
        pos = len(history) - 1
        batch = self.batch
        rows = 1 + len(draft)
        batch.fill([history[-1], *draft], range(pos, pos + rows), seq)
        started = time.perf_counter()
        rc = lc.llama_decode(ctx, batch.ptr)
        seconds = time.perf_counter() - started
        if rc != 0:
            lc.llama_memory_seq_rm(lc.llama_get_memory(ctx), seq, pos, -1)
            raise UserError(f"llama.cpp failed while generating (llama_decode of {rows} tokens returned {rc})")
        length.timed(rows, seconds)
        out: list[int] = []
        sample = chain.sample
        for i in range(rows):
            token = sample(ctx, i)
            out.append(token)
            if i == len(draft) or token != draft[i]:
                break
        if draft:
            accepted = len(out) - 1
            length.observe(keys, accepted)
            self.counts.proposed += len(draft)
            self.counts.accepted += accepted
            if len(out) < rows:  # the rejected part of the draft leaves the cache
                lc.llama_memory_seq_rm(lc.llama_get_memory(ctx), seq, pos + len(out), -1)
        return out

    def close(self) -> None:
        self.batch.close()
        self.drafter.close()
