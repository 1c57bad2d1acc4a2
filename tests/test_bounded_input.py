"""JSON and TOML that malhae did not write — config.toml, a checkpoint's config.json and tokenizer.json, a saved chat,
a KoBEST data row, a server's answer — go through one bounded reader (app.files.parse_json / parse_toml): an integer
of 5,000 digits, nesting 100,000 deep or a lone UTF-16 surrogate is one line naming the file and the problem, never a
ValueError, a RecursionError or a session that can no longer print or save. A tokenizer.json whose fields have the
wrong shape names the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import one_error_line

from malhae.chat import conversation as cv
from malhae.cli import main
from malhae.errors import UserError
from malhae.eval.kobest import data
from malhae.eval.kobest.tasks import select
from malhae.store import config

ROOT = Path(__file__).resolve().parent.parent
HUGE = "1" + "0" * 5000  # past CPython's 4,300-digit limit on int(str): a ValueError deep inside json and tomllib
DEEP = "[" * 100_000 + "]" * 100_000  # past the interpreter's recursion limit: a RecursionError


def malhae(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALHAE_ENDPOINT", "MALHAE_API_KEY")}
    return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, cwd=ROOT, timeout=120,
                          env=clean | (env or {}))


# --- config.toml -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "says"), [
    (f"threads = {HUGE}\n", "holds an integer wider than 64 bits at line 1"),
    (f"# the usual\ncontext = 2048\nthreads = 0x{'f' * 5000}\n", "holds an integer wider than 64 bits in threads"),
    (f"[sampling]\ntemperature = 0.7\nstop = {DEEP}\n", "nested more than 100 levels deep (arrays or objects inside "
                                                        "each other, at line 3)"),
])
def test_settings_file_with_a_huge_integer_or_deep_nesting(tmp_path, text, says):
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as e:
        config.load(path)
    message = str(e.value)
    assert message.startswith(f"settings file {path} ") and says in message and "\n" not in message
    assert message.endswith("; fix that line or delete the file")


def test_settings_file_with_a_huge_integer_through_the_cli(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(f"threads = {HUGE}\n", encoding="utf-8")
    line = one_error_line(malhae("models", env={"MALHAE_CONFIG": str(path)}))
    assert f"settings file {path} holds an integer wider than 64 bits" in line


# --- a checkpoint: config.json and tokenizer.json ----------------------------------------------------------------

@pytest.fixture
def checkpoint(checkpoints, tmp_path):
    """A private copy of a published-layout checkpoint, free to break."""
    import shutil

    dst = tmp_path / "src"
    shutil.copytree(checkpoints("tf4-st-f16"), dst)
    return dst


def convert_error(checkpoint: Path, capsys) -> str:
    out = checkpoint.parent / "out.gguf"
    code = main(["convert", str(checkpoint), "-o", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("malhae: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    assert not out.exists()
    return lines[0]


def edit(path: Path, change) -> None:
    """Rewrite a JSON file with `change(data)` applied; a string value "@HUGE@" or "@DEEP@" becomes that raw JSON."""
    value = json.loads(path.read_text(encoding="utf-8"))
    change(value)
    path.write_text(json.dumps(value).replace('"@HUGE@"', HUGE).replace('"@DEEP@"', DEEP), encoding="utf-8")


@pytest.mark.parametrize(("name", "change", "says"), [
    ("config.json", lambda c: c.update(hidden_size="@HUGE@"), "config.json holds an integer wider than 64 bits"),
    ("config.json", lambda c: c.update(task_specific_params="@DEEP@"), "config.json is nested more than 100 levels"),
    ("tokenizer.json", lambda t: t["model"]["vocab"].update(a="@HUGE@"),
     "tokenizer.json holds an integer wider than 64 bits"),
    ("tokenizer.json", lambda t: t.update(post_processor="@DEEP@"), "tokenizer.json is nested more than 100 levels"),
    ("tokenizer_config.json", lambda t: t.update(model_max_length="@HUGE@"),
     "tokenizer_config.json holds an integer wider than 64 bits"),
])
def test_checkpoint_json_with_a_huge_integer_or_deep_nesting(checkpoint, capsys, name, change, says):
    edit(checkpoint / name, change)
    line = convert_error(checkpoint, capsys)
    assert str(checkpoint / name) in line and says in line and "download" in line


@pytest.mark.parametrize(("change", "says"), [
    (lambda t: t.update(added_tokens=[{"id": 5}]), 'added_tokens[0] is {"id": 5}; expected an object with "id"'),
    (lambda t: t["model"].update(vocab=list(t["model"]["vocab"])), "model.vocab is a list; expected an object"),
    (lambda t: t["model"].update(merges=[123, None]), "model.merges[0] is 123; expected \"a b\" or [\"a\", \"b\"]"),
    (lambda t: t["model"]["vocab"].update({"가나": -5}), 'model.vocab["가나"] is -5; expected a token id'),
    (lambda t: t["added_tokens"][0].update(id=-5), "added_tokens[0] is {"),
])
def test_tokenizer_json_with_fields_of_the_wrong_shape_names_the_field(checkpoint, capsys, change, says):
    edit(checkpoint / "tokenizer.json", change)
    line = convert_error(checkpoint, capsys)
    assert f"{checkpoint / 'tokenizer.json'}: " in line and says in line, line
    assert "download the model's tokenizer.json again" in line


@pytest.mark.parametrize("pre", [["ByteLevel"], "ByteLevel", {"type": "Sequence", "pretokenizers": "Digits"},
                                 {"type": "Sequence", "pretokenizers": [1, 2]}])
def test_a_pre_tokenizer_of_the_wrong_shape_is_named(pre):
    from malhae.convert import vocab

    with pytest.raises(UserError, match="has no llama.cpp equivalent"):
        vocab.choose_pre({"pre_tokenizer": pre})


# --- a saved chat ------------------------------------------------------------------------------------------------

def saved_chat(text: str = "안녕") -> dict:
    return {"format": "malhae-chat", "version": 1, "model": "m", "template": "base", "system": None,
            "settings": {"temperature": 0.7}, "turns": [{"role": "user", "text": text},
                                                         {"role": "assistant", "text": "네"}]}


@pytest.mark.parametrize(("content", "says"), [
    (json.dumps(saved_chat()).replace("0.7", HUGE), "it holds an integer wider than 64 bits"),
    (json.dumps(saved_chat()).replace('"m"', DEEP), "it is nested more than 100 levels deep"),
    (json.dumps(saved_chat("반가워요 \ud800")), "it holds a lone surrogate escape (half of a UTF-16 pair, not a "
                                                 "character) in turns[0].text"),
])
def test_load_refuses_huge_integers_deep_nesting_and_lone_surrogates(tmp_path, content, says):
    path = tmp_path / "chat.json"
    path.write_text(content, encoding="ascii")  # json.dumps escapes: "\ud800" is six ASCII characters
    with pytest.raises(UserError) as e:
        cv.load(path)
    message = str(e.value)
    assert message.startswith(f"cannot load {path}: {says}") and "\n" not in message
    assert message.endswith("; give a file saved with /save")


def test_a_chat_file_with_a_lone_surrogate_is_refused_and_the_session_goes_on(tmp_path):
    """Loaded, "\ud800" made every later prompt and /save fail with UnicodeEncodeError."""
    from test_chat import talk  # a real chat session: prompt_toolkit reading typed keys, the bundled demo model

    from malhae.store import models

    broken, saved = tmp_path / "broken.json", tmp_path / "saved.json"
    broken.write_text(json.dumps(saved_chat("반가워요 \ud800")), encoding="ascii")
    s = talk(models.demo_model(), f"/load {broken}\r안녕하세요\r/save {saved}\r")
    assert len(s.hints("lone surrogate")) == 1 and len(s.hints("cannot load")) == 1
    assert [t for r, t in s.turns if r == "user"] == ["안녕하세요"]  # the message after the refused /load
    assert json.loads(saved.read_text(encoding="utf-8"))["turns"][0]["text"] == "안녕하세요"


# --- a KoBEST data row -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("lines", "says"), [
    (['{"sentence": "좋다", "label": 1}', '{"sentence": "나쁘다", "label": ' + HUGE + "}"],
     "test.jsonl:2: the row holds an integer wider than 64 bits"),
    (['{"sentence": "좋다", "label": 1}', '{"sentence": ' + DEEP + ', "label": 0}'],
     "test.jsonl:2: the row is nested more than 100 levels deep"),
])
def test_kobest_rows_with_a_huge_integer_or_deep_nesting(tmp_path, lines, says):
    path = tmp_path / "sentineg" / "test.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = {t.name: t for t in select(None)}["sentineg"]
    with pytest.raises(UserError) as e:
        data.load(data.source(tmp_path, False), task, "test")
    assert says in str(e.value) and "\n" not in str(e.value)


# --- a server's answer -------------------------------------------------------------------------------------------

@contextmanager
def answering(body: bytes):
    """An HTTP server on 127.0.0.1 that answers every request with `body` as JSON."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("body", [DEEP, '{"data": [{"id": "m", "created": ' + HUGE + "}]}"])
def test_a_server_answering_deep_or_huge_json_is_one_line(body):
    with answering(body.encode()) as url:
        line = one_error_line(malhae("ask", "안녕", "--endpoint", url, "-n", "1"))
    assert url in line


@pytest.mark.parametrize(("change", "says"), [
    (lambda c: c.update(rope_scaling=5), "'rope_scaling' is 5; expected an object"),
    (lambda c: c.update(rope_parameters=["linear"]), "'rope_parameters' is ['linear']; expected an object"),
    (lambda c: c.update(rotary_pct="a quarter"), "'rotary_pct' is 'a quarter'; expected a number"),
    (lambda c: c.update(rotary_emb_base=[10000]), "'rotary_emb_base' is [10000]; expected a number"),
    (lambda c: c.update(layer_norm_eps="small"), "'layer_norm_eps' is 'small'; expected a number"),
    (lambda c: c.update(layer_norm_eps=float("nan")), "'layer_norm_eps' is nan; expected a number"),
    (lambda c: c.update(hidden_act=["gelu"]), "activation ['gelu'] is not supported"),
    (lambda c: c.update(architectures=7), "'architectures' is 7; expected a list of names"),
    (lambda c: c.update(vocab_size=1 << 40), "'vocab_size' is 1099511627776; expected a positive integer up to"),
    (lambda c: c.update(num_hidden_layers=True), "'num_hidden_layers' is True; expected a positive integer"),
    (lambda c: c.update(_name_or_path=5), "'_name_or_path' is 5; expected a text"),
])
def test_config_json_fields_of_the_wrong_type_or_size_are_named(checkpoint, capsys, change, says):
    """A config.json with a field of the wrong type or an absurd size: one line naming the file and the field, before
    anything is allocated (a vocab_size of 2**40 would have been a list of a trillion entries)."""
    edit(checkpoint / "config.json", change)
    line = convert_error(checkpoint, capsys)
    assert str(checkpoint / "config.json") in line and says in line, line
