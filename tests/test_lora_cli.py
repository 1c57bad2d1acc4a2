"""Adapters through the command line, as users give them: convert, --lora, config.toml, and every mistake one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lora_pair
import pytest
from helpers import one_error_line

pytest.importorskip("peft")

ENV = {**os.environ, "COLUMNS": "200"}


def malhae(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "malhae", *map(str, args)], capture_output=True, timeout=timeout,
                          env=env or ENV)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return lora_pair.build(tmp_path_factory.mktemp("lora-cli"))


def greedy(model, *extra, env=None):
    proc = malhae("complete", "-m", model, "대한민국은", "-n", "12", "--temperature", "0", *extra, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def test_convert_add_then_run_by_name(pair, home, tmp_path):
    env = {**ENV, "MALHAE_HOME": str(home)}
    proc = malhae("convert", pair.peft, "--base", pair.base, "--add", "--name", "my-adapter", env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "LoRA adapter, rank 4" in proc.stdout.decode()
    plain = greedy(pair.base, env=env)
    adapted = greedy(pair.base, "--lora", "my-adapter", env=env)
    assert adapted != plain
    assert greedy(pair.base, "--lora", "my-adapter:0", env=env) == plain  # scale 0: as if not there
    assert greedy(pair.base, "--lora", pair.adapter, env=env) == adapted  # by file: the same adapter

    # config.toml's lora applies by default; --lora none turns it off for one run
    (home / "config.toml").write_text('lora = ["my-adapter"]\n')
    env["MALHAE_CONFIG"] = str(home / "config.toml")
    assert greedy(pair.base, env=env) == adapted
    assert greedy(pair.base, "--lora", "none", env=env) == plain


def test_the_base_is_found_from_the_adapters_config(pair, tmp_path):
    """PEFT wrote the base's folder as base_model_name_or_path: no --base needed while that folder exists."""
    assert json.loads((pair.peft / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        pair.checkpoint)
    proc = malhae("convert", pair.peft, "-o", tmp_path / "a.gguf", "--type", "f32")
    assert proc.returncode == 0, proc.stderr.decode()
    assert greedy(pair.base, "--lora", tmp_path / "a.gguf") == greedy(pair.base, "--lora", pair.adapter)


def test_merged_conversion_verifies(pair, tmp_path):
    proc = malhae("convert", pair.checkpoint, "--merge-lora", f"{pair.peft}:0.5", "-t", "f32", "-o",
                  tmp_path / "m.gguf", "--verify", timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "PASS" in proc.stdout.decode() + proc.stderr.decode()
    assert greedy(tmp_path / "m.gguf") == greedy(pair.base, "--lora", f"{pair.adapter}:0.5")


def test_mistakes_are_one_line_and_write_nothing(pair, tmp_path, demo_path):
    cases = []
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    (weights_only / "adapter_model.safetensors").write_bytes((pair.peft / "adapter_model.safetensors").read_bytes())
    cases.append((("convert", weights_only, "--base", pair.base), "no adapter_config.json"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    cases.append((("convert", corrupt, "--base", pair.base), "not valid JSON"))
    cases.append((("convert", pair.peft, "--base", demo_path), "does not fit malhae-demo-ko-f16.gguf"))
    cases.append((("convert", pair.peft, "--base", demo_path, "--imatrix", "auto"), "--imatrix is for converting"))
    cases.append((("complete", "-m", pair.base, "x", "--lora", pair.base), "is a model, not a LoRA adapter"))
    cases.append((("complete", "-m", pair.adapter, "x"), "is a LoRA adapter, not a model"))
    cases.append((("complete", "-m", demo_path, "x", "--lora", pair.adapter), "does not fit malhae-demo-ko-f16"))
    cases.append((("complete", "-m", pair.base, "x", "--lora", tmp_path / "missing.gguf"), "does not exist"))
    cases.append((("complete", "-m", pair.base, "x", "--lora", pair.peft), "is a directory; convert"))
    for scale in ("nan", "inf", "-1000", "abc"):
        cases.append((("complete", "-m", pair.base, "x", "--lora", f"{pair.adapter}:{scale}"), "the scale must be"))
    cases.append((("convert", pair.checkpoint, "--merge-lora", f"{pair.peft}:inf"), "the scale must be"))
    cases.append((("convert", pair.peft, "--base", pair.base, "-t", "q4_k_m"), "f16 (the default) or f32"))
    weights = pair.peft / "adapter_model.safetensors"
    cases.append((("convert", pair.peft, "--base", pair.base, "-o", weights, "--force"), "the adapter's own files"))
    cases.append((("convert", pair.checkpoint, "--merge-lora", pair.peft, "-o", weights, "--force"),
                  "an adapter's own files"))
    for args, said in cases:
        line = one_error_line(malhae(*args))
        assert said in line, (args, line)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))
    assert weights.read_bytes()[:8] != b"GGUF\x03\x00\x00\x00"  # the adapter's weights are still its own


def test_a_pickle_payload_in_an_adapter_bin_is_never_run(pair, tmp_path):
    import torch

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((pair.peft / "adapter_config.json").read_text())
    torch.save({"base_model.model.x.lora_A.weight": Payload()}, folder / "adapter_model.bin")
    line = one_error_line(malhae("convert", folder, "--base", pair.base, "-o", tmp_path / "a.gguf"))
    assert "could run code" in line
    assert not marker.exists() and not (tmp_path / "a.gguf").exists()


def test_dora_is_refused_at_run_time_and_merges(pair, tmp_path):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pair.checkpoint, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], use_dora=True,
                             init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "dora")
    line = one_error_line(malhae("convert", tmp_path / "dora", "--base", pair.base, "-o", tmp_path / "a.gguf"))
    assert "DoRA" in line and "--merge-lora" in line
    assert not (tmp_path / "a.gguf").exists()
    proc = malhae("convert", pair.checkpoint, "--merge-lora", tmp_path / "dora", "-t", "f32", "-o",
                  tmp_path / "m.gguf", "--verify", timeout=300)
    assert proc.returncode == 0 and "PASS" in proc.stdout.decode() + proc.stderr.decode(), proc.stderr.decode()


def test_an_adapters_own_words_never_reach_the_terminal_raw(pair, tmp_path, home):
    """general.name and the base's name are whatever whoever made the file wrote: `info`, `models` and the run's
    note print them without their control characters (no colours, titles or cleared screens from a file)."""
    import gguf

    reader = gguf.GGUFReader(pair.adapter)
    evil = tmp_path / "evil.gguf"
    w = gguf.GGUFWriter(evil, arch="gptneox")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_name("evil\x1b]0;owned\x07\x1b[31m")
    w.add_uint32("general.base_model.count", 1)
    w.add_string("general.base_model.0.name", "other\x1b[2J\u202e")
    for t in reader.tensors:
        w.add_tensor(t.name, t.data.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    env = {**ENV, "MALHAE_HOME": str(home)}
    shown = [malhae("info", evil, env=env), malhae("models", "import", evil, env=env), malhae("models", env=env),
             malhae("complete", "-m", pair.base, "가", "-n", "2", "--lora", evil, env=env)]
    for proc in shown:
        assert proc.returncode == 0, proc.stderr.decode()
        text = (proc.stdout + proc.stderr).decode()
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, text
    assert "other[2J" in shown[0].stdout.decode() + shown[0].stderr.decode()  # said, without its escapes


def test_the_base_is_found_in_the_store_by_its_hub_id(pair, tmp_path, home):
    """An adapter from the hub names its base by hub id: the store's model of that name (and shape) is its base;
    with none there, one line asks for --base and nothing is written."""
    import shutil

    folder = tmp_path / "hub-adapter"
    shutil.copytree(pair.peft, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "someorg/lorabase"}))
    env = {**ENV, "MALHAE_HOME": str(home)}
    line = one_error_line(malhae("convert", folder, "-o", tmp_path / "a.gguf", env=env))
    assert "someorg/lorabase" in line and "--base" in line and not (tmp_path / "a.gguf").exists()
    assert malhae("models", "import", pair.base, "--name", "lorabase-f32", env=env).returncode == 0
    proc = malhae("convert", folder, "--add", "--type", "f32", env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert greedy("lorabase-f32", "--lora", "hub-adapter", env=env) == greedy(pair.base, "--lora", pair.adapter)


def test_verify_an_adapter_against_peft(pair, tmp_path):
    """convert ADAPTER --verify: the written adapter on its base GGUF through llama.cpp against PEFT on the
    checkpoint; on a base of other weights (same shapes) it fails with exit 1; without a checkpoint to run PEFT on,
    one line before anything is written."""
    import factory

    from malhae.convert import pipeline

    ok = malhae("convert", pair.peft, "--base", pair.base, "-t", "f32", "-o", tmp_path / "a.gguf", "--verify")
    assert ok.returncode == 0 and "PASS" in ok.stdout.decode() + ok.stderr.decode(), ok.stderr.decode()
    staged = malhae("convert", pair.peft, "--base", pair.checkpoint, "-o", tmp_path / "b.gguf", "--verify")
    assert staged.returncode == 0 and "PASS" in staged.stdout.decode() + staged.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]  # the temporary F16 base is gone

    other_src = factory.build(tmp_path / "other", factory.Spec("lorabase", seed=7))
    other = pipeline.convert(other_src, "f32", tmp_path / "other-f32.gguf").path
    wrong = malhae("convert", pair.peft, "--base", other, "-t", "f32", "-o", tmp_path / "c.gguf", "--verify")
    assert wrong.returncode == 1 and "verification failed" in wrong.stderr.decode()

    hub = tmp_path / "hub"
    hub.mkdir()
    for f in pair.peft.iterdir():
        (hub / f.name).write_bytes(f.read_bytes())
    config = json.loads((hub / "adapter_config.json").read_text())
    (hub / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/lorabase"}))
    line = one_error_line(malhae("convert", hub, "--base", pair.base, "-o", tmp_path / "d.gguf", "--verify"))
    assert "--base FOLDER" in line and not (tmp_path / "d.gguf").exists()
