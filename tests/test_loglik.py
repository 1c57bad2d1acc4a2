"""malhae.eval.loglik: shared-prefix batched scoring gives the numbers of plain one-sequence evaluation, harness
arithmetic.

The reference here is always the simplest path: app.runtime.llama.Context.logits on the whole token sequence from an
empty cache (one sequence, every position's logits), and a log-softmax written out in the test. The scorer's tricks —
one prompt decoded for all choices with several seq ids, the last prompt token repeated per choice, batches split at
n_batch, the harness's left truncation — must not change a single number beyond float noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from malhae.errors import UserError
from malhae.eval.loglik import Scorer
from malhae.eval.scoring import log_prob
from malhae.runtime.llama import Context, Model
from malhae.runtime.settings import LoadOptions

GGUF = Path(__file__).resolve().parent.parent / "models" / "malhae-demo-ko-f16.gguf"
PROMPT = "대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. 질문: 주권은 누구에게 있나? 답변: "
CHOICES = [" 국민", " 대통령에게 있다", " 아니오", " 예"]


@pytest.fixture(scope="module")
def model():
    with Model(GGUF) as m:
        yield m


def _reference(model: Model, context: list[int], cont: list[int], max_length: int) -> float:
    """The harness's _loglikelihood_tokens for one request, on one plain sequence."""
    inp = (context + cont)[-(max_length + 1):][:-1]
    with Context(model, LoadOptions(ctx=max_length, batch=max_length, threads=1)) as ctx:
        logits = ctx.logits(inp).astype(np.float64)
    rows = logits[len(inp) - len(cont):]
    peak = rows.max(-1, keepdims=True)
    log_p = rows - peak - np.log(np.exp(rows - peak).sum(-1, keepdims=True))
    return float(log_p[np.arange(len(cont)), cont].sum())


def test_log_prob_by_hand():
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]], dtype=np.float32)
    got = log_prob(logits, np.array([1, 0]))
    assert got == pytest.approx([np.log(0.5), np.log(0.75)], abs=1e-6)


@pytest.mark.parametrize("n_batch", [512, 5])  # 5: the prompt and the choices straddle several decodes
def test_batched_shared_prefix_equals_one_sequence_at_a_time(model, n_batch):
    context = model.tokenize(PROMPT)
    conts = [model.tokenize(c) for c in CHOICES]
    assert [len(c) for c in conts] != [1] * 4  # some multi-token choices
    with Scorer(model, n_batch=n_batch, threads=1) as scorer:
        got = [c.loglik for c in scorer.score(context, conts)]
        alone = [scorer.score(context, [c])[0].loglik for c in conts]
    want = [_reference(model, context, c, scorer.max_length) for c in conts]
    # measured: identical to the last bit on llama-cpp-python 0.3.36 (CPU) for this short prompt
    assert got == pytest.approx(want, abs=1e-4)
    assert alone == pytest.approx(want, abs=1e-4)
    assert len(set(got)) == 4


@pytest.mark.parametrize("precise, bound", [(True, 5e-3), (False, 0.05)])
def test_batched_equals_one_at_a_time_on_ten_shot_prompts(model, precise, bound):
    """Long prompts and four multi-token choices: here llama.cpp's arithmetic depends on how the batch is made up.

    Measured on the F16 demo GGUF, 10-shot HellaSwag on the sample (4 docs, ~540-token prompts): max |Δ loglik|
    1.5e-3 with precise=True (f32 K/V, no flash attention) and 1.0e-2 in the default context (f16 K/V, flash
    attention); 1.2e-4 / 1.4e-4 for 10-shot BoolQ. Scoring one sequence with n_batch 512 or 64 gives identical
    numbers, so the difference comes from several sequences sharing a ubatch and the cache, not from the chunking.
    """
    from malhae.eval.kobest import data
    from malhae.eval.kobest import evaluate as ev
    from malhae.eval.kobest.tasks import select

    task = select("hellaswag")[0]
    src = data.source(None, False)
    reqs = ev.requests(task, data.load(src, task, "test"), data.load(src, task, "train"), 10)
    worst = 0.0
    with Scorer(model, threads=1, precise=precise) as scorer:
        for r in reqs:
            context = model.tokenize(r.context)
            conts = [model.tokenize(c) for c in r.choices]
            assert len(context) > 300 and all(len(c) > 3 for c in conts)
            shared = [c.loglik for c in scorer.score(context, conts)]
            alone = [scorer.score(context, [c])[0].loglik for c in conts]
            worst = max(worst, *(abs(a - b) for a, b in zip(shared, alone, strict=True)))
    assert worst < bound


def test_left_truncation_as_the_harness_does_it(model):
    """A window of 24 tokens: the context is cut from the left by a different amount for each choice length."""
    context = model.tokenize(PROMPT * 2)
    conts = [model.tokenize(c) for c in CHOICES]
    assert len(context) > 24 and len({len(c) for c in conts}) > 1
    with Scorer(model, max_length=24, threads=1) as scorer:
        got = [c.loglik for c in scorer.score(context, conts)]
    want = [_reference(model, context, c, 24) for c in conts]
    assert got == pytest.approx(want, abs=1e-4)
    # and truncation mattered: with the whole context the numbers differ
    with Scorer(model, threads=1) as scorer:
        full = [c.loglik for c in scorer.score(context, conts)]
    assert max(abs(a - b) for a, b in zip(full, got, strict=True)) > 1e-3


def test_greedy_flag(model):
    context = model.tokenize(PROMPT)
    with Context(model, LoadOptions(ctx=256, threads=1)) as ctx:
        last = ctx.logits(context)[-1]
    best, worst = int(last.argmax()), int(last.argmin())
    with Scorer(model, threads=1) as scorer:
        a, b = scorer.score(context, [[best], [worst]])
    assert a.greedy and not b.greedy
    assert a.loglik > b.loglik


def test_bad_requests(model):
    with Scorer(model, max_length=16, threads=1) as scorer:
        with pytest.raises(ValueError, match="empty continuation"):
            scorer.score([1, 2], [[3], []])
        with pytest.raises(ValueError, match="empty context"):
            scorer.score([], [[3]])
        with pytest.raises(UserError, match="does not fit"):
            scorer.score([1, 2], [list(range(5, 25))])
