"""LoRA adapters in the model store, as a user meets them: `malhae models` lists each under its base, `info` describes
one without loading anything, `models default` refuses one, `models rm` of a base names the adapters it leaves
behind, and the store's add path (`convert --add`, `models import`) takes an adapter file."""

from __future__ import annotations

import json
import shutil

import lora_pair
import pytest
from test_cli_models import error_line, run

from malhae.store import adapters
from malhae.store.local import open_store

OTHER_BASE = "EleutherAI/polyglot-ko-5.8b"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return lora_pair.build(tmp_path_factory.mktemp("lora-store"))


@pytest.fixture(scope="module")
def stray(pair, tmp_path_factory):
    """An adapter that fits the base's shapes but names another base (its adapter_config.json says so)."""
    root = tmp_path_factory.mktemp("stray")
    folder = root / "peft"
    shutil.copytree(pair.peft, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": OTHER_BASE}))
    return lora_pair.adapter_gguf(folder, pair.base, root / "stray.gguf")




def add(capsys, path, name: str) -> str:
    code, out, err = run(capsys, "models", "import", str(path), "--name", name)
    assert code == 0, err
    return out


def listing(capsys) -> dict:
    code, out, err = run(capsys, "models", "--json")
    assert code == 0, err
    return json.loads(out)


def test_adapters_are_listed_under_their_base(home, capsys, pair, stray):
    add(capsys, pair.base, "base-a")
    add(capsys, pair.base, "base-b")  # e.g. another quantization of the same model: the adapter runs on both
    said = add(capsys, pair.adapter, "style")
    assert "LoRA adapter" in said and "--lora style" in said and "chat -m style" not in said
    add(capsys, stray, "stray")
    data = listing(capsys)
    assert [m["name"] for m in data["models"] if not m["builtin"]] == ["base-a", "base-b"]  # never a model
    found = {a["name"]: a for a in data["adapters"]}
    assert found["style"]["for"] == ["base-a", "base-b"] and found["style"]["kind"] == "adapter"
    assert found["style"]["base"] == str(pair.checkpoint) and found["style"]["size"] == pair.adapter.stat().st_size
    assert found["stray"]["for"] == [] and found["stray"]["base"] == OTHER_BASE
    code, out, err = run(capsys, "models")
    assert code == 0, err
    rows = out.splitlines()
    at = [i for i, row in enumerate(rows) if "└ style" in row]
    assert len(at) == 2 and "base-a" in rows[at[0] - 1] and "base-b" in rows[at[1] - 1]  # right under each base
    tight = "".join(out.replace("│", "").split())  # the cells' text without spaces, wherever the table wraps
    assert "--lorastyle" in tight and "strayloraf32" in tight
    assert f"itsbase{OTHER_BASE}isnotinthestore" in tight


def test_an_adapter_is_never_a_model(home, capsys, pair):
    add(capsys, pair.base, "base-a")
    add(capsys, pair.adapter, "style")
    code, _, err = run(capsys, "models", "default", "style")
    line = error_line(err)
    assert code == 2 and "'style' is a LoRA adapter, not a model" in line and 'lora = ["style"]' in line
    assert listing(capsys)["default"] is None  # nothing written
    code, _, err = run(capsys, "models", "default", str(pair.adapter))
    assert code == 2 and "is a LoRA adapter, not a model" in error_line(err)
    code, _, err = run(capsys, "complete", "안녕", "-m", "style")
    assert code == 2 and "-m BASE --lora" in error_line(err)


def test_info_describes_an_adapter_from_its_header(home, capsys, pair):
    add(capsys, pair.base, "base-a")
    add(capsys, pair.adapter, "style")
    code, out, err = run(capsys, "info", "style", "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["kind"] == "adapter" and facts["rank"] == 4 and facts["alpha"] == 8 and facts["scale"] == 2
    assert facts["targets"] == ["attn_output", "attn_qkv", "ffn_down", "ffn_up"] and facts["layers"] == 2
    assert facts["base"] == str(pair.checkpoint) and facts["bases_in_store"] == ["base-a"]
    assert facts["file_size"] == pair.adapter.stat().st_size and facts["tensor_type"] == "f32"
    code, out, err = run(capsys, "info", "style")
    assert code == 0, err
    flat = " ".join(out.split())
    assert "LoRA adapter" in flat and "rank 4, alpha 8" in flat and "attn_qkv" in flat and "fits base-a" in flat
    assert str(pair.checkpoint) in flat and f"{pair.adapter.stat().st_size:,} bytes" in flat
    assert "malhae chat -m base-a --lora style" in err


def test_removing_a_base_names_the_adapters_left_without_one(home, capsys, pair, stray):
    add(capsys, pair.base, "base-a")
    add(capsys, pair.base, "base-b")
    add(capsys, pair.adapter, "style")
    add(capsys, stray, "stray")
    code, out, err = run(capsys, "models", "rm", "base-a", "--yes")
    assert code == 0 and "removed base-a" in out and "style" not in err  # base-b still takes it
    code, out, err = run(capsys, "models", "rm", "base-b", "--yes")
    notes = [line for line in err.splitlines() if "without their base" in line]
    assert code == 0 and "removed base-b" in out
    assert len(notes) == 1 and "style" in notes[0] and "stray" not in notes[0] and "base-b" in notes[0]
    data = listing(capsys)
    assert {a["name"]: a["for"] for a in data["adapters"] if not a["builtin"]} == {"style": [], "stray": []}  # stay
    code, out, err = run(capsys, "models", "rm", "style", "--yes")
    assert code == 0 and "removed style" in out and "without" not in err


def test_the_stores_add_path_takes_an_adapter(home, pair, tmp_path):
    """What `malhae convert PEFT_FOLDER --add` uses: conversion_target before converting, finish after, straight into
    the store (no -o) or copied from -o."""
    store = open_store()
    target = store.conversion_target("made-here", None, False)
    entry = target.finish(lora_pair.adapter_gguf(pair.peft, pair.base, target.output))
    assert entry.adapter and entry.name == "made-here" and entry.base == str(pair.checkpoint)
    target = store.conversion_target("copied", tmp_path / "elsewhere.gguf", False)
    entry = target.finish(lora_pair.adapter_gguf(pair.peft, pair.base, target.output))
    assert entry.adapter and entry.path == store.root / "copied.gguf" and (tmp_path / "elsewhere.gguf").is_file()
    with pytest.raises(Exception, match="already in the store"):
        store.conversion_target("copied", None, False)
    assert [e.name for e in store.entries() if e.adapter] == ["copied", "made-here"]


def test_bases_match_by_name_and_shape(home, capsys, pair, demo_path):
    """A model named as the adapter's base but of another shape is not its base."""
    add(capsys, pair.base, "base-a")
    add(capsys, demo_path, "lorabase")  # the base's folder name, but the demo's shapes
    add(capsys, pair.adapter, "style")
    entries = open_store().entries()
    adapter = next(e for e in entries if e.adapter)
    assert [m.name for m in adapters.bases(adapter, entries)] == ["base-a"]


def test_an_adapter_by_its_store_name(home, capsys, pair):
    """--lora NAME finds the adapter in the store, as -m NAME finds a model; the answer changes."""
    add(capsys, pair.base, "base-a")
    add(capsys, pair.adapter, "style")
    greedy = ["--temperature", "0", "--max-tokens", "12"]
    code, plain, err = run(capsys, "complete", "대한민국은", "-m", "base-a", *greedy)
    assert code == 0, err
    code, adapted, err = run(capsys, "complete", "대한민국은", "-m", "base-a", "--lora", "style", *greedy)
    assert code == 0, err
    code, off, err = run(capsys, "complete", "대한민국은", "-m", "base-a", "--lora", "style:0", *greedy)
    assert code == 0, err
    assert adapted != plain and off == plain
