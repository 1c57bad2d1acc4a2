"""What a new user meets in the first hour of the command line: the demo model by name, `--version`, and help that
describes only what a command takes, in words (not Python types), readable in an 80-column terminal."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_models import run

from malhae.store.config import tomllib

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "malhae-demo-ko-f16.gguf"  # where the bundled demo is built, named here, not asked for
needs_demo = pytest.mark.skipif(not DEMO.is_file(), reason="the bundled demo model is not built")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TERMINAL_80 = {"TTY_COMPATIBLE": "1", "NO_COLOR": "1", "COLUMNS": "80", "LINES": "40"}  # rich: an 80-column tty


def is_demo(path: str) -> bool:
    return Path(path).samefile(DEMO)  # an editable install may reach the same file by another path


def malhae(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, text=True, timeout=120,
                          input=stdin, cwd=ROOT, env=os.environ | (env or {}))


def help_text(capsys, monkeypatch, *command: str, columns: int) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    code, out, err = run(capsys, *command, "--help")
    assert code == 0, err
    return out


COMMANDS = [["convert"], ["complete"], ["ask"], ["chat"], ["serve"], ["ps"], ["stop"], ["bench"], ["info"],
            ["recommend"], ["pull"], ["imatrix"], ["eval", "ppl"], ["eval", "compare"], ["eval", "kobest"], ["models"],
            ["models", "import"], ["models", "rm"], ["models", "set"], ["models", "default"], ["models", "catalog"],
            ["eval"]]


# --- 1. the demo model has a name --------------------------------------------------------------------------------

@needs_demo
def test_models_lists_the_builtin_demo_even_when_the_store_is_empty(home, capsys):
    code, out, err = run(capsys, "models")
    assert code == 0, err
    assert "demo" in out and "built-in" in out and "f16" in out  # a row, not "the store is empty"
    assert str(home / "models") in err and "models import" in err  # where your own go, and how to add one
    code, out, err = run(capsys, "models", "--json")
    assert code == 0, err
    [demo] = [m for m in json.loads(out)["models"] if m["builtin"]]
    assert demo["name"] == "demo" and is_demo(demo["path"]) and demo["size"] == DEMO.stat().st_size
    assert demo["default"] is True  # no default_model set: it is what every command runs


@needs_demo
def test_demo_is_a_model_name_for_every_command(home, capsys, tmp_path):
    for args in (["ask", "대한민국의 수도는?", "-m", "demo"],
                 ["complete", "대한민국의 주권은", "-m", "malhae-demo-ko-f16"]):
        code, out, err = run(capsys, *args, "-n", "2", "--json", "--threads", "1")
        assert code == 0, err
        assert is_demo(json.loads(out)["model"]) and "bundled demo" not in err, args  # named: no notice
    code, out, err = run(capsys, "info", "demo", "--json")
    assert code == 0 and is_demo(json.loads(out)["path"]), err
    code, out, err = run(capsys, "bench", "demo", "-p", "8", "-n", "2", "-r", "1", "--threads", "1", "--json")
    assert code == 0, err
    text = tmp_path / "t.txt"
    text.write_text("대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. " * 20, encoding="utf-8")
    code, out, err = run(capsys, "eval", "ppl", "demo", "--text", str(text), "--ctx", "64", "--threads", "1",
                         "--json")
    assert code == 0 and json.loads(out)["ppl"] > 1, err
    chat = malhae("chat", "-m", "demo", "--threads", "1", stdin="/exit\n", env={"MALHAE_HOME": str(home)})
    assert chat.returncode == 0 and "no model named" not in chat.stderr, chat.stderr
    with socket.socket() as taken:  # serve resolves the name, then stops at the port: no model is loaded
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(capsys, "serve", "-m", "demo", "--port", str(port))
    assert code == 2 and "cannot listen on" in err and "no model named" not in err, err


@needs_demo
def test_demo_in_the_settings_file_and_as_the_default(home, capsys):
    home.mkdir()
    (home / "config.toml").write_text('default_model = "demo"\n')
    code, out, err = run(capsys, "complete", "대한민국의 주권은", "-n", "1", "--json", "--threads", "1")
    assert code == 0 and is_demo(json.loads(out)["model"]), err
    (home / "config.toml").unlink()
    assert run(capsys, "models", "default", "demo")[0] == 0
    assert tomllib.loads((home / "config.toml").read_text())["default_model"] == "demo"
    code, _, err = run(capsys, "models", "rm", "demo", "--yes")  # part of malhae: nothing to remove
    assert code == 2 and "built in" in err and DEMO.is_file()


@needs_demo
def test_a_model_of_the_same_name_in_the_store_comes_first(home, capsys):
    assert run(capsys, "models", "import", str(DEMO), "--name", "demo")[0] == 0
    code, out, err = run(capsys, "complete", "대한민국", "-m", "demo", "-n", "1", "--json", "--threads", "1")
    assert code == 0 and json.loads(out)["model"] == str(home / "models" / "demo.gguf"), err
    listed = json.loads(run(capsys, "models", "--json")[1])["models"]
    assert [(m["name"], m["builtin"]) for m in listed] == [("demo", False), ("malhae-demo-ko-f16", True)]


@needs_demo
def test_the_demo_notice_is_one_line_of_an_80_column_terminal_and_stdout_stays_clean(home):
    done = malhae("ask", "대한민국의 수도는?", "-n", "2", "--threads", "1",
                  env=TERMINAL_80 | {"MALHAE_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    err = ANSI.sub("", done.stderr)
    lines = err.splitlines()
    stats = next(i for i, line in enumerate(lines) if re.match(r"\d+ tokens", line))  # ask's own line comes last
    notes = [line for line in lines[:stats] if line.strip()]
    assert len(notes) == 1 and "bundled demo" in notes[0] and len(notes[0]) <= 80, err
    assert "demo" not in done.stdout


# --- 2. --version -------------------------------------------------------------------------------------------------

def test_version_is_printed_from_the_package_metadata():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for flag in ("--version", "-V"):
        done = malhae(flag)
        assert done.returncode == 0 and done.stdout == f"malhae {version}\n" and not done.stderr, (flag, done)


# --- 3.-5. help -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_describes_only_options_the_command_takes(capsys, monkeypatch, command):
    text = help_text(capsys, monkeypatch, *command, columns=200)
    takes_endpoint = re.search(r"^│\s+(\*\s+)?--endpoint\s", text, re.M) is not None  # its row (* = required)
    assert takes_endpoint or "--endpoint" not in text, command
    if command in (["bench"], ["serve"]):
        assert "--endpoint" not in text and "demo" in text  # the model help says the demo's name


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_words_not_python_types(capsys, monkeypatch, command):
    text = help_text(capsys, monkeypatch, *command, columns=200)
    assert not re.search(r"<(str|int|float|path|bool|list\[\w+\])>", text), command  # options and arguments
    rows = [line for line in text.splitlines() if re.match(r"│\s+(\*\s+)?--", line)]  # one per option
    values = [re.match(r"│\s+(\*\s+)?--[\w-]+(\s+-\w+)?\s+(\S+)", row)[3] for row in rows]  # or the help's 1st word
    assert rows and not [v for v in values if v.startswith("<")], (command, values)  # TEXT, INTEGER, … not <int>


def test_top_level_help_at_80_columns_shows_every_command_whole(capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, columns=80)
    names = re.findall(r"^│ (\w+)\s{2,}\S", text, re.M)
    assert names == ["convert", "complete", "ask", "chat", "serve", "ps", "stop", "bench", "info", "recommend", "pull",
                     "imatrix", "eval", "models", "cache"]
    assert not re.search(r"\w…", text), text


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_no_help_is_cut_short_at_80_columns(capsys, monkeypatch, command):
    text = help_text(capsys, monkeypatch, *command, columns=80)
    assert not re.search(r"\w…", text), text  # rich's mark of a cut word ("an…"), not a "…" the help says
    assert max(len(line) for line in text.splitlines()) <= 80, text


def test_catalog_titles_are_whole_lines_at_80_columns():
    done = malhae("models", "catalog", env=TERMINAL_80)
    assert done.returncode == 0, done.stderr
    lines = ANSI.sub("", done.stdout).splitlines()
    titles = [line.strip() for line in lines if line.strip().startswith(("Best type", "Tensor bytes", "Polyglot-Ko"))]
    assert len(titles) == 4, lines
    for title in titles:  # each title is a whole phrase: ends where its parenthesis closes
        assert title.count("(") == title.count(")"), title
    assert all(len(line) <= 80 for line in lines)
