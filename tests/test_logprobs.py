"""The server's fast log-probabilities (float32 exponentials, float64 sums) against the all-float64 log-softmax that
`malhae eval` scores with, on rows shaped like Polyglot-Ko's (30,080 logits)."""

from __future__ import annotations

import numpy as np

from malhae.runtime.logprobs import log_softmax, score_rows


def test_score_rows_equals_the_float64_log_softmax():
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(150, 30080)) * 4).astype(np.float32)
    logits[7, 11] = logits[7, 12] = logits[7].max() + 1  # a tie for the best: the lower id comes first
    targets = rng.integers(0, 30080, size=150)
    targets[9] = int(logits[9].argmax())
    values, tops = score_rows(logits, targets, 3)
    ref = log_softmax(logits)
    assert np.abs(values - ref[np.arange(150), targets]).max() < 1e-6
    for row, top in zip(ref, tops, strict=True):
        best = np.argsort(-row, kind="stable")[:3]
        assert [t for t, _ in top] == [int(b) for b in best]
        assert all(abs(v - row[t]) < 1e-6 for t, v in top)
    assert [t for t, _ in tops[7]][:2] == [11, 12]
    assert values[9] == tops[9][0][1]  # the target is the best: equal floats, as lm-eval's is_greedy compares


def test_score_rows_top1_and_none():
    logits = np.array([[0.0, 2.0, 1.0], [5.0, 5.0, -1.0]], dtype=np.float32)
    values, tops = score_rows(logits, np.array([2, 0]), 1)
    assert [t[0][0] for t in tops] == [1, 0]
    assert values[1] == tops[1][0][1]
    _, none = score_rows(logits, np.array([0, 1]), 0)
    assert none == [[], []]
