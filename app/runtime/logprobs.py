"""Log-probabilities from logits: the log-softmax of every evaluation (perplexity, quantization loss, multiple-choice
log-likelihoods), all in float64, and its fast twin for the server's `logprobs` and `echo` (score_rows).

float64 because the KL of a good quantization (~1e-4 nats) is a small difference of large sums, and 30,080 float32
exponentials would put an error of ~1e-7 on each row's normaliser. The server can afford that 1e-7 (an answer's
log-probability, lm-eval's log-likelihood of a choice) but not the time; both live here so that they are tested
against each other (tests/test_logprobs.py) and lm-eval through the server gets the numbers `malhae eval` gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ROWS_AT_ONCE = 64  # rows per numpy pass: 64 × 30,080 float32 is 7.7 MB, in cache-friendly reach


def log_z(logits: np.ndarray) -> np.ndarray:
    """log Σ exp(row) for each row, stable (the row's maximum taken out first). ROWS_AT_ONCE rows at a time, so that
    the float64 temporaries stay a few MB whatever the number of rows (256 rows of 30,080 took 180 MB at once)."""
    out = np.empty(len(logits), dtype=np.float64)
    for i in range(0, len(logits), ROWS_AT_ONCE):
        x = logits[i:i + ROWS_AT_ONCE].astype(np.float64)
        peak = x.max(axis=-1, keepdims=True)
        out[i:i + ROWS_AT_ONCE] = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=-1))
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Every row's log-probabilities [rows, n_vocab] (the KL of `eval compare` needs them all)."""
    return logits.astype(np.float64) - log_z(logits)[:, None]


def log_prob(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) for each row: a choice's log-likelihood is their sum, a token's NLL their negative."""
    return logits[np.arange(len(targets)), targets].astype(np.float64) - log_z(logits)


def score_rows(logits: np.ndarray, targets: np.ndarray, n_top: int) -> tuple[np.ndarray, list[list[tuple[int, float]]]]:
    """log p(target) for each row of float32 logits [k, n_vocab], and each row's n_top likeliest (id, log p), best
    first (ties: the lower id). The server's logprobs and echo, where a row per prompt token must keep up with the
    prompt's evaluation.

    The exponentials are taken in float32 after each row's maximum is taken out (so each is at most 1) and summed in
    float64: within 1e-7 of log_z's all-float64 normaliser on polyglot-sized rows, and 88 µs a 30,080-logit row on
    the 2-core dev machine instead of 325 µs row by row through log_softmax (on a GPU, which evaluates a prompt token
    in tens of µs, this is what an echo costs). A token's value and its row's best are computed
    from the same normaliser, so "is the target the best" compares equal floats, as lm-eval's is_greedy does."""
    k = len(logits)
    out = np.empty(k, dtype=np.float64)
    tops: list[list[tuple[int, float]]] = []
    for start in range(0, k, ROWS_AT_ONCE):
        block = logits[start:start + ROWS_AT_ONCE]
        rows = np.arange(len(block))
        peak = block.max(axis=1, keepdims=True)
        z = peak[:, 0].astype(np.float64) + np.log(np.exp(block - peak).sum(axis=1, dtype=np.float64))
        out[start:start + len(block)] = block[rows, targets[start:start + len(block)]].astype(np.float64) - z
        if n_top <= 0:
            tops += [[] for _ in rows]
            continue
        n = min(n_top, block.shape[1])
        ids = block.argmax(axis=1)[:, None] if n == 1 else np.argpartition(-block, n - 1, axis=1)[:, :n]
        values = block[rows[:, None], ids].astype(np.float64) - z[:, None]
        for row_ids, row_values in zip(ids, values, strict=True):
            order = np.lexsort((row_ids, -row_values))
            tops.append([(int(row_ids[j]), float(row_values[j])) for j in order])
    return out, tops


@dataclass
class NLLSum:
    """Running sums of NLL and NLL², from which llama-perplexity reports its estimate and its ±."""

    count: int = 0
    nll: float = 0.0
    nll2: float = 0.0

    def add(self, values: np.ndarray) -> None:
        self.count += int(values.size)
        self.nll += float(values.sum())
        self.nll2 += float((values * values).sum())

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count) if self.count else float("nan")

    @property
    def error(self) -> float:
        """The ± llama-perplexity prints: the standard error of the mean NLL, carried through exp()."""
        if self.count < 2:
            return float("nan")
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        return math.sqrt(var / (self.count - 1)) * self.ppl if var > 0 else 0.0
