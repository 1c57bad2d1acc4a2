"""Shared fixtures: polyglot-ko-shaped checkpoints built once per test session (see factory.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import factory  # noqa: E402

# The shapes the converter must handle; each differs from the published 1.3b in a way that matters.
SPECS = {
    # published layout: tf4 config keys, sharded fp16 safetensors, legacy buffers, plain ByteLevel
    "tf4-st-f16": factory.Spec("tf4-st-f16"),
    # sharded .bin pickles in fp32, transformers-5 config keys, Digits(individual)+ByteLevel, rotary 0.25
    "tf5-bin-f32-digits": factory.Spec("tf5-bin-f32-digits", hidden=128, pre="digits", weights="bin-sharded",
                                       dtype="f32", schema="tf5", rotary_pct=0.25),
    # head_dim 256 like polyglot-ko-5.8b, single bf16 safetensors, transformers-5 keys
    "hd256-st-bf16": factory.Spec("hd256-st-bf16", hidden=512, heads=2, ff=1024, weights="safetensors",
                                  dtype="bf16", schema="tf5"),
    # single pytorch_model.bin in fp16, sequential residual (use_parallel_residual=false)
    "bin-f16-seq": factory.Spec("bin-f16-seq", weights="bin", parallel_residual=False, layers=3),
}


@pytest.fixture(autouse=True)
def _own_malhae_home(tmp_path_factory, monkeypatch):
    """No test reads or writes the real ~/.config/malhae or ~/.local/share/malhae (settings, store, history)."""
    monkeypatch.setenv("MALHAE_HOME", str(tmp_path_factory.mktemp("malhae-home")))
    monkeypatch.delenv("MALHAE_CONFIG", raising=False)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A malhae home of the test's own, to look into (the store, the settings file)."""
    path = tmp_path / "home"
    monkeypatch.setenv("MALHAE_HOME", str(path))
    return path


@pytest.fixture(scope="session")
def demo_path() -> Path:
    """The bundled demo model, where this install finds it."""
    from malhae.store import models

    path = models.demo_model()
    assert path is not None
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name → directory, built on first use."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = factory.build(root / name, SPECS[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def endless_path(tmp_path_factory) -> Path:
    """A random Q8_0 model that never samples its end-of-text token (trained context 4096): an answer only ends where
    it is stopped, so streams run until a test's Ctrl-C, disconnect or max_tokens (a plain random model ends one at
    random, at thousands of tokens/s often first). Chat, serve and remote tests share it."""
    from malhae.convert import pipeline

    root = tmp_path_factory.mktemp("endless")
    src = factory.build(root / "ckpt", factory.Spec("endless", hidden=256, heads=4, ff=512, weights="safetensors",
                                                    never_eos=True, ctx=4096))
    return pipeline.convert(src, "q8_0", root / "m.gguf").path


@pytest.fixture(scope="session")
def k_quant_checkpoint(tmp_path_factory):
    """Rows of 256 so that k-quants apply for real instead of falling back to legacy types."""
    return factory.build(tmp_path_factory.mktemp("kq") / "kq", factory.Spec("kq", hidden=256, heads=4, ff=512,
                                                                             weights="safetensors"))


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need a GPU build of llama-cpp-python (CUDA, Metal, ROCm, Vulkan …) and a GPU it can use, as
    ggml lists them; CI has neither."""
    from malhae.runtime import devices

    if any(d.offloads for d in devices.listed()):
        return
    skip = pytest.mark.skip(reason="needs a GPU and a GPU build of llama-cpp-python")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
