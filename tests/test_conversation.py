"""The conversation rules without a terminal or a model: prompt text, KV-friendly growth, context overflow, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from malhae.chat import conversation as cv
from malhae.chat.conversation import Conversation
from malhae.errors import UserError
from malhae.runtime import templates
from malhae.runtime.settings import SETTABLE, Sampling


def tokenize(text: str) -> list[int]:
    """One token per UTF-8 byte: exact, deterministic, and Hangul costs 3 like in a small byte-level vocabulary."""
    return list(text.encode())


def conv(name: str = "base", **kw) -> Conversation:
    return Conversation(templates.get(name), **kw)


def test_prompt_is_the_template_applied_to_the_turns():
    c = conv(system="짧게 답하세요.")
    c.ask("안녕하세요", tokenize, 4096)
    assert c.prompt() == "짧게 답하세요.\n\n사용자: 안녕하세요\n어시스턴트:"
    c.answer("안녕하세요! 무엇을 도와드릴까요?")
    c.ask("헌법 제1조는?", tokenize, 4096)
    assert c.prompt().endswith("어시스턴트: 안녕하세요! 무엇을 도와드릴까요?\n사용자: 헌법 제1조는?\n어시스턴트:")
    c.system = None  # the template's own system text
    assert c.prompt().startswith(templates.get("base").system)
    assert set(templates.get("base").stop) <= set(c.answer_sampling().stop)


@pytest.mark.parametrize("name", list(templates.all_templates()))
def test_each_prompt_starts_with_the_previous_prompt_and_answer(name):
    """What makes the engine's KV cache reuse work: a turn only appends to the text the model has already seen."""
    c = conv(name)
    answers = ["첫 번째 답입니다.", "두 번째 답.\n줄바꿈도 있습니다.", ""]
    for i, answer in enumerate(answers):
        c.ask(f"질문 {i}", tokenize, 4096)
        before = c.prompt()
        c.answer(answer)
        c.ask("다음", tokenize, 4096)
        assert c.prompt().startswith(before + (" " if before.endswith(":") else "") + answer)
        c.undo()


def test_ask_returns_the_tokens_of_the_prompt():
    c = conv()
    prepared = c.ask("안녕", tokenize, 4096)
    assert prepared.tokens == tokenize(c.prompt()) and prepared.dropped == 0
    with pytest.raises(UserError, match="empty"):
        c.ask("   ", tokenize, 4096)
    assert c.turns == [("user", "안녕")]


def test_undo_retry_clear():
    c = conv()
    with pytest.raises(UserError, match="nothing to undo"):
        c.undo()
    with pytest.raises(UserError, match="nothing to retry"):
        c.retry(tokenize, 4096)
    c.ask("하나", tokenize, 4096)
    c.answer("일")
    c.ask("둘", tokenize, 4096)
    c.answer("이")
    prepared = c.retry(tokenize, 4096)
    assert c.turns[-1] == ("user", "둘") and prepared.tokens == tokenize(c.prompt())
    c.answer("이(다시)")
    assert c.undo() == ("user", "둘") and c.turns == [("user", "하나"), ("assistant", "일")]
    c.clear()
    assert c.turns == [] and c.exchanges == 0


def test_an_answer_that_failed_is_abandoned_with_its_message():
    c = conv()
    c.ask("하나", tokenize, 4096)
    c.abandon()
    assert c.turns == []
    c.ask("둘", tokenize, 4096)
    c.answer("")  # an interrupted answer before anything was shown: kept as shown, i.e. empty
    assert c.turns == [("user", "둘"), ("assistant", "")]


def test_overflow_drops_the_oldest_exchanges_keeps_the_system_text_and_the_new_message():
    n_ctx = 600
    c = conv(system="시스템", sampling=Sampling(max_tokens=50))
    reserve = c.reserve(n_ctx)
    assert reserve == 50
    events = []
    for i in range(30):
        prepared = c.ask(f"메시지 {i}번", tokenize, n_ctx)
        if prepared.dropped:
            events.append(i)
            assert prepared.dropped % 2 == 0  # whole exchanges
            assert len(prepared.tokens) <= n_ctx // 2  # dropped well below the limit, not just below it
        assert len(prepared.tokens) + reserve <= n_ctx
        assert c.prompt().startswith("시스템\n\n") and c.turns[-1] == ("user", f"메시지 {i}번")
        assert prepared.tokens == tokenize(c.prompt())
        c.answer("대한민국의 주권은 국민에게 있다." * 2)
    # each overflow is one event, reported once; between events the conversation grows again
    assert len(events) >= 2 and all(b - a > 1 for a, b in zip(events, events[1:], strict=False))
    assert ("user", "메시지 0번") not in c.turns


def test_a_message_that_cannot_fit_by_itself_is_refused_and_nothing_is_lost():
    n_ctx = 200
    c = conv(sampling=Sampling(max_tokens=20))
    c.ask("짧은 질문", tokenize, n_ctx)
    c.answer("짧은 답")
    before = list(c.turns)
    with pytest.raises(UserError) as e:
        c.ask("아주 긴 메시지 " * 20, tokenize, n_ctx)
    message = str(e.value)
    alone = len(tokenize(c.template.prompt([("user", "아주 긴 메시지 " * 20)], c.system_text)))
    assert 512 < alone + 20 <= 1024  # so the hint is the next power of two that fits message and answer
    assert "\n" not in message and "too long" in message and f"it takes {alone} tokens" in message
    assert message.endswith("/set ctx 1024") and c.turns == before


def test_retry_that_no_longer_fits_keeps_the_answer():
    c = conv(sampling=Sampling(max_tokens=20))
    c.ask("질문 " * 20, tokenize, 4096)
    c.answer("답")
    with pytest.raises(UserError, match="too long"):
        c.retry(tokenize, 128)
    assert c.turns[-1] == ("assistant", "답")


def test_reserve_is_bounded_by_max_tokens_and_a_quarter_of_the_context():
    assert conv(sampling=Sampling(max_tokens=512)).reserve(128) == 32
    assert conv(sampling=Sampling(max_tokens=10)).reserve(4096) == 10


def test_save_and_load_round_trip(tmp_path):
    c = conv("kullm", sampling=Sampling(temperature=0.2, seed=7, max_tokens=99), ctx=1024, system="존댓말로.")
    c.ask("대한민국의 수도는?", tokenize, 4096)
    c.answer("서울입니다.\n\n\"따옴표\"와 \\ 역슬래시도.")
    path = cv.save(c, tmp_path / "대화.json", model="polyglot-ko-1.3b")
    assert "대한민국의 수도는" in path.read_text(encoding="utf-8")  # readable Korean, not \uXXXX escapes
    loaded, model = cv.load(path)
    assert model == "polyglot-ko-1.3b"
    assert (loaded.template.name, loaded.system, loaded.turns, loaded.ctx) == ("kullm", "존댓말로.", c.turns, 1024)
    assert (loaded.sampling.temperature, loaded.sampling.seed, loaded.sampling.max_tokens) == (0.2, 7, 99)
    assert loaded.prompt() == c.prompt()
    assert [p.name for p in tmp_path.iterdir()] == ["대화.json"]  # no temporary file left behind


def test_save_errors(tmp_path):
    c = conv()
    with pytest.raises(UserError, match="does not exist"):
        cv.save(c, tmp_path / "no" / "such" / "dir.json")
    with pytest.raises(UserError, match="is a directory"):
        cv.save(c, tmp_path)


def _valid() -> dict:
    c = conv()
    c.ask("안녕", tokenize, 4096)
    c.answer("네")
    return c.to_dict("m")


def _broken(change) -> dict:
    data = _valid()
    change(data)
    return data


@pytest.mark.parametrize(("content", "says"), [
    (b"{not json", "not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
    ("대화".encode("cp949"), "not UTF-8"),
    (json.dumps([1, 2]), "holds a JSON list"),
    (json.dumps({"messages": []}), 'not a malhae chat file (no "format": "malhae-chat")'),
    (json.dumps(_broken(lambda d: d.update(version=2))), "format version 2, and this malhae reads version 1; upgrade"),
    (json.dumps(_broken(lambda d: d.pop("version"))), '"version" is missing'),
    (json.dumps(_broken(lambda d: d.update(template="alpaca"))), "unknown template 'alpaca'"),
    (json.dumps(_broken(lambda d: d.update(system=3))), '"system" must be text'),
    (json.dumps(_broken(lambda d: d.pop("turns"))), '"turns" is missing'),
    (json.dumps(_broken(lambda d: d["turns"][1].update(role="bot"))), "turns[1].role is 'bot'; expected 'assistant'"),
    (json.dumps(_broken(lambda d: d["turns"][0].pop("text"))), 'turns[0] must be an object with "role" and "text"'),
    (json.dumps(_broken(lambda d: d["turns"].pop())), "a message without its answer"),
    (json.dumps(_broken(lambda d: d["settings"].update(top_p=3))), "settings.top_p is 3: top_p must be"),
    (json.dumps(_broken(lambda d: d["settings"].update(warmth=1))), "unknown setting 'warmth'"),
    (json.dumps(_broken(lambda d: d.update(settings=[]))), '"settings" must be an object'),
])
def test_load_rejects_broken_or_foreign_files_in_one_line(tmp_path, content, says):
    path = tmp_path / "chat.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(UserError) as e:
        cv.load(path)
    message = str(e.value)
    assert message.startswith(f"cannot load {path}: ") and says in message and "\n" not in message


def test_load_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        cv.load(tmp_path / "none.json")
    with pytest.raises(UserError, match="is a directory"):
        cv.load(tmp_path)


def test_saved_format_is_stable(tmp_path):
    """A file written today must load in later versions: the fields are the documented format, nothing more."""
    data = _valid()
    assert set(data) == {"format", "version", "model", "template", "system", "settings", "turns"}
    assert data["format"] == "malhae-chat" and data["version"] == 1
    assert set(data["settings"]) == set(SETTABLE)
    assert data["turns"] == [{"role": "user", "text": "안녕"}, {"role": "assistant", "text": "네"}]
    assert Path(cv.save(Conversation.from_dict(data), tmp_path / "a.json")).is_file()


def test_a_chat_under_a_models_own_template_reloads_only_with_such_a_model(tmp_path):
    own = templates.JinjaTemplate.make("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                                       "{% if add_generation_prompt %}<assistant>{% endif %}", eos_token="<|e|>")
    c = Conversation(own, Sampling(), None, None)
    c.ask("안녕", tokenize, 4096)
    c.answer("네")
    path = cv.save(c, tmp_path / "own.json", model="m")
    loaded, _ = cv.load(path, current=own)
    assert loaded.template is own and loaded.prompt() == c.prompt()
    with pytest.raises(UserError, match="unknown template 'gguf'.*load it while running such a model"):
        cv.load(path, current=templates.get("base"))
    with pytest.raises(UserError, match="unknown template 'gguf'"):
        cv.load(path)
