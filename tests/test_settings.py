"""The settings table: one rule per setting, and every entry point (flags, config.toml, /set, saved chats) obeys it."""

from __future__ import annotations

import dataclasses

import pytest

from malhae.errors import UserError
from malhae.runtime.settings import SAMPLING_KEYS, SETTINGS, Sampling, check, context_size, gpu_layers, parse


@pytest.mark.parametrize(("key", "raw", "value"), [
    ("temperature", "0", 0.0), ("temperature", "1.5", 1.5), ("top_p", "1", 1.0), ("top_k", "0", 0),
    ("min_p", "0.1", 0.1), ("repeat_penalty", "1.2", 1.2), ("max_tokens", "64", 64), ("seed", "42", 42),
    ("seed", "random", None), ("ctx", "2048", 2048), ("ctx", "default", None),
])
def test_settings_parse(key, raw, value):
    assert parse(key, raw) == value


@pytest.mark.parametrize(("key", "raw", "says"), [
    ("temperature", "hot", "is not valid"), ("temperature", "-1", "from 0 to 10"), ("top_p", "0", "above 0"),
    ("top_k", "2.5", "is not valid"), ("min_p", "1", "up to 1"), ("max_tokens", "0", "1 or more"),
    ("seed", "-3", "0 to 4294967295"), ("ctx", "8", "16 or more"), ("temperature", "nan", "from 0 to 10"),
    ("warmth", "1", "unknown setting"),
])
def test_bad_settings_are_one_line_hints(key, raw, says):
    with pytest.raises(UserError) as e:
        parse(key, raw)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_setting_types_from_files_and_options():
    assert check("top_k", 40.0, "x") == 40
    for key, value in (("top_k", True), ("temperature", "0.7"), ("top_k", 2.5), ("max_tokens", None)):
        with pytest.raises(UserError):
            check(key, value, "x")


def test_sampling_defaults_are_the_tables():
    """The built-ins as documented in the README; Sampling(), the table and the settings file agree on them."""
    documented = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1,
                  "frequency_penalty": 0.0, "presence_penalty": 0.0, "repeat_last_n": 64, "max_tokens": 512,
                  "seed": None}
    assert {k: SETTINGS[k].default for k in SAMPLING_KEYS} == documented
    assert {f.name: f.default for f in dataclasses.fields(Sampling) if f.name in SAMPLING_KEYS} == documented


BAD = [("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")), ("top_p", 2.0),
       ("top_p", float("nan")), ("top_k", -3), ("min_p", 5.0), ("repeat_penalty", float("nan")),
       ("repeat_last_n", -9), ("max_tokens", -1), ("seed", -1), ("frequency_penalty", 3.0),
       ("presence_penalty", float("nan"))]


def _toml(value: float) -> str:
    return {"nan": "nan", "inf": "inf"}.get(str(value), repr(value))


@pytest.mark.parametrize(("key", "bad"), BAD)
def test_every_entry_point_refuses_the_same_values(key, bad, tmp_path, capsys):
    """One table, five doors: a flag, config.toml, /set, a saved chat and the command line itself."""
    import json

    from malhae.chat.conversation import Conversation
    from malhae.cli import main
    from malhae.runtime import templates
    from malhae.runtime.settings import SETTABLE
    from malhae.store import config

    with pytest.raises(UserError):
        check(key, bad)
    with pytest.raises(UserError, match=key):  # a flag, as complete/ask/chat pass it
        config.sampling_values("ask", {key: bad}, config.Settings(tmp_path / "none.toml"))
    path = tmp_path / "config.toml"
    path.write_text(f"[sampling]\n{key} = {_toml(bad)}\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 2"):
        config.load(path)
    if key in SETTABLE:
        with pytest.raises(UserError):
            parse(key, str(bad), f"/set {key}")
        saved = Conversation(templates.get("base")).to_dict()
        saved["settings"][key] = bad
        with pytest.raises(UserError, match=f"settings.{key}"):
            Conversation.from_dict(json.loads(json.dumps(saved)))
    flag = "--" + key.replace("_", "-") if key != "max_tokens" else "-n"
    assert main(["complete", "대한민국의 주권은", flag, str(bad), "--gpu-layers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("malhae: error:") == 1 and key in err and "Traceback" not in err


def test_gpu_layers_and_context_rules():
    assert gpu_layers(None) == "auto" and gpu_layers("auto") == "auto" and gpu_layers("AUTO") == "auto"
    assert gpu_layers("12") == 12 and gpu_layers(0) == 0
    for bad in ("-1", "all", "1.5", -2, True):
        with pytest.raises(UserError, match="gpu_layers"):
            gpu_layers(bad)
    assert context_size(None, 2048) == 2048 and context_size(None, 8192) == 4096 and context_size(None, None) == 2048
    assert context_size(300, 2048) == 300
    with pytest.raises(UserError, match="16 or more"):
        context_size(8, 2048)


def test_threads_are_bounded_everywhere_they_are_taken(tmp_path, capsys, monkeypatch, k_quant_checkpoint):
    """--threads 10000 made 10,001 threads and hung a 2-core machine: every command that takes threads refuses more
    than 4 × the logical CPUs, from a flag or from config.toml, before it loads or writes anything."""
    import os

    from malhae.cli import main
    from malhae.runtime.settings import MAX_THREADS

    assert 4 * (os.cpu_count() or 1) == MAX_THREADS
    text = tmp_path / "t.txt"
    text.write_text("대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. " * 20, encoding="utf-8")
    too_many = str(MAX_THREADS + 1)
    commands = [["complete", "가"], ["ask", "가"], ["chat"], ["bench"], ["eval", "ppl", "--text", str(text)],
                ["convert", str(k_quant_checkpoint), "--type", "q8_0", "-o", str(tmp_path / "out.gguf")]]
    for command in commands:
        assert main([*command, "--threads", too_many]) == 2, command
        err = capsys.readouterr().err
        assert err.count("malhae: error:") == 1 and f"from 1 to {MAX_THREADS}" in err, (command, err)
    assert main(["complete", "가", "-n", "1", "--threads", str(MAX_THREADS)]) == 0  # the bound itself is fine
    monkeypatch.setenv("MALHAE_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text(f"threads = {too_many}\n", encoding="utf-8")
    for command in [*commands, ["info"]]:
        assert main(command) == 2, command
        assert "config.toml, line 1: threads" in capsys.readouterr().err, command
    assert not (tmp_path / "out.gguf").exists()
