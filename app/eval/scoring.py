"""Log-probabilities from logits, and the running sums a perplexity and its ± come from.

One log-softmax for every evaluation (perplexity, quantization loss, multiple-choice log-likelihoods), all in float64:
the KL of a good quantization (~1e-4 nats) is a small difference of large sums, and 30,080 float32 exponentials would
put an error of ~1e-7 on each row's normaliser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def log_z(logits: np.ndarray) -> np.ndarray:
    """log Σ exp(row) for each row, stable (the row's maximum taken out first)."""
    x = logits.astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    return peak[:, 0] + np.log(np.exp(x - peak).sum(axis=-1))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Every row's log-probabilities [rows, n_vocab] (the KL of `eval compare` needs them all)."""
    return logits.astype(np.float64) - log_z(logits)[:, None]


def log_prob(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) for each row: a choice's log-likelihood is their sum, a token's NLL their negative."""
    return logits[np.arange(len(targets)), targets].astype(np.float64) - log_z(logits)


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
