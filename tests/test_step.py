"""Step, the per-token step of the engine and the scheduler, and StopReason with its wire words (app/runtime/step.py).

The step runs on the demo model's vocabulary (its real end token and byte pieces); the wire tables are written out
here by hand, not computed by the code they check.
"""

from __future__ import annotations

import json

import llama_cpp as lc
import pytest

from malhae.runtime.engine import Stats
from malhae.runtime.llama import Model
from malhae.runtime.step import Step, StopReason, llama_server_stop_text
from malhae.store import models

DEMO = models.demo_model()
pytestmark = pytest.mark.skipif(DEMO is None, reason="the bundled demo model is not built")
TEXT = "대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다."


@pytest.fixture(scope="module")
def vocab_model():
    with Model(DEMO, vocab_only=True) as model:
        yield model


def tokens(model: Model, text: str) -> list[int]:
    return model.tokenize(text, add_special=False, parse_special=False)


def run(step: Step, ids: list[int]) -> tuple[list[str], list[StopReason | None]]:
    """What each token showed, and the reason after it, up to the token that ended the answer (as callers do)."""
    shown, reasons = [], []
    for t in ids:
        shown.append(step.take(t))
        reasons.append(step.reason)
        if step.reason is not None:
            break
    return shown, reasons


def test_the_end_token_ends_with_eos_and_shows_nothing(vocab_model):
    ids = tokens(vocab_model, "국민에게")
    step = Step(vocab_model.vocab, (), 100, 100)
    shown, reasons = run(step, ids)
    assert "".join(shown) == "국민에게" and reasons == [None] * len(ids)
    assert step.take(lc.llama_vocab_eos(vocab_model.vocab)) == ""
    assert step.reason is StopReason.EOS and step.reason == "eos"
    assert step.n == len(ids)  # the end token is not counted
    assert step.finish() == "" and step.text == "국민에게" and step.matched is None


def test_a_stop_text_split_over_two_tokens_ends_with_stop(vocab_model):
    ids = tokens(vocab_model, TEXT)
    pieces = [vocab_model.token_bytes(t, special=False).decode() for t in ids]
    assert pieces[:4] == ["대한민국의", " 주권은", " 국민에게", " 있고"]  # the demo model's tokenizer
    step = Step(vocab_model.vocab, ["없는 말", "권은 국민"], 100, 100)  # the end of one token, the start of the next
    shown, reasons = run(step, ids)
    assert shown == ["대한민국의", " 주", ""]  # "권은" held back after the second: it may begin the stop text
    assert reasons == [None, None, StopReason.STOP]  # and nothing is taken after the stop
    assert step.text == "대한민국의 주" and step.matched == "권은 국민" and step.n == 3 and step.finish() == ""


def test_max_tokens_ends_with_length_and_a_full_context_with_context(vocab_model):
    ids = tokens(vocab_model, TEXT)[:3]
    length = Step(vocab_model.vocab, (), 3, 3)  # max_tokens 3, room for more
    assert run(length, ids)[1] == [None, None, StopReason.LENGTH]
    context = Step(vocab_model.vocab, (), 3, 512)  # max_tokens 512, room for 3
    assert run(context, ids)[1] == [None, None, StopReason.CONTEXT]
    assert length.n == context.n == 3
    # nothing may be generated: ended before the first token
    assert Step(vocab_model.vocab, (), 0, 0).reason is StopReason.LENGTH
    assert Step(vocab_model.vocab, (), 0, 5).reason is StopReason.CONTEXT


def test_draft_room_leaves_a_place_for_the_sample_after_the_draft(vocab_model):
    step = Step(vocab_model.vocab, (), 5, 5)
    assert step.draft_room == 4
    step.take(tokens(vocab_model, "국민")[0])
    assert step.draft_room == 3


def test_finish_releases_what_might_have_begun_a_stop_text(vocab_model):
    step = Step(vocab_model.vocab, ["나온다고"], 100, 100)
    shown, reasons = run(step, tokens(vocab_model, "국민으로부터 나온다"))
    assert "".join(shown) == "국민으로부터 " and reasons[-1] is None
    assert step.finish() == "나온다" and step.text == "국민으로부터 나온다" and step.matched is None


def test_the_wire_words():
    """OpenAI's finish_reason and Ollama's done_reason for each reason; None: it never goes out as one."""
    table = {
        StopReason.EOS: ("eos", "stop", "stop"),
        StopReason.STOP: ("stop", "stop", "stop"),
        StopReason.LENGTH: ("length", "length", "length"),
        StopReason.CONTEXT: ("context", "length", "length"),
        StopReason.INTERRUPTED: ("interrupted", None, None),
        StopReason.ERROR: ("error", None, None),
    }
    assert set(table) == set(StopReason)
    for reason, (word, openai, ollama) in table.items():
        assert reason == word and str(reason) == word and f"{reason}" == word and f"{reason:>6}" == f"{word:>6}"
        assert json.dumps(reason) == json.dumps(word)
        assert (reason.openai, reason.ollama) == (openai, ollama)
        assert StopReason(word) is reason


@pytest.mark.parametrize(("finish", "stop_text", "max_tokens", "expected"), [
    ("stop", False, True, StopReason.EOS),  # an end token
    ("stop", True, True, StopReason.STOP),  # the server said a stop text ended it
    ("stop", True, False, StopReason.STOP),
    ("length", False, True, StopReason.LENGTH),  # the user's max_tokens
    ("length", False, False, StopReason.CONTEXT),  # max_tokens was cut to what the context had left
    ("length", True, True, StopReason.LENGTH),
    ("content_filter", True, True, StopReason.EOS),  # any other word ends it as an end token would
    ("tool_calls", False, False, StopReason.EOS),
])
def test_a_remote_finish_reason_read_back(finish, stop_text, max_tokens, expected):
    assert StopReason.from_openai(finish, stop_text=stop_text, max_tokens=max_tokens) is expected


def test_stats_as_dict_holds_the_plain_word():
    d = Stats(stop_reason=StopReason.CONTEXT).as_dict()
    assert type(d["stop_reason"]) is str and d["stop_reason"] == "context"
    assert json.loads(json.dumps(d))["stop_reason"] == "context"
    assert Stats().as_dict()["stop_reason"] == ""


def test_llama_server_says_which_stop_ended_an_answer():
    unknown = object()
    assert llama_server_stop_text({"stop": True, "stop_type": "eos"}, unknown) is None
    assert llama_server_stop_text({"stop": True, "stop_type": "word", "stopping_word": "질문:"}, unknown) == "질문:"
    assert llama_server_stop_text({"stop": True, "stop_type": "limit"}, unknown) is unknown
