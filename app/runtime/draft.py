"""Drafters for speculative decoding: cheap guesses of the next few tokens, which the target model then checks.

Two kinds, one interface (`propose`):
- `Lookup` (prompt lookup, no second model): the answer often repeats its input (a document summarised or quoted, a
  law rewritten, code corrected), so what most often followed the current n-gram is likely to follow again. Longest
  n-gram first: a 4-token match predicts better than a 1-token one, which must also have been seen more than once.
- `DraftModel`: a small model of the same tokenizer (polyglot-ko-1.3b for 5.8b and 12.8b) decodes greedily ahead,
  and stops early where it is unsure of its own next token.

A drafter only proposes, and says of every token what kind of guess it was; how many of them are verified is decided
by app/runtime/speculate.py's `DraftLength`, which knows what verifying k tokens costs and how often guesses of each
kind were accepted, and whether they are right by the target's own sampler. A wrong draft costs time, never a
different answer.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from pathlib import Path
from typing import Protocol

import llama_cpp as lc
import numpy as np

from malhae.errors import UserError


class Drafter(Protocol):
    name: str
    seconds_per_token: float  # what drafting one token costs (0 for lookup): part of what speculation pays for
    cheap: bool  # guessing costs nothing next to a decode: guess up to the limit and let the kinds of guesses decide

    def propose(self, history: list[int], most: int) -> tuple[list[Hashable], list[int]]:
        """(keys, draft): at most `most` tokens likely to follow `history` (the prompt and every token accepted so
        far), and for each what kind of guess it was, so that acceptance is learned per kind."""
        ...

    def close(self) -> None: ...


# A guess from an n-gram is made only when its most frequent continuation has been seen at least MIN_SEEN[n] times
# and makes at least MIN_SHARE[n] of them: one earlier occurrence of a single token says little, one of four tokens
# in a row says much. (llama.cpp's lookup keeps the same kind of thresholds.)
MIN_SEEN = {1: 2, 2: 2, 3: 1, 4: 1}
MIN_SHARE = {1: 0.66, 2: 0.5, 3: 0.5, 4: 0.5}


class Lookup:
    """Prompt lookup: for every n-gram (n = 1 … n_max) of the history, how often each token followed it.

    The guess for the next token is the most frequent continuation of the longest n-gram that ends the text and has
    a confident one (MIN_SEEN, MIN_SHARE; the latest occurrence breaks a tie); a draft goes on guessing from its own
    guesses. The table is kept up to date as tokens are appended, so a step costs a few dictionary operations, not a
    scan of the context; a history that is not an extension of the last one (a new prompt) is indexed again."""

    name = "lookup"
    seconds_per_token = 0.0
    cheap = True

    def __init__(self, n_max: int = 4, n_min: int = 1) -> None:
        self.n_max = n_max
        self.n_min = n_min
        self.tokens: list[int] = []
        self.next: dict[tuple[int, ...], dict[int, list[int]]] = {}  # n-gram → token → [times seen, last index]

    def _sync(self, history: list[int]) -> None:
        n = len(self.tokens)
        if len(history) < n or history[:n] != self.tokens:
            self.tokens, self.next = [], {}
            n = 0
        tokens, table = self.tokens, self.next
        for i in range(n, len(history)):
            token = history[i]
            tokens.append(token)
            for k in range(1, min(self.n_max, i) + 1):  # the n-grams ending just before i are followed by `token`
                seen = table.setdefault(tuple(tokens[i - k:i]), {})
                entry = seen.get(token)
                if entry is None:
                    seen[token] = [1, i]
                else:
                    entry[0] += 1
                    entry[1] = i

    def _guess(self, tail: list[int]) -> tuple[tuple[int, int, bool], int] | None:
        """(kind, token): the confident continuation of the longest n-gram ending `tail`, or None. The kind is
        (n, times seen up to 3, whether every occurrence was followed by it): what makes a guess likely right."""
        for n in range(min(self.n_max, len(tail)), self.n_min - 1, -1):
            seen = self.next.get(tuple(tail[len(tail) - n:]))
            if not seen:
                continue
            token, (count, _) = max(seen.items(), key=lambda item: item[1])
            total = sum(e[0] for e in seen.values())
            if count >= MIN_SEEN.get(n, 1) and count >= MIN_SHARE.get(n, 0.5) * total:
                return (n, min(count, 3), count == total), token
        return None

    def propose(self, history: list[int], most: int) -> tuple[list[Hashable], list[int]]:
        self._sync(history)
        tail = history[-self.n_max:]
        keys: list[Hashable] = []
        draft: list[int] = []
        while len(draft) < most:
            guess = self._guess(tail)
            if guess is None:
                break
            key, token = guess
            keys.append(key)
            draft.append(token)
            tail = [*tail[1:], token] if len(tail) >= self.n_max else [*tail, token]
        return keys, draft

    def close(self) -> None:
        pass


CATCH_UP = 64  # a draft model evaluating more new tokens than this is reading a new prompt, not drafting
SURE = (0.9, 0.7, 0.5, 0.0)  # a draft model's guesses are told apart by how sure it was: p of its top token ≥ these


class DraftModel:
    """A second, smaller GGUF of the same vocabulary, decoding greedily in its own context.

    Its KV cache follows the history the way the engine's does (only what a new history adds is evaluated), and it
    stops drafting where its own most likely token has less than `p_min` of the probability: a guess it doubts is
    more often wrong than worth the verification rows it costs. Each guess's kind is how sure it was (SURE)."""

    def __init__(self, engine, target_model, *, p_min: float = 0.5) -> None:
        """`engine`: the draft model's app.runtime.engine.Engine (this drafter owns it from now on)."""
        check_same_vocab(target_model, engine.model, engine.path)
        self.engine = engine
        self.name = engine.path.name
        self.p_min = p_min
        self.seconds_per_token = 0.0
        self.cheap = False
        self._one = (lc.llama_token * 1)()

    def propose(self, history: list[int], most: int) -> tuple[list[Hashable], list[int]]:
        engine = self.engine
        most = min(most, engine.n_ctx - len(history))
        if most <= 0:
            return [], []
        started = time.perf_counter()
        engine.evaluate(history)
        if len(history) - engine.stats.cached_tokens > CATCH_UP:  # a new prompt: paid once, not per drafted token
            started = time.perf_counter()
        ctx, n_vocab = engine.ctx.ptr, engine.n_vocab
        keys: list[Hashable] = []
        draft: list[int] = []
        while True:
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            token = int(logits.argmax())
            top = logits[token]
            p = 1.0 / float(np.exp(logits - top).sum())
            if p < self.p_min and draft or lc.llama_vocab_is_eog(engine.vocab, token):
                break
            keys.append(next(level for level in SURE if p >= level))
            draft.append(token)
            if len(draft) >= most:
                break
            self._one[0] = token
            if lc.llama_decode(ctx, lc.llama_batch_get_one(self._one, 1)) != 0:
                break
            engine.cache.append(token)
        spent = (time.perf_counter() - started) / max(1, len(draft))
        self.seconds_per_token = spent if not self.seconds_per_token else 0.8 * self.seconds_per_token + 0.2 * spent
        return keys, draft

    def close(self) -> None:
        self.engine.close()


def check_same_vocab(target, draft, path: Path) -> None:
    """A draft must speak the target's tokens: same count and the same text for every id, else its guesses are
    verified against the wrong tokens (never wrong output, but nothing accepted). Refused in one line naming the
    first difference."""
    n_target, n_draft = target.n_vocab, draft.n_vocab
    if n_target != n_draft:
        raise UserError(f"{path.name} cannot draft for this model: its vocabulary has {n_draft:,} tokens and the "
                        f"model's {n_target:,}; a draft model must use the same tokenizer (Polyglot-Ko models share "
                        "one)")
    for token in range(n_target):
        a, b = target.token_bytes(token), draft.token_bytes(token)
        if a != b:
            raise UserError(f"{path.name} cannot draft for this model: token {token} is {b!r} there and {a!r} here; "
                            "a draft model must use the same tokenizer (Polyglot-Ko models share one)")

