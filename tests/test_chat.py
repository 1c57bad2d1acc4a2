"""`malhae chat` driven for real: the REPL reading keys from prompt_toolkit's pipe input (in-process, so the
conversation can be inspected), and the installed command in a pseudo-terminal (pexpect) for what only a terminal
shows: Ctrl-C as a signal, bracketed paste, history across sessions, colours.

Models: the bundled demo model when it is built, else a converted random-weight test model. Tests that need an answer
that does not end by itself (Ctrl-C, a full context) always use the random-weight model: an end token is unlikely
among its 1,000 equally likely tokens.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from malhae import ui
from malhae.chat import reader, repl, writer
from malhae.chat import session as chat_session
from malhae.convert import pipeline
from malhae.errors import UserError
from malhae.runtime.settings import LoadOptions, Sampling
from malhae.store import models

ROOT = Path(__file__).resolve().parent.parent
STATUS = re.compile(r"(\d+) tokens · [\d.]+ tok/s · context (\d+)/(\d+)")
QUIT_HINT = "to quit, press Ctrl-D or type /exit"
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


@pytest.fixture(scope="module")
def random_model(k_quant_checkpoint, tmp_path_factory) -> Path:
    return pipeline.convert(k_quant_checkpoint, "q8_0", tmp_path_factory.mktemp("chat") / "m.gguf").path


@pytest.fixture(scope="module")
def model(random_model) -> Path:
    return models.demo_model() or random_model


# --- input rules ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("typed", "more", "kind", "text"), [
    ("안녕하세요", False, "message", "안녕하세요"),
    ("  안녕  ", False, "message", "안녕"),
    ("첫 줄\\", True, None, None),
    ("첫 줄\\\n둘째 줄", False, "message", "첫 줄\n둘째 줄"),
    ('"""', True, None, None),
    ('"""\n  들여쓰기\n끝', True, None, None),
    ('"""\n  들여쓰기\n끝\n"""', False, "message", "  들여쓰기\n끝"),
    ('"""한 줄"""', False, "message", "한 줄"),
    ('"""\n/help 는 블록 안에서 메시지\n"""', False, "message", "/help 는 블록 안에서 메시지"),
    ("/set temperature 0", False, "command", "/set temperature 0"),
    ("/system 첫 줄\\\n둘째 줄", False, "command", "/system 첫 줄\n둘째 줄"),
    ("//usr/bin 은 무엇인가요", False, "message", "/usr/bin 은 무엇인가요"),
    ("   \n ", False, "empty", ""),
])
def test_typed_text_to_message(typed, more, kind, text):
    assert reader.needs_more(typed) is more
    if not more:
        assert reader.classify(typed) == (kind, text)


def test_command_names():
    assert reader.resolve_command("/te") == "/template" and reader.resolve_command("/?") == "/help"
    assert reader.resolve_command("/BYE") == "/exit" and reader.resolve_command("/q") == "/exit"
    with pytest.raises(Exception, match="could be /system, /set, /show, /save, /stats"):
        reader.resolve_command("/s")
    with pytest.raises(Exception, match="unknown command /x"):
        reader.resolve_command("/x")


def test_completion_of_commands_and_their_arguments(tmp_path):
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    (tmp_path / "대화.json").write_text("{}")
    (tmp_path / "model.gguf").write_text("")
    completer = reader.completer()

    def complete(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), CompleteEvent(text_inserted=True))]

    assert complete("/te") == ["/template"] and complete("/s") == ["/system", "/set", "/show", "/save", "/stats"]
    assert len(complete("/")) == len(reader.COMMANDS)
    assert complete("/template k") == ["koalpaca", "kullm"] and complete("/set te") == ["temperature"]
    assert complete("/set temperature ") == [] and complete("안녕") == [] and complete("/help me\n") == []
    assert sorted(complete(f"/load {tmp_path}/")) == ["model.gguf", "대화.json"]
    assert complete(f"/model {tmp_path}/") == ["model.gguf"]


def test_answer_output_path():
    """write_answer on a terminal: control characters not drawn, a spinner only while a slow prompt is evaluated
    (erased before the answer), the text returned is what the model wrote. (The space before an answer never reaches
    it: the engine drops it, Sampling.answer; tests/test_answer_text.py.)"""

    def answer(delay: float):
        time.sleep(delay)  # prompt evaluation
        yield from ("안녕", "하세요\x1b[2J", "!\r")

    out = io.StringIO()
    assert writer.write_answer(answer(0.0), out, terminal=True) == ("안녕하세요\x1b[2J!\r", False)
    assert out.getvalue() == "안녕하세요[2J!\n"
    out = io.StringIO()
    writer.write_answer(answer(0.6), out, terminal=True)
    drawn = out.getvalue()
    assert drawn.startswith("\r⠋ 생각 중") and drawn.endswith("\r\x1b[K안녕하세요[2J!\n")
    out = io.StringIO()
    assert writer.write_answer(answer(0.6), out, terminal=False) == ("안녕하세요\x1b[2J!\r", False)
    assert out.getvalue() == "안녕하세요\x1b[2J!\r\n"  # a file or pipe gets the text as it is


# --- in-process: the real REPL on prompt_toolkit's pipe input ---------------------------------------------------

@dataclass
class Session:
    chat: repl.Chat
    out: str  # answers (stdout)
    err: str  # banner, status lines, hints (stderr)
    history: list[str]

    @property
    def turns(self) -> list[tuple[str, str]]:
        return self.chat.conv.turns

    def hints(self, text: str) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("malhae:") and text in line]


def talk(model: Path, keys: str, *, setup=None, out: io.StringIO | None = None, **options) -> Session:
    """Type `keys` into a real chat session (prompt_toolkit, real engine) until the input ends (= Ctrl-D)."""
    history = InMemoryHistory()
    out = out or io.StringIO()
    err = io.StringIO()
    options.setdefault("sampling", Sampling(max_tokens=12, seed=1))
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        pipe.close()
        given = {k: options.pop(k) for k in ("ctx", "draft", "draft_max") if k in options}
        load = LoadOptions(threads=1, gpu_layers="0", **given)
        session = chat_session.open_chat(load, model=str(model), resolve=models.resolve,
                                 reader=reader.PromptReader(history, input=pipe, output=DummyOutput()), out=out,
                                 console=Console(file=err, width=120), **options)
        if setup:
            setup(session)
        session.run()
    assert session.engine.ctx is None  # closed on the way out
    return Session(session, out.getvalue(), err.getvalue(), list(history.get_strings()))


def answers(s: Session) -> list[str]:
    return [text for role, text in s.turns if role == "assistant"]


def cached(s: Session) -> list[int]:
    return [int(n) for n in re.findall(r"(\d+) cached", s.err)]


def test_korean_conversation_of_several_turns_reuses_the_kv_cache(model):
    s = talk(model, "안녕하세요\r/stats\r대한민국헌법은 언제 제정되었나요?\r/stats\r고마워요\r/stats\r")
    assert [t for r, t in s.turns if r == "user"] == ["안녕하세요", "대한민국헌법은 언제 제정되었나요?", "고마워요"]
    assert len(answers(s)) == 3 and all(answers(s))
    for answer in answers(s):
        assert answer in s.out  # what was written is what the conversation keeps
    status = STATUS.findall(s.err)
    assert len(status) == 3 and all(int(size) == s.chat.engine.n_ctx for _, _, size in status)
    used = [int(u) for _, u, _ in status]
    assert used == sorted(used) and used[0] > 0  # the conversation grows
    first, second, third = cached(s)
    assert first == 0 and second > 0 and third > second  # turn ≥ 2: only the new tokens are evaluated
    assert "model" in s.err.splitlines()[0] and "template base" in s.err.splitlines()[0]
    assert "/help" in s.err.splitlines()[1]


def test_multi_line_input_arrives_as_one_message(model):
    keys = ("첫째 줄\\\r둘째 줄\r"  # backslash continuation
            '"""\r  셋째 줄\r넷째 줄\r"""\r'  # a block
            f"{PASTE_START}다섯\n여섯\r\n일곱{PASTE_END}\r"  # a paste: newlines do not send
            "//help 는 명령이 아니라 메시지\r")  # // sends a message that starts with /
    s = talk(model, keys, sampling=Sampling(max_tokens=2, seed=1))
    assert [t for r, t in s.turns if r == "user"] == ["첫째 줄\n둘째 줄", "  셋째 줄\n넷째 줄", "다섯\n여섯\n일곱",
                                                      "/help 는 명령이 아니라 메시지"]
    assert s.history[:3] == ["첫째 줄\\\n둘째 줄", '"""\n  셋째 줄\n넷째 줄\n"""', "다섯\n여섯\n일곱"]  # recalled whole
    assert len(STATUS.findall(s.err)) == 4


def test_editing_over_hangul_moves_by_whole_syllables(model):
    s = talk(model, "안녕하세요\x1b[D\x1b[D반갑\x7f\r", sampling=Sampling(max_tokens=2, seed=1))  # ← ← type, ⌫
    assert s.turns[0] == ("user", "안녕하반세요")


def test_history_location(tmp_path, monkeypatch):
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    monkeypatch.setenv("MALHAE_HOME", str(tmp_path / "home"))
    assert reader.history_path() == tmp_path / "home" / "chat_history"
    assert isinstance(reader.open_history(print), FileHistory) and reader.history_path().is_file()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MALHAE_HOME", str(tmp_path / "file" / "home"))  # cannot be a folder
    said: list[str] = []
    assert isinstance(reader.open_history(said.append), InMemoryHistory)
    assert len(said) == 1 and "history will not be kept" in said[0] and "MALHAE_HOME" in said[0]
    monkeypatch.delenv("MALHAE_HOME")
    assert reader.history_path().parent.name == "malhae"  # the user data directory


def _interrupt_first_answer_after(n_pieces: int, yielded: list[str]):
    """Send a real SIGINT to this process while the first answer is being written (the REPL's handler is live)."""

    def setup(session: repl.Chat) -> None:
        real = session.engine.generate
        calls = []

        def generate(prompt, sampling, **kw):
            calls.append(1)
            inner = real(prompt, sampling, **kw)
            try:
                for piece in inner:
                    if len(calls) == 1 and len(yielded) == n_pieces:
                        os.kill(os.getpid(), signal.SIGINT)
                        time.sleep(5)  # interrupted at once by the handler's exception
                        raise AssertionError("Ctrl-C did not stop the answer")
                    if len(calls) == 1:
                        yielded.append(piece)
                    yield piece
            finally:
                inner.close()

        session.engine.generate = generate

    return setup


def test_ctrl_c_during_an_answer_keeps_what_was_shown_and_goes_on(random_model):
    yielded: list[str] = []
    s = talk(random_model, "길게 말해 주세요\r다음 질문\r/stats\r", setup=_interrupt_first_answer_after(5, yielded),
             sampling=Sampling(max_tokens=100, seed=1))
    shown = "".join(yielded).lstrip()
    assert len(yielded) == 5 and shown
    assert s.turns[1] == ("assistant", shown.rstrip())  # exactly what was on the screen
    assert s.out.startswith(shown)
    first, second = STATUS.finditer(s.err)
    assert "interrupted (중단됨)" in s.err[first.end():second.start()]
    assert len(s.turns) == 4 and s.turns[3][1] and int(second.group(1)) == 100  # the next answer is whole
    assert cached(s)[0] > 0  # the KV cache stayed consistent and is reused after the interruption


class _CtrlCWhileWriting(io.StringIO):
    """A terminal on which Ctrl-C arrives while the third piece is being written."""

    writes = 0

    def write(self, text: str) -> int:
        n = super().write(text)
        self.writes += 1
        if self.writes == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return n


def test_ctrl_c_while_a_piece_is_written_keeps_that_piece(random_model):
    out = _CtrlCWhileWriting()
    s = talk(random_model, "안녕\r", out=out, sampling=Sampling(max_tokens=100, seed=1))
    assert s.turns[1][1] == s.out.rstrip("\n").rstrip() and out.writes == 4  # 3 pieces, then the final newline
    assert "interrupted" in s.err


def test_ctrl_c_at_the_prompt(model):
    s = talk(model, "\x03버릴 글\x03")
    assert len(s.hints(QUIT_HINT)) == 1  # empty prompt: how to quit
    assert s.turns == [] and s.history == []  # text + Ctrl-C: dropped, not sent
    assert not STATUS.search(s.err)


def test_settings_commands(model):
    keys = ("/set temperature 0\r/set Top-P 0.9\r/set top_k 10\r/set min_p 0.1\r/set repeat_penalty 1.2\r"
            "/set max_tokens 4\r/set seed 7\r/set ctx 200\r안녕\r/set seed random\r/set\r/show\r")
    s = talk(model, keys)
    sampling = s.chat.conv.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p, sampling.repeat_penalty,
            sampling.max_tokens, sampling.seed) == (0, 0.9, 10, 0.1, 1.2, 4, None)
    assert s.chat.engine.n_ctx == 200 and s.chat.conv.ctx == 200  # the engine was created again
    assert "context is now 200 tokens" in s.err and re.search(r"\d+ tokens · [\d.]+ tok/s · context \d+/200", s.err)
    assert int(STATUS.search(s.err).group(1)) <= 4  # max_tokens applied
    assert "temperature 0 · top_p 0.9 · top_k 10 · min_p 0.1 · repeat_penalty 1.2 · max_tokens 4 · seed random · " \
           "ctx 200" in s.err
    show = s.err[s.err.rindex("model "):]
    assert all(label in show for label in ("template", "system", "settings", "context"))
    assert re.search(r"context\s+\d+/200 tokens used, 1 exchanges", show)


def test_unknown_commands_and_bad_values_are_one_line_hints(model):
    keys = ("/frobnicate\r/s\r/set temperature hot\r/set top_p 2\r/set warmth 1\r/set max_tokens\r"
            "/template alpaca\r/undo\r/retry\r/stats\r/save\r/load\r/model\r/model /no/such/model.gguf\r"
            "/set ctx 8\r안녕\r")
    s = talk(model, keys)
    for text in ("unknown command /frobnicate; /help lists the commands", "/s could be /system, /set, /show, /save",
                 "temperature 'hot' is not valid", "top_p must be a number above 0 and at most 1",
                 "unknown setting 'warmth'", "give a value: /set max_tokens 512", "unknown template 'alpaca'",
                 "nothing to undo", "nothing to retry yet", "no answer yet", "give a file name: /save chat.json",
                 "give a file saved with /save", "give a model file", "/no/such/model.gguf does not exist",
                 "ctx must be a whole number of tokens, 16 or more"):
        assert len(s.hints(text)) == 1, text
    assert len([line for line in s.err.splitlines() if line.startswith("malhae:")]) == 15
    assert len(s.turns) == 2 and s.turns[1][1]  # and the session still answers


def test_help_and_edit_commands(model):
    keys = ("/help\r하나\r둘\r/retry\r/undo\r/system 당신은 해적입니다.\r/system\r/template koalpaca\r셋\r"
            "/system default\r/system\r/clear\r/te\r/exit\r이건 보내지 않음\r")
    s = talk(model, keys)
    help_text = s.err[: s.err.index("Ctrl-D quits")]
    assert all(name in help_text for name in reader.COMMANDS)
    assert "system text (yours): 당신은 해적입니다." in s.err
    assert "system text (the template's): (none)" in s.err  # koalpaca has no system text
    assert "took back: 둘" in s.err and "conversation cleared" in s.err
    assert len(STATUS.findall(s.err)) == 4  # 하나, 둘, retry, 셋
    assert "* koalpaca" in s.err  # /te: an unambiguous beginning lists the templates
    assert s.turns == [] and s.chat.conv.template.name == "koalpaca" and s.chat.conv.system is None
    assert "이건 보내지 않음" not in s.history  # /exit left before reading it


def test_retry_writes_the_last_answer_again(model):
    s = talk(model, "안녕하세요\r/retry\r/retry\r", sampling=Sampling(max_tokens=8))
    assert len(s.turns) == 2 and len(STATUS.findall(s.err)) == 3
    stats = s.chat.last_stats  # the prompt is the one already in the KV cache: only its last token is evaluated
    assert stats.cached_tokens == stats.prompt_tokens - 1


def test_model_switch_keeps_the_conversation(model, k_quant_checkpoint, tmp_path):
    other = pipeline.convert(k_quant_checkpoint, "f16", tmp_path / "other.gguf").path
    s = talk(model, f"안녕\r/model {other}\r다음\r/show\r")
    assert s.chat.engine.path == other and len(s.turns) == 4
    assert "the conversation stays" in s.err and str(other) in s.err


def test_model_switch_by_store_name(model, tmp_path, monkeypatch):
    from malhae.store import local as store

    monkeypatch.setenv("MALHAE_HOME", str(tmp_path))
    stored = store.open_store().add(model, "작은모델").path
    s = talk(model, "/model 작은모델\r/model 작은모델x\r")
    assert s.chat.engine.path == stored
    assert len(s.hints("no model named '작은모델x'")) == 1


def test_save_never_overwrites_the_model_or_any_other_file(model, tmp_path):
    """`cp model.gguf x.gguf; /save x.gguf` turned the 17.7 MB model in use into 288 bytes of JSON. An existing
    file is replaced only with --force and only if it is an earlier /save; a folder that cannot be written is one
    hint, and the chat goes on."""
    running = tmp_path / "x.gguf"
    shutil.copy(model, running)
    notes = tmp_path / "notes.txt"
    notes.write_text("내 메모", encoding="utf-8")
    chat = tmp_path / "c.json"
    keys = (f"/save {running}\r/save {running} --force\r/save {notes} --force\r안녕\r/save {chat}\r"
            f"/save {chat}\r다음\r/save {chat} --force\r")
    if Path("/sys/kernel").is_dir():  # a real folder where no one, root included, can create a file
        keys += "/save /sys/kernel/malhae-chat.json\r"
    s = talk(running, keys)
    assert running.read_bytes() == model.read_bytes() and notes.read_text(encoding="utf-8") == "내 메모"
    assert len(s.hints("is not a malhae chat file")) == 3
    assert len(s.hints("holds an earlier saved chat")) == 1 and "--force" in s.hints("holds an earlier saved chat")[0]
    assert [t["text"] for t in json.loads(chat.read_text(encoding="utf-8"))["turns"][::2]] == ["안녕", "다음"]
    if Path("/sys/kernel").is_dir():
        assert len(s.hints("cannot save to /sys/kernel/malhae-chat.json")) == 1
    assert "internal error" not in s.err
    assert not list(tmp_path.glob(".*.partial"))


def test_save_load_round_trip_and_broken_files(model, tmp_path):
    saved = tmp_path / "대화.json"
    (tmp_path / "broken.json").write_text('{"format": "malhae-chat", "version": 1, "turns": [', encoding="utf-8")
    (tmp_path / "foreign.json").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    keys = (f"안녕하세요\r/set temperature 0.3\r/save {saved}\r/clear\r/set temperature 1\r/load {saved}\r"
            f"/load {tmp_path / 'broken.json'}\r/load {tmp_path / 'foreign.json'}\r/load {tmp_path / 'none.json'}\r"
            "다음 질문\r")
    s = talk(model, keys)
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["format"] == "malhae-chat" and data["version"] == 1 and data["turns"][0]["text"] == "안녕하세요"
    assert f"saved 1 exchanges to {saved}" in s.err and f"loaded 1 exchanges from {saved}" in s.err
    assert len(s.hints("cannot load")) == 3
    assert len(s.hints("not valid JSON")) == 1 and len(s.hints("not a malhae chat file")) == 1
    assert len(s.hints("no such file")) == 1
    assert [t for r, t in s.turns if r == "user"] == ["안녕하세요", "다음 질문"]  # continued after the load
    assert s.turns[1][1] == data["turns"][1]["text"] and s.chat.conv.sampling.temperature == 0.3


def test_context_overflow_drops_old_turns_says_so_once_and_goes_on(random_model):
    messages = [f"{i}번째 짧은 질문입니다" for i in range(8)]
    keys = "".join(m + "\r" for m in messages) + "대한민국 헌법 " * 80 + "\r마지막 질문\r/show\r"
    dropped: list[int] = []

    def setup(session: repl.Chat) -> None:
        real = session.conv.ask

        def ask(*args):
            prepared = real(*args)
            dropped.append(prepared.dropped)
            return prepared

        session.conv.ask = ask

    s = talk(random_model, keys, setup=setup, ctx=128, sampling=Sampling(max_tokens=16, seed=1))
    events = sum(1 for d in dropped if d)
    notices = s.hints("no longer fits in the context of 128 tokens: forgot the")
    assert events >= 1 and len(notices) == events  # told once per overflow, not once per dropped turn
    assert len(s.hints("message too long")) == 1 and len(s.hints("/set ctx")) == events + 1
    user = [t for r, t in s.turns if r == "user"]
    assert user[-1] == "마지막 질문" and messages[0] not in user  # oldest gone, newest kept whole
    assert len(STATUS.findall(s.err)) == len(messages) + 1  # every message but the too-long one was answered
    assert all(int(used) <= 128 for _, used, _ in STATUS.findall(s.err))


def _token_counts(paths: dict[str, Path], into: dict[str, int]):
    """A talk() setup that counts each document's tokens with the session's own engine (as /read must show)."""
    def setup(session: repl.Chat) -> None:
        for name, path in paths.items():
            text = path.read_text(encoding="utf-8-sig").rstrip("\n")
            into[name] = len(session.engine.tokenize(text))
    return setup


def test_read_puts_documents_before_the_next_message_only(model, tmp_path):
    a, b = tmp_path / "조항.txt", tmp_path / "부칙.txt"
    a.write_text("\ufeff대한민국은 민주공화국이다.\n", encoding="utf-8")
    b.write_text("이 헌법은 공포한 날부터 시행한다.\n\n", encoding="utf-8")
    counts: dict[str, int] = {}
    s = talk(model, f"/read {a}\r/read {b}\r/read\r무슨 뜻인가요?\r/read\r다음 질문\r",
             setup=_token_counts({"a": a, "b": b}, counts))
    assert [t for r, t in s.turns if r == "user"] == [
        "대한민국은 민주공화국이다.\n\n이 헌법은 공포한 날부터 시행한다.\n\n무슨 뜻인가요?", "다음 질문"]
    assert f"read {a}: {counts['a']} tokens" in s.err and f"read {b}: {counts['b']} tokens" in s.err
    assert f"before your next message: {a} {counts['a']} tokens, {b} {counts['b']} tokens" in s.err
    assert s.err.count("no documents waiting") == 1  # listed after the message that used them
    assert len(STATUS.findall(s.err)) == 2 and not s.chat.pending


def test_read_clear_and_files_that_cannot_be_read(model, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("버릴 문서", encoding="utf-8")
    (tmp_path / "cp949.txt").write_bytes("헌법".encode("cp949"))
    (tmp_path / "bin").write_bytes(b"\x00\x01")
    (tmp_path / "empty.txt").write_bytes(b"")
    keys = (f"/read {doc}\r/read clear\r/read {tmp_path / 'none.txt'}\r/read {tmp_path}\r"
            f"/read {tmp_path / 'cp949.txt'}\r/read {tmp_path / 'bin'}\r/read {tmp_path / 'empty.txt'}\r질문\r")
    s = talk(model, keys)
    assert "dropped 1 document" in s.err
    for name, says in (("none.txt", "no such file"), ("", "is a directory"), ("cp949.txt", "not valid UTF-8"),
                       ("bin", "binary"), ("empty.txt", "is empty")):
        assert [h for h in s.hints(says) if str(tmp_path / name) in h] == s.hints(says) and len(s.hints(says)) == 1
    assert [t for r, t in s.turns if r == "user"] == ["질문"]
    assert "internal error" not in s.err


def test_read_of_a_document_too_long_is_refused_before_anything_is_evaluated(random_model, tmp_path):
    long, short = tmp_path / "헌법.txt", tmp_path / "짧은.txt"
    long.write_text("대한민국 헌법 " * 80, encoding="utf-8")
    short.write_text("대한민국 헌법 " * 12, encoding="utf-8")
    counts: dict[str, int] = {}
    generated: list[object] = []

    def setup(session: repl.Chat) -> None:
        _token_counts({"long": long}, counts)(session)
        real = session.engine.generate
        session.engine.generate = lambda *args, **kw: (generated.append(args), real(*args, **kw))[1]

    keys = f"/read {long}\r/read\r/read {short}\r{'긴 질문 ' * 80}\r/read\r"
    s = talk(random_model, keys, setup=setup, ctx=128, sampling=Sampling(max_tokens=16, seed=1))
    refused = s.hints("too long for the context")
    assert len(refused) == 1 and str(long) in refused[0] and f"{counts['long']} tokens" in refused[0]
    assert "the context holds 128" in refused[0] and "/set ctx" in refused[0] and "shorter file" in refused[0]
    assert "no documents waiting" in s.err  # the refused one is not kept
    too_long = s.hints("message too long")  # short document + long message: refused when sent, document kept
    assert len(too_long) == 1 and str(short) in too_long[0] and "/read clear" in too_long[0]
    assert f"before your next message: {short} " in s.err
    assert generated == [] and s.turns == [] and not STATUS.search(s.err)  # nothing reached the model


def test_options_are_checked_before_the_model_loads(tmp_path):
    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "malhae", "chat", *args], capture_output=True, cwd=ROOT,
                              timeout=60, stdin=subprocess.DEVNULL)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    assert "--temperature -1.0: temperature must be a number from 0 to 10" in run("--temperature", "-1")
    assert "--top-p 0.0: top_p must be" in run("--top-p", "0")
    assert "unknown template 'alpaca'" in run("--template", "alpaca")
    assert "does not exist" in run("-m", str(tmp_path / "none.gguf"))


def test_piped_input_and_output_are_plain_text(model):
    proc = subprocess.run([sys.executable, "-m", "malhae", "chat", "-m", str(model), "--threads", "1", "-n", "8",
                           "--seed", "1"], input="안녕하세요\n둘째\\\n줄\n/show\n".encode(), capture_output=True,
                          cwd=ROOT, timeout=60, env=os.environ | {"TERM": "xterm-256color"})
    assert proc.returncode == 0, proc.stderr.decode()
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert out.strip() and "\x1b" not in out and "\x1b" not in err
    assert len(STATUS.findall(err)) == 2 and "2 exchanges" in err


# --- a real terminal ----------------------------------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


def plain(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


@pytest.fixture
def terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    spawned = []

    def spawn(*args: str, env: dict | None = None):
        environment = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
        environment |= {"MALHAE_HOME": str(tmp_path / "home"), "PROMPT_TOOLKIT_NO_CPR": "1",
                        "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"} | (env or {})
        child = pexpect.spawn(sys.executable, ["-m", "malhae", "chat", "--threads", "1", *args], cwd=str(ROOT),
                              env=environment, encoding="utf-8", dimensions=(40, 120), timeout=30)
        child.logfile_read = io.StringIO()  # the whole transcript, for the tests that look at every byte
        child.expect_exact(">>>")
        spawned.append(child)
        return child

    yield spawn
    for child in spawned:
        child.close(force=True)


def _quit(child, ready: str | None = "/? 도움말") -> str:
    import pexpect

    # only once an empty prompt is drawn is the terminal in prompt_toolkit's raw mode: a ^D sent while a command is
    # still running reaches a terminal in its normal mode, whose driver takes it as an end-of-file and drops it. The
    # empty prompt's placeholder says it is drawn (without colours there is none: `ready` None)
    if ready:
        child.expect_exact(ready)
    child.send("\x04")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    return child.before


def test_terminal_session(terminal, model, tmp_path):
    child = terminal("-m", str(model), "-n", "12", "--seed", "1")
    banner = plain(child.before)
    assert f"({model.name}, CPU)" in banner and "template base" in banner and "/help" in banner
    assert "\x1b[2m" in child.before  # the banner is dim
    for message in ("안녕하세요", "대한민국의 수도는 어디인가요?"):
        child.send(message + "\r")
        child.expect(STATUS)
        assert child.before.rstrip().endswith("\x1b[2m")  # the status line is dim
        child.expect_exact(">>>")
    child.send("\x03")
    child.expect_exact(QUIT_HINT)
    child.expect_exact(">>>")
    child.send(f"/save {tmp_path / 'c.json'}\r")
    child.expect_exact(">>>")
    _quit(child)
    history = (tmp_path / "home" / "chat_history").read_text(encoding="utf-8")
    assert "+안녕하세요" in history and "+대한민국의 수도는 어디인가요?" in history
    saved = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    assert [t["text"] for t in saved["turns"][::2]] == ["안녕하세요", "대한민국의 수도는 어디인가요?"]
    screen = plain(child.logfile_read.getvalue()).replace("\n", "")
    for answer in saved["turns"][1::2]:  # each answer was on the screen
        assert ui.printable(answer["text"], multiline=True).replace("\n", "") in screen


def test_ctrl_c_in_a_terminal_stops_the_answer(terminal, endless_path, tmp_path):
    """A real Ctrl-C: the terminal must be back in its normal mode while the answer is written, so that the key
    becomes SIGINT. The answer would go on for tens of thousands of tokens (a huge context and max_tokens, a model
    that never ends an answer by itself)."""
    child = terminal("-m", str(endless_path), "--ctx", "32768", "-n", "100000", "--seed", "1")
    child.send("끝없이 말해 주세요\r")
    child.expect_exact("\x1b[?2004l")  # prompt_toolkit has left the terminal: the answer starts
    time.sleep(0.5)  # not reading meanwhile: the answer also blocks on a full terminal
    start = time.monotonic()
    child.send("\x03")
    child.expect("interrupted")
    assert time.monotonic() - start < 10
    transcript = child.before
    child.expect_exact(">>>")
    child.send("/set max_tokens 6\r")
    child.expect_exact(">>>")
    child.send("다음 질문\r")
    child.expect(STATUS)
    assert child.match.group(1) == "6"  # the next answer is written, whole
    child.expect_exact(">>>")
    child.send(f"/save {tmp_path / 'c.json'}\r")
    child.expect_exact(">>>")
    _quit(child)
    turns = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["turns"]
    kept = turns[1]["text"]
    assert len(kept) > 20 and len(turns) == 4
    # the terminal echoes the key as "^C" wherever the output stream is at that moment, which may be before the
    # last piece is flushed: the echo is the terminal's, not the answer's
    on_screen = plain(transcript).replace("^C", "")
    assert ui.printable(kept, multiline=True) in on_screen  # the conversation keeps what was on the screen


def test_keys_typed_during_an_answer_are_not_echoed_into_it(terminal, endless_path, tmp_path):
    """In its normal mode the terminal echoes keys into the answer being written ("…구성합니다/exit" was seen); they
    must stay unseen and arrive at the next prompt as typed-ahead input."""
    child = terminal("-m", str(endless_path), "--ctx", "32768", "-n", "100000", "--seed", "1")
    child.send("끝없이 말해 주세요\r")
    child.expect_exact("\x1b[?2004l")  # the answer starts
    time.sleep(0.3)
    child.send("/show")
    time.sleep(0.5)
    child.send("\x03")
    child.expect("interrupted")
    assert "/show" not in plain(child.before)
    child.expect_exact(">>>")
    child.expect_exact("/show")  # what was typed ahead is at the prompt, and is the next input
    child.send("\r")
    child.expect(r"template\s+base")
    child.expect_exact(">>>")
    _quit(child)


def test_long_messages_wrap_at_spaces_on_a_terminal(terminal, model, tmp_path):
    """Left to the terminal, a notice longer than the window breaks mid-word; malhae wraps it at spaces itself."""
    child = terminal("-m", str(model))
    value = "아주 많이 높게 해 주세요 " * 12
    child.send(f"/set temperature {value}\r")
    child.expect_exact("malhae: ")
    child.expect_exact(">>>")
    hint = [line.rstrip() for line in plain("malhae: " + child.before).split("\n") if line.strip()]
    expected = f"malhae: /set temperature {value.strip()!r} is not valid"
    assert len(hint) >= 2 and " ".join(hint).startswith(expected)  # broken into lines at spaces only
    assert all(len(line) <= 120 for line in hint)
    _quit(child)


def test_history_is_shared_and_searchable_and_pastes_are_one_message(terminal, model, tmp_path):
    child = terminal("-m", str(model), "-n", "4", "--seed", "1")
    child.send("사과는 빨갛다\r")
    child.expect(STATUS)
    child.expect_exact(">>>")
    child.send(f"{PASTE_START}첫 줄\r\n둘째 줄\n셋째 줄{PASTE_END}")
    time.sleep(0.2)
    child.send("\r")
    child.expect(STATUS)
    child.expect_exact(">>>")
    child.send(f"/save {tmp_path / 'one.json'}\r")
    child.expect_exact(">>>")
    _quit(child)
    turns = json.loads((tmp_path / "one.json").read_text(encoding="utf-8"))["turns"]
    assert [t["text"] for t in turns[::2]] == ["사과는 빨갛다", "첫 줄\n둘째 줄\n셋째 줄"]

    child = terminal("-m", str(model), "-n", "4", "--seed", "1")  # a new session, the same history file
    time.sleep(0.3)  # prompt_toolkit loads the history in the background
    child.send("\x12사과")  # Ctrl-R: search backwards
    time.sleep(0.2)
    child.send("\r")  # accept the search
    time.sleep(0.2)
    child.send("\r")  # send
    child.expect(STATUS)
    child.expect_exact(">>>")
    child.send("\x1b[A")  # ↑: the message just sent
    time.sleep(0.2)
    child.send("\r")
    child.expect(STATUS)
    child.expect_exact(">>>")
    child.send(f"/save {tmp_path / 'two.json'}\r")
    child.expect_exact(">>>")
    _quit(child)
    turns = json.loads((tmp_path / "two.json").read_text(encoding="utf-8"))["turns"]
    assert [t["text"] for t in turns[::2]] == ["사과는 빨갛다", "사과는 빨갛다"]


def test_tab_completes_commands_in_a_terminal(terminal, model, tmp_path):
    child = terminal("-m", str(model), "-n", "4", "--seed", "1")
    for keys in ("/sa", "\t", "\r", f"{tmp_path / 'c.json'}\r"):  # Enter on a command that needs a file: type it
        child.send(keys)
        time.sleep(0.3)  # completions are computed in the background, as a person types
    child.expect_exact("saved 0 exchanges")
    child.expect_exact(">>>")
    for keys in ("/template k", "\t", "\r"):  # a menu of two; the first is picked, and Enter sends
        child.send(keys)
        time.sleep(0.3)
    child.expect_exact("template koalpaca")
    child.expect_exact(">>>")
    _quit(child)
    assert (tmp_path / "c.json").is_file()


@pytest.mark.parametrize("how", ["NO_COLOR", "--no-color"])
def test_no_color(terminal, model, how):
    args, env = (["--no-color"], {}) if how == "--no-color" else ([], {"NO_COLOR": "1"})
    child = terminal("-m", str(model), "-n", "4", "--seed", "1", *args, env=env)
    child.send("안녕\r")
    child.expect(STATUS)
    child.expect_exact(">>>")
    child.send("/oops\r")
    child.expect_exact("unknown command")
    child.expect_exact(">>>")
    _quit(child, ready=None)
    transcript = child.logfile_read.getvalue()
    assert "unknown command" in transcript and STATUS.search(transcript)
    styles = set(re.findall(r"\x1b\[([0-9;]*)m", transcript))
    assert styles <= {"", "0"}, styles  # resets only: no colour, no dim


def test_text_the_terminal_could_not_decode_is_a_hint_not_an_internal_error():
    """Bytes that are not UTF-8, typed into a terminal (a paste cut inside a Hangul syllable), reach Python as lone
    surrogates; once they went on to the tokenizer and ended as an internal error."""
    class Session:
        def prompt(self) -> str:
            return "동포\udceb\udc9e"

    typed = reader.PromptReader.__new__(reader.PromptReader)
    typed.session = Session()
    with pytest.raises(UserError, match="not valid UTF-8 .* nothing was sent"):
        typed.read()
