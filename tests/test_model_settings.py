"""A store model's own settings (NAME.toml beside NAME.gguf) and `malhae models set`, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import one_error_line
from test_cli_models import ROOT, error_line, listing, run

from malhae.errors import UserError
from malhae.store import model_settings, models
from malhae.store.config import tomllib
from malhae.store.local import open_store

ADAPTER = models.demo_model(models.DEMO_LORA)
pytestmark = pytest.mark.skipif(ADAPTER is None, reason="the bundled demo and its adapter are not built")


@pytest.fixture
def store(home, capsys, demo_path):
    """A store holding the demo as `mine` and its LoRA adapter as `sign`."""
    for path, name in ((demo_path, "mine"), (ADAPTER, "sign")):
        code, _, err = run(capsys, "models", "import", str(path), "--name", name)
        assert code == 0, err
    return home / "models"


def set_ok(capsys, *args: str) -> str:
    code, out, err = run(capsys, "models", "set", *args)
    assert code == 0, err
    return out


def shown(capsys, name: str) -> dict:
    data = json.loads(set_ok(capsys, name, "--json"))
    assert data["name"] == name
    return data["settings"]


def test_set_show_unset_reset(store, capsys):
    said = set_ok(capsys, "mine", "ctx=2048", "temperature=0.3", "seed=random", "gpu_layers=auto",
                  "system=너는 헌법 도우미야.\n짧게 답해.", "template=koalpaca", "keep_alive=10m")
    assert said.startswith("mine: set ctx=2048, temperature=0.3") and str(store / "mine.toml") in said
    written = tomllib.loads((store / "mine.toml").read_text(encoding="utf-8"))
    assert written == {"ctx": 2048, "gpu_layers": "auto", "temperature": 0.3, "seed": "random",
                       "system": "너는 헌법 도우미야.\n짧게 답해.", "template": "koalpaca", "keep_alive": "10m"}
    assert shown(capsys, "mine") == written  # JSON says "random" and "10m" as the file does, not null or 600

    read = model_settings.read(open_store(), "mine")  # what `malhae serve` reads
    assert read.load_values() == {"ctx": 2048, "gpu_layers": "auto"}
    assert read.sampling() == {"temperature": 0.3, "seed": None}  # None: random on purpose, over config.toml's
    assert read.system == "너는 헌법 도우미야.\n짧게 답해." and read.template == "koalpaca" and read.lora == []
    assert read.has_keep_alive and read.keep_alive == 600
    assert model_settings.for_path(store / "mine.gguf") == read

    out = set_ok(capsys, "mine")  # no pairs: the table
    assert "ctx" in out and "2048" in out and "koalpaca" in out and "10m" in out

    said = set_ok(capsys, "mine", "temperature=", "top_k=", "keep_alive=-1")
    assert "removed temperature" in said and "top_k was not set" in said and "keep_alive=forever" in said
    read = model_settings.read(open_store(), "mine")
    assert "temperature" not in read.values and read.has_keep_alive and read.keep_alive is None  # for ever

    assert set_ok(capsys, "mine", "--reset").strip() == "mine: every setting removed"
    assert not (store / "mine.toml").exists()
    assert "nothing was removed" in set_ok(capsys, "mine", "--reset")
    assert shown(capsys, "mine") == {} and "no settings of its own" in set_ok(capsys, "mine")
    empty = model_settings.read(open_store(), "mine")
    assert not empty.has_keep_alive and empty.keep_alive == model_settings.UNSET and empty.path is None


def test_removing_the_last_setting_removes_the_file(store, capsys):
    set_ok(capsys, "mine", "top_p=0.9")
    assert (store / "mine.toml").is_file()
    assert "no settings left" in set_ok(capsys, "mine", "top_p=")
    assert not (store / "mine.toml").exists()


def test_lora_is_found_and_checked_against_the_model(store, capsys):
    set_ok(capsys, "mine", "lora=sign:0.5,demo-signoff")
    assert tomllib.loads((store / "mine.toml").read_text())["lora"] == ["sign:0.5", "demo-signoff"]
    assert [(a.path.name, a.scale) for a in model_settings.read(open_store(), "mine").loras()] == \
        [("sign.gguf", 0.5), (ADAPTER.name, 1.0)]
    before = (store / "mine.toml").read_bytes()
    for value, said in (("nothere", "lora nothere: no model named 'nothere'"),
                        ("mine", "mine.gguf is a model, not a LoRA adapter"),
                        ("sign:lots", "the scale must be a number"),
                        ("sign,sign", "given twice"),
                        (",".join(["sign"] * 17), "at most 16")):
        code, _, err = run(capsys, "models", "set", "mine", f"lora={value}")
        assert code == 2 and said in error_line(err), value
        assert (store / "mine.toml").read_bytes() == before, value


@pytest.mark.parametrize("args, said", [
    (["nothere", "ctx=512"], "no model named 'nothere'"),
    (["mine", "temprature=0.3"], "unknown setting 'temprature' (did you mean 'temperature'?); the keys are ctx,"),
    (["mine", "temperature=hot"], "temperature=hot: temperature must be a number from 0 to 10"),
    (["mine", "temperature=11"], "e.g. temperature=0.7"),
    (["mine", "ctx=8"], "ctx=8: ctx must be a whole number of tokens, 16 or more"),
    (["mine", "kv_cache=q9"], "kv_cache must be one of f16"),
    (["mine", "seed=-1"], "seed must be a whole number from 0 to 4294967295, or random"),
    (["mine", "template=chatml"], "unknown template 'chatml'; choose one of: base"),
    (["mine", "keep_alive=soon"], "keep_alive must be a duration"),
    (["mine", "system=" + "가" * 6000], "system must be a text of at most 16 KiB"),
    (["mine", "temperature", "0.3"], "'temperature' is not KEY=VALUE: write e.g. `malhae models set mine "
                                     "temperature=0.3`"),
    (["mine", "ctx=512", "ctx=1024"], "ctx is given twice"),
    (["mine", "scale=0.5"], "scale is an adapter preset's setting"),
    (["mine", "--reset", "ctx=512"], "--reset removes every setting"),
    (["sign", "ctx=512"], "sign is a LoRA adapter, so its preset cannot set ctx: that belongs to its base model; "
                          "set it there (`malhae models set BASE ctx=…`)"),
    (["sign", "lora=sign"], "cannot set lora"),
    (["sign", "scale=1000"], "scale=1000: the scale must be a number from -100 to 100"),
])
def test_bad_input_is_one_line_and_leaves_the_file_as_it_was(store, capsys, args, said):
    name = args[0] if args[0] in ("mine", "sign") else "mine"
    set_ok(capsys, name, "temperature=0.5")
    before = (store / f"{name}.toml").read_bytes()
    code, _, err = run(capsys, "models", "set", *args)
    assert code == 2 and said in error_line(err)
    assert (store / f"{name}.toml").read_bytes() == before


def test_a_word_without_equals_is_one_line_from_the_real_command(store):
    proc = subprocess.run([sys.executable, "-m", "malhae", "models", "set", "mine", "temperature", "0.3"],
                          capture_output=True, cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)
    assert "is not KEY=VALUE" in one_error_line(proc)
    assert not (store / "mine.toml").exists()


@pytest.mark.parametrize("text, said", [
    ("ctx = ", "is not valid TOML"),
    ("ctx = \"x\"\n", 'ctx must be a whole number of tokens, 16 or more, or default, not "x", e.g. ctx = 4096; '
                      "fix the value, or remove it with `malhae models set mine ctx=`"),
    ("temprature = 0.3\n", "unknown setting 'temprature' (did you mean 'temperature'?)"),
    ("[sampling]\ntemperature = 0.3\n", "the keys are flat, not under [sampling]"),
    ('lora = "sign"\n', "lora must be at most 16 adapters"),
    ("keep_alive = true\n", "keep_alive must be a duration"),
    ("system = 3\n", "system must be a text"),
    ("scale = 0.5\n", "scale is an adapter preset's setting"),
])
def test_a_broken_file_is_one_line_naming_it_and_the_key(store, capsys, text, said):
    (store / "mine.toml").write_text(text, encoding="utf-8")
    code, _, err = run(capsys, "models", "set", "mine")
    line = error_line(err)
    assert code == 2 and str(store / "mine.toml") in line and said in line
    with pytest.raises(UserError, match="mine.toml"):
        model_settings.for_path(store / "mine.gguf")  # serve is stopped the same way
    # the listing still works, and says which file is broken
    code, out, err = run(capsys, "models")
    assert code == 0 and "!" in out and "settings file is broken" in err
    [entry] = [m for m in listing(capsys)["models"] if m["name"] == "mine"]
    assert entry["settings"] is None and said in entry["settings_error"]
    assert run(capsys, "models", "set", "mine", "--reset")[0] == 0 and not (store / "mine.toml").exists()


def test_a_wrong_key_in_the_file_can_be_removed_by_name(store, capsys):
    (store / "mine.toml").write_text('ctx = 512\ntemprature = 0.3\n', encoding="utf-8")
    code, _, err = run(capsys, "models", "set", "mine", "top_k=3")  # the file is refused as it is…
    assert code == 2 and "temprature" in error_line(err)
    assert "removed temprature" in set_ok(capsys, "mine", "temprature=")  # …and fixed with KEY=
    assert shown(capsys, "mine") == {"ctx": 512}


def test_the_adapter_preset(store, capsys):
    set_ok(capsys, "sign", "temperature=0.2", "scale=0.5", "system=답 끝에 서명해.", "keep_alive=0")
    preset = model_settings.read(open_store(), "sign")
    assert preset.scale == 0.5 and preset.sampling() == {"temperature": 0.2} and preset.load_values() == {}
    assert preset.keep_alive == 0 and preset.system == "답 끝에 서명해."
    (store / "sign.toml").write_text("ctx = 512\n", encoding="utf-8")  # by hand: refused as on the command line
    code, _, err = run(capsys, "models", "set", "sign")
    assert code == 2 and "sign is a LoRA adapter" in error_line(err) and str(store / "sign.toml") in err


def test_the_listing_marks_models_with_settings(store, capsys):
    set_ok(capsys, "mine", "ctx=512")
    set_ok(capsys, "sign", "scale=0.5")
    code, out, err = run(capsys, "models")
    assert code == 0, err
    rows = {row.split("│")[2].strip(): row.split("│")[1].strip() for row in out.splitlines() if row.count("│") > 2}
    assert rows["mine"] == "+" and rows["└ sign"] == "+" and rows["demo"] == "*"
    assert "+ its own settings (`malhae models set NAME`)" in err
    data = listing(capsys)
    assert data["models"][0]["settings"] == {"ctx": 512}
    assert {a["name"]: a["settings"] for a in data["adapters"]} == {"sign": {"scale": 0.5}, "demo-signoff": {}}


def test_rm_removes_the_settings_too(store, capsys, demo_path):
    set_ok(capsys, "mine", "ctx=512")
    code, _, err = run(capsys, "models", "rm", "mine", "--yes")
    assert code == 0, err
    assert not (store / "mine.toml").exists() and not (store / "mine.gguf").exists()
    assert f"removed mine's settings too ({store / 'mine.toml'})" in err
    assert run(capsys, "models", "import", str(demo_path), "--name", "mine")[0] == 0
    assert shown(capsys, "mine") == {}  # a new model of that name starts without them
    code, _, err = run(capsys, "models", "rm", "mine", "--yes")
    assert code == 0 and "settings" not in err


def test_the_builtin_demo_keeps_its_settings_in_the_store(home, capsys, demo_path):
    said = set_ok(capsys, "demo", "ctx=512", "keep_alive=1h30m")
    assert str(home / "models" / "demo.toml") in said
    assert shown(capsys, "malhae-demo-ko-f16") == {"ctx": 512, "keep_alive": "1h30m"}  # its other name
    found = model_settings.for_path(demo_path)  # what a command running the demo reads
    assert found.load_values() == {"ctx": 512} and found.keep_alive == 5400
    assert model_settings.for_path(ADAPTER).values == {}
    set_ok(capsys, "demo-signoff", "scale=0.3")
    assert model_settings.for_path(ADAPTER).scale == 0.3 and (home / "models" / "demo-signoff.toml").is_file()
    code, _, err = run(capsys, "models", "set", "demo-signoff", "ctx=512")
    assert code == 2 and "LoRA adapter" in error_line(err)
    assert model_settings.for_path(home / "elsewhere.gguf").values == {}  # a file outside the store: none


# --- the settings at work on the command line (chat, ask and complete start from them) ---------------------------

def _ask(capsys, *args: str) -> dict:
    code, out, err = run(capsys, "ask", "국회는?", "-m", "mine", "--json", "--threads", "2", "--draft", "off",
                         "--no-prompt-cache", *args)
    assert code == 0, err
    return json.loads(out)["stats"]


def test_ask_runs_with_the_models_own_settings_under_its_flags(store, capsys, home):
    plain = _ask(capsys, "--temperature", "0", "--max-tokens", "4")
    set_ok(capsys, "mine", "max_tokens=3", "temperature=0", "system=너는 대한민국 헌법을 잘 아는 도우미야.", "ctx=256")
    own = _ask(capsys)
    assert own["generated_tokens"] == 3  # the model's max_tokens, not ask's 256
    assert own["prompt_tokens"] > plain["prompt_tokens"] + 3  # its system text framed the question
    assert _ask(capsys, "--max-tokens", "5")["generated_tokens"] == 5  # a flag beats the model's setting
    (home / "config.toml").parent.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("[sampling]\nmax_tokens = 7\n", encoding="utf-8")
    assert _ask(capsys)["generated_tokens"] == 3  # the model's beats config.toml's
    set_ok(capsys, "mine", "max_tokens=")
    assert _ask(capsys)["generated_tokens"] == 7  # what the model leaves out, config.toml fills in
