"""Scoring on a server's model: `eval kobest --endpoint` and `eval ppl --endpoint`.

A server cannot hand out logits; what it can return (malhae serve, vLLM; llama-server cannot) is the log-probability
of every prompt token given the ones before it (`echo` + `logprobs` on /v1/completions). That is all both evaluations
need: a choice's log-likelihood is the sum over its tokens, a perplexity window's NLL the negated values of its scored
half. The procedures — the harness's left truncation, llama-perplexity's windows — are the local ones' (app.eval.loglik,
app.runtime.windows), so a number from a server and one from the same GGUF here differ only by floating-point rounding.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

from malhae.errors import UserError
from malhae.eval.loglik import Choice, check_choices
from malhae.eval.perplexity import PerplexityResult, Progress
from malhae.eval.scoring import NLLSum
from malhae.runtime.windows import Layout, read_text, windows

ECHO_MARGIN = 2  # a scored prompt plus the one token a request must ask for, within the server's context
WINDOWS_PER_REQUEST = 4
T = TypeVar("T")
R = TypeVar("R")
DEFAULT_CONCURRENCY = 4  # requests in flight: a server batches them (malhae serve's 4 slots, vLLM's many)
MAX_CONCURRENCY = 64


def check_concurrency(n: int) -> int:
    if not 1 <= n <= MAX_CONCURRENCY:
        raise UserError(f"--concurrency {n}: give 1 to {MAX_CONCURRENCY} requests in flight (default "
                        f"{DEFAULT_CONCURRENCY}; a server with N slots is busy with N)")
    return n


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """fn over items with up to `workers` calls running at once, results in the items' order. Daemon threads: a
    failure or Ctrl-C ends the run at once (nothing more starts; what is in flight is abandoned, and its closed
    connection tells the server), where a thread pool would make the process wait for it on exit."""
    todo = list(items)
    if workers <= 1 or len(todo) <= 1:
        yield from map(fn, todo)
        return
    results: dict[int, tuple[bool, object]] = {}
    cond = threading.Condition()
    state = {"next": 0, "stop": False}

    def work() -> None:
        while True:
            with cond:
                if state["stop"] or state["next"] >= len(todo):
                    return
                i = state["next"]
                state["next"] += 1
            try:
                result: tuple[bool, object] = (True, fn(todo[i]))
            except BaseException as e:  # handed to the caller, raised there
                result = (False, e)
            with cond:
                results[i] = result
                cond.notify_all()

    for _ in range(min(workers, len(todo))):
        threading.Thread(target=work, daemon=True, name="malhae-eval").start()
    try:
        for i in range(len(todo)):
            with cond:
                while i not in results:
                    cond.wait(0.2)  # a timeout, so that Ctrl-C is seen at once
                ok, value = results.pop(i)
            if not ok:
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
    finally:
        with cond:
            state["stop"] = True


class RemoteScorer:
    """malhae.eval.loglik.Scorer's interface on a server: `score(context, continuations)` → Choices."""

    def __init__(self, backend, max_length: int | None = None, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        backend.check_echo()
        self.backend = backend
        self.concurrency = check_concurrency(concurrency)
        # the harness feeds max_length + 1 tokens' worth of context; the server must also fit the asked-for token
        self.max_length = max_length or backend.n_ctx - ECHO_MARGIN
        if self.max_length < 2:
            raise UserError(f"the server's context of {backend.n_ctx} tokens is too small to score anything")

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """Several docs in flight at once, in order (app.eval.kobest.evaluate.score uses it when present)."""
        return ordered_map(fn, items, self.concurrency)

    def tokenize(self, text: str) -> list[int]:
        """As HFLM.tok_encode: no special tokens added."""
        return self.backend.tokenize(text, add_special=False)

    def score(self, context: list[int], continuations: list[list[int]]) -> list[Choice]:
        check_choices(context, continuations, self.max_length, "the server's window")
        # the harness's input is (context + continuation)[-(max_length + 1):][:-1], predicting the tokens after
        # each: exactly the log-probabilities of the echoed sequence (context + continuation)[-(max_length + 1):]
        prompts = [(context + cont)[-(self.max_length + 1):] for cont in continuations]
        scored = self.backend.prompt_logprobs(prompts)
        out = []
        for cont, values in zip(continuations, scored, strict=True):
            tail = values[-len(cont):]
            out.append(Choice(float(sum(v for v, _ in tail)), all(g for _, g in tail)))
        return out


def perplexity(backend, text_path: Path, *, n_ctx: int = 512, progress: Progress | None = None,
               concurrency: int = DEFAULT_CONCURRENCY) -> PerplexityResult:
    """llama-perplexity's number for the server's model: the same tokens (the server's own tokenizer, special tokens
    added, none parsed from the text), windows and scored halves as app.eval.perplexity."""
    layout = Layout.of(n_ctx, n_ctx)
    text = read_text(text_path)
    backend.check_echo()
    if n_ctx + ECHO_MARGIN - 1 > backend.n_ctx:
        raise UserError(f"--ctx {n_ctx} does not fit the server's context of {backend.n_ctx} tokens (a window and "
                        f"the token a request asks for); use --ctx {backend.n_ctx - ECHO_MARGIN + 1} or less")
    tokens = backend.tokenize(text, add_special=True, parse_special=False)
    chunks = windows(tokens, n_ctx)
    if not chunks:
        raise UserError(f"the text is {len(tokens)} tokens long, shorter than one window of {n_ctx}; give a longer "
                        "text or a smaller --ctx")
    bos = backend.tokenize("", add_special=True)  # [BOS] where the vocabulary adds one, as text_windows puts it
    if bos:
        chunks = [[bos[0], *c[1:]] for c in chunks]
    sums = NLLSum()
    started = time.perf_counter()
    done = 0
    groups = [chunks[start:start + WINDOWS_PER_REQUEST] for start in range(0, len(chunks), WINDOWS_PER_REQUEST)]
    for scored_group in ordered_map(backend.prompt_logprobs, groups, check_concurrency(concurrency)):
        for values in scored_group:
            # values[j - 1] is log p(token j | tokens before it); llama-perplexity scores tokens first+1 … n_ctx-1
            scored = np.array([v for v, _ in values[layout.first:]], dtype=np.float64)
            sums.add(-scored)
            done += 1
            if progress:
                progress(done, len(chunks), sums.ppl)
    return PerplexityResult(f"{backend.name} at {backend.endpoint.url}", sums.ppl, sums.error, sums.count,
                            len(chunks), n_ctx, n_ctx, 1, len(tokens), time.perf_counter() - started)
