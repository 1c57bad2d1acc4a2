"""`malhae models`, `--model NAME`, `--models-dir`, the settings file and `convert --add`, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from malhae.cli import main
from malhae.store import config, models
from malhae.store.config import tomllib

ROOT = Path(__file__).resolve().parent.parent
DEMO = models.demo_model()
pytestmark = pytest.mark.skipif(DEMO is None, reason="the bundled demo model is not built")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("malhae: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def listing(capsys, *root: str) -> dict:
    """`malhae models --json`, its "models" the store's only (the built-in demo listed after them:
    test_cli_first_hour.py)."""
    code, out, err = run(capsys, *root, "models", "--json")
    assert code == 0, err
    data = json.loads(out)
    return data | {"models": [m for m in data["models"] if not m["builtin"]]}


def test_empty_store_says_how_to_add_one(home, capsys):
    code, out, err = run(capsys, "models")
    assert code == 0
    assert "built-in" in out and str(home / "models") not in out  # the table: the demo alone
    assert str(home / "models") in err and "models import" in err and "--add" in err and "pull" in err
    assert len(err.strip().splitlines()) == 1  # one line under the table, on stderr
    assert listing(capsys)["models"] == []


def test_a_file_as_the_store_is_an_error_not_an_empty_store(home, capsys, tmp_path):
    not_a_folder = tmp_path / "models.txt"
    not_a_folder.write_text("x")
    for args in (["models"], ["models", "import", str(DEMO)], ["chat", "-m", "anything"]):
        code, out, err = run(capsys, "--models-dir", str(not_a_folder), *args)
        assert code == 2 and "is a file, not a folder" in error_line(err) and "no models" not in out, args


def test_import_list_default_rm(home, capsys):
    code, out, err = run(capsys, "models", "import", str(DEMO), "--name", "demo")
    assert code == 0, err
    assert "added demo" in out and (home / "models" / "demo.gguf").read_bytes() == DEMO.read_bytes()

    code, out, err = run(capsys, "models")
    assert code == 0 and "demo" in out and "f16" in out and "0.02" in out and "8.6M" in out
    assert str(home / "models") in err  # where the files are

    data = listing(capsys)
    assert data["dir"] == str(home / "models") and data["default"] is None
    [entry] = data["models"]
    assert entry["name"] == "demo" and entry["size"] == os.path.getsize(DEMO) and entry["default"] is False

    assert run(capsys, "models", "default", "demo")[0] == 0
    assert tomllib.loads((home / "config.toml").read_text())["default_model"] == "demo"
    assert listing(capsys)["models"][0]["default"] is True
    code, out, _ = run(capsys, "models", "default")
    assert code == 0 and "demo" in out and str(home / "config.toml") in out

    code, out, err = run(capsys, "models", "rm", "demo", "--yes")
    assert code == 0, err
    assert not (home / "models" / "demo.gguf").exists()
    assert "default_model removed" in err  # and it says so
    assert config.load().default_model is None


def test_import_errors(home, capsys, tmp_path):
    text = tmp_path / "x.gguf"
    text.write_text("hello")
    code, _, err = run(capsys, "models", "import", str(text))
    assert code == 2 and "is not a GGUF file" in error_line(err)
    assert run(capsys, "models", "import", str(DEMO), "--name", "d")[0] == 0
    code, _, err = run(capsys, "models", "import", str(DEMO), "--name", "d")
    assert code == 2 and "already in the store" in error_line(err) and "--force" in err
    assert run(capsys, "models", "import", str(DEMO), "--name", "d", "--force")[0] == 0
    code, _, err = run(capsys, "models", "import", str(DEMO), "--name", "../d")
    assert code == 2 and "cannot be a model name" in error_line(err)


def test_default_must_exist(home, capsys, tmp_path):
    code, _, err = run(capsys, "models", "default", "nothing")
    assert code == 2 and "no model named 'nothing'" in error_line(err)
    assert not (home / "config.toml").exists()
    code, _, err = run(capsys, "models", "default", str(tmp_path / "missing.gguf"))
    assert code == 2 and "does not exist" in error_line(err)
    assert run(capsys, "models", "default", str(DEMO))[0] == 0  # a path works too, stored absolute
    assert config.load().default_model == str(DEMO.absolute())
    assert run(capsys, "models", "default", "--clear")[0] == 0
    assert config.load().default_model is None


def test_models_dir_option_overrides_the_store(home, capsys, tmp_path):
    other = tmp_path / "other"
    assert run(capsys, "--models-dir", str(other), "models", "import", str(DEMO), "--name", "x")[0] == 0
    assert (other / "x.gguf").is_file() and not (home / "models").exists()
    assert [m["name"] for m in listing(capsys, "--models-dir", str(other))["models"]] == ["x"]
    assert listing(capsys)["models"] == []  # the option lasts one run
    code, out, err = run(capsys, "--models-dir", str(other), "complete", "대한민국", "-m", "x", "-n", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["model"] == str(other / "x.gguf")


def test_rm_without_a_terminal_needs_yes(home, capsys):
    assert run(capsys, "models", "import", str(DEMO), "--name", "demo")[0] == 0
    proc = subprocess.run([sys.executable, "-m", "malhae", "models", "rm", "demo"], capture_output=True, text=True,
                          cwd=ROOT, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 2 and "--yes" in error_line(proc.stderr)
    assert (home / "models" / "demo.gguf").exists()


def test_rm_on_a_terminal_asks(home, capsys):
    pexpect = pytest.importorskip("pexpect")
    assert run(capsys, "models", "import", str(DEMO), "--name", "demo")[0] == 0
    for answer, kept in (("n", True), ("y", False)):
        child = pexpect.spawn(sys.executable, ["-m", "malhae", "models", "rm", "demo"], cwd=str(ROOT),
                              env=dict(os.environ), encoding="utf-8", timeout=30)
        child.expect_exact("delete demo")
        child.sendline(answer)
        child.expect(pexpect.EOF)
        child.close()
        assert (home / "models" / "demo.gguf").exists() is kept


def test_unknown_model_name_is_one_line_with_a_suggestion(home, capsys):
    assert run(capsys, "models", "import", str(DEMO), "--name", "malhae-demo")[0] == 0
    for command in (["complete", "x"], ["ask", "x"], ["chat"], ["bench"]):
        args = [*command, "malhae-dmeo"] if command == ["bench"] else [*command, "-m", "malhae-dmeo"]
        code, _, err = run(capsys, *args)
        line = error_line(err)
        assert code == 2, command
        assert line == (f"malhae: error: no model named 'malhae-dmeo' in {home / 'models'}; see `malhae models` "
                        "(did you mean 'malhae-demo'?)"), command


# --- settings file and precedence, seen from the command line -----------------------------------------------------

def test_complete_takes_settings_from_the_file_and_flags_over_them(home, capsys):
    home.mkdir()
    (home / "config.toml").write_text("[sampling]\ntemperature = 0\nmax_tokens = 3\n")
    args = ["complete", "대한민국의 주권은", "--json", "--threads", "1"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    stats = json.loads(out)["stats"]
    assert stats["generated_tokens"] == 3 and stats["stop_reason"] == "length"  # the file's max_tokens
    code, out, err = run(capsys, *args, "-n", "5")
    assert json.loads(out)["stats"]["generated_tokens"] == 5  # the flag's
    assert "bundled demo" in err  # no default_model: the demo, as before


def test_ctx_and_default_model_come_from_the_file(home, capsys):
    assert run(capsys, "models", "import", str(DEMO), "--name", "mine")[0] == 0
    (home / "config.toml").write_text('default_model = "mine"\nctx = 16\n')
    prompt = "대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. " * 3
    code, _, err = run(capsys, "complete", prompt, "-n", "2", "--threads", "1")
    assert code == 2 and "the context of 16" in error_line(err)  # the file's ctx was used
    code, out, err = run(capsys, "complete", prompt, "-n", "2", "--ctx", "256", "--json", "--threads", "1")
    assert code == 0, err
    assert json.loads(out)["model"] == str(home / "models" / "mine.gguf") and "bundled demo" not in err


def test_a_broken_settings_file_stops_every_command_in_one_line(home, capsys):
    home.mkdir()
    (home / "config.toml").write_text("[sampling]\ntemprature = 0.1\n")
    for args in (["complete", "x"], ["models"], ["models", "default"]):
        code, _, err = run(capsys, *args)
        line = error_line(err)
        assert code == 2 and str(home / "config.toml") in line and "line 2" in line and "'temperature'" in line


def test_malhae_config_points_at_another_file(home, capsys, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere.toml"
    monkeypatch.setenv("MALHAE_CONFIG", str(other))
    assert run(capsys, "models", "default", str(DEMO))[0] == 0
    assert other.is_file() and not (home / "config.toml").exists()


# --- convert --add ------------------------------------------------------------------------------------------------

def test_convert_add_writes_into_the_store(home, capsys, checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = checkpoints("tf4-st-f16")
    code, out, err = run(capsys, "convert", str(src), "-t", "q8_0", "--add")
    assert code == 0, err
    stored = home / "models" / "tf4-st-f16-q8_0.gguf"  # <model>-<type>, like the default file name
    assert stored.is_file() and list(tmp_path.glob("*.gguf")) == []  # straight into the store, no copy in cwd
    assert "malhae chat -m tf4-st-f16-q8_0" in out
    [entry] = listing(capsys)["models"]
    assert entry["name"] == "tf4-st-f16-q8_0" and entry["type"] == "q8_0" and entry["source"] == src.resolve().name
    assert [p.name for p in (home / "models").iterdir()] == ["tf4-st-f16-q8_0.gguf"]  # no temporary files left

    # the same name again: refused before converting (this "checkpoint" does not even exist)
    code, _, err = run(capsys, "convert", str(tmp_path / "not-there"), "-t", "q8_0", "--add", "--name",
                       "tf4-st-f16-q8_0")
    assert code == 2 and "already in the store" in error_line(err) and "--force" in err


def test_convert_add_with_output_copies_into_the_store(home, capsys, checkpoints, tmp_path):
    out_file = tmp_path / "x.gguf"
    code, _, err = run(capsys, "convert", str(checkpoints("tf4-st-f16")), "-t", "f16", "-o", str(out_file), "--add",
                       "--name", "tiny")
    assert code == 0, err
    assert out_file.is_file() and (home / "models" / "tiny.gguf").read_bytes() == out_file.read_bytes()
    code, out, err = run(capsys, "complete", "대한민국", "-m", "tiny", "-n", "2", "--json", "--threads", "1")
    assert code == 0, err
    assert json.loads(out)["model"] == str(home / "models" / "tiny.gguf")


def test_a_corrupt_gguf_is_one_line_everywhere_and_the_store_still_lists(home, capsys, tmp_path):
    """n_tensors = 2⁴⁰ once made complete, ask, info, models import and chat /model internal errors, made `malhae
    models` fail entirely, and `models rm` could not remove the file."""
    import struct

    data = DEMO.read_bytes()
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(data[:8] + struct.pack("<Q", 1 << 40) + data[16:])
    text = tmp_path / "t.txt"
    text.write_text("대한민국의 주권은 국민에게 있다. " * 50, encoding="utf-8")
    for args in (["complete", "가", "-m", str(bad)], ["ask", "가", "-m", str(bad)], ["info", str(bad)],
                 ["models", "import", str(bad)], ["eval", "ppl", str(bad), "--text", str(text)]):
        code, _, err = run(capsys, *args)
        assert code == 2 and str(bad) in error_line(err) and "corrupt header" in err, args
    chat = subprocess.run([sys.executable, "-m", "malhae", "chat", "-m", str(DEMO)], cwd=ROOT, capture_output=True,
                          input=f"/model {bad}\n/exit\n".encode(), env=os.environ | {"MALHAE_HOME": str(home)})
    assert chat.returncode == 0 and b"corrupt header" in chat.stderr and b"internal error" not in chat.stderr

    store = home / "models"
    store.mkdir(parents=True)
    (store / "broken.gguf").write_bytes(bad.read_bytes())
    (store / "good.gguf").write_bytes(data)
    listed = {m["name"]: m for m in listing(capsys)["models"]}
    assert listed["good"]["error"] is None and listed["good"]["type"] == "f16"
    assert "corrupt header" in listed["broken"]["error"]
    code, out, err = run(capsys, "models")
    flat = " ".join(re.sub(r"[│┃|]", " ", out).split())  # a cell's text as one line, wherever the table wrapped it
    assert code == 0 and "good" in out and "broken" in out and "models rm broken" in flat
    code, out, err = run(capsys, "models", "rm", "broken", "--yes")
    assert code == 0 and not (store / "broken.gguf").exists() and (store / "good.gguf").exists()
    code, out, err = run(capsys, "models", "rm", "broken", "--yes")  # gone: says so, and no advice on adding one
    assert code == 2 and "nothing was removed" in error_line(err) and "import" not in err
