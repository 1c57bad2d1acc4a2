"""Macro F1 and accuracy, as the polyglot branch aggregates KoBEST (sklearn's f1_score(average="macro")).

Written in numpy because scikit-learn is not a dependency. sklearn's semantics are kept where they matter: the
classes averaged over are those present in the golds OR the predictions (sorted union), and a class whose precision
or recall is 0/0 counts as F1 0 (its zero_division default after the warning). So a model that always answers
"예" on a set with both labels gets F1 = (2p/(1+p) + 0) / 2 for the "예" share p — the reason the seed's 0-shot BoolQ
and WiC numbers sit near 0.33-0.35.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def macro_f1(golds: Sequence[int], preds: Sequence[int]) -> float:
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} golds but {len(preds)} predictions")
    if not golds:
        return float("nan")
    g = np.asarray(golds)
    p = np.asarray(preds)
    scores = []
    for label in np.union1d(g, p):
        tp = np.sum((g == label) & (p == label))
        fp = np.sum((g != label) & (p == label))
        fn = np.sum((g == label) & (p != label))
        denom = 2 * tp + fp + fn  # F1 = 2PR/(P+R) = 2tp/(2tp+fp+fn); 0 when tp is 0
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def accuracy(golds: Sequence[int], preds: Sequence[int]) -> float:
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} golds but {len(preds)} predictions")
    if not golds:
        return float("nan")
    return float(np.mean(np.asarray(golds) == np.asarray(preds)))
