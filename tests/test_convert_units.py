"""The converter's numeric pieces against independent references, and the metadata it writes."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from conftest import SPECS

from malhae.convert import pipeline, tensors
from malhae.convert.config import read_config


def test_qkv_reorder_against_explicit_loop():
    n_head, head_dim, cols = 3, 4, 2
    hf = np.arange(3 * n_head * head_dim * cols, dtype=np.float32).reshape(3 * n_head * head_dim, cols)
    expected = []
    for part in range(3):  # q, then k, then v ...
        for head in range(n_head):  # ... each with all heads in order
            start = (head * 3 + part) * head_dim  # HF keeps (head, part, dim)
            expected.extend(hf[start:start + head_dim])
    assert np.array_equal(tensors.reorder_qkv(hf, n_head), np.array(expected))
    bias = hf[:, 0].copy()
    assert np.array_equal(tensors.reorder_qkv(bias, n_head), np.array(expected)[:, 0])


def test_q8_0_is_byte_identical_to_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[3, :32] = 0  # an all-zero block
    x[5, 7] = 1e-8
    x[7, :32] = np.linspace(-1, 1, 32) * 127 / 2  # many exact halves after scaling
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)  # gguf-py's numpy port of ggml's reference
    assert np.array_equal(tensors.convert("F32", x, gguf.GGMLQuantizationType.Q8_0), ref)
    half = x.astype(np.float16)
    assert np.array_equal(tensors.convert("F16", half, gguf.GGMLQuantizationType.Q8_0),
                          gguf.quants.quantize(half.astype(np.float32), gguf.GGMLQuantizationType.Q8_0))


def test_bf16_rounding_matches_torch():
    x = torch.randn(4096) * 100
    x[:4] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(tensors.f32_to_bf16(x.numpy()), want)
    assert np.array_equal(tensors.bf16_to_f32(want), x.to(torch.bfloat16).float().numpy())


def test_both_config_schemas_read_the_same(checkpoints):
    tf4 = read_config(checkpoints("tf4-st-f16"))
    tf5 = read_config(checkpoints("tf5-bin-f32-digits"))
    assert (tf4.rotary_fraction, tf4.rope_theta, tf4.parallel_residual) == (0.5, 10000.0, True)
    assert (tf5.rotary_fraction, tf5.rope_theta) == (0.25, 10000.0)
    assert tf5.n_rot == int(0.25 * 128 / 4)


def _fields(path):
    reader = gguf.GGUFReader(path)

    def value(key):
        field = reader.fields[key]
        if field.types[0] == gguf.GGUFValueType.STRING:
            return bytes(field.parts[-1]).decode()
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            return [field.parts[i] for i in field.data]
        return field.parts[-1][0].item()

    return reader, value


def test_metadata(checkpoints, tmp_path):
    name = "tf5-bin-f32-digits"
    spec = SPECS[name]
    out = pipeline.convert(checkpoints(name), "q8_0", tmp_path / "m.gguf").path
    _, v = _fields(out)
    assert v("general.architecture") == "gptneox"
    assert v("general.name") == name
    assert v("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert v("general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert v("malhae.source") == checkpoints(name).resolve().name  # the folder's name, never the full local path
    assert str(checkpoints(name).resolve()).encode() not in out.read_bytes()
    assert v("gptneox.context_length") == spec.ctx
    assert v("gptneox.embedding_length") == spec.hidden
    assert v("gptneox.block_count") == spec.layers
    assert v("gptneox.feed_forward_length") == spec.ff
    assert v("gptneox.attention.head_count") == spec.heads
    assert v("gptneox.rope.dimension_count") == int(spec.rotary_pct * spec.hidden / spec.heads)
    assert v("gptneox.use_parallel_residual") is True
    assert v("gptneox.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert v("tokenizer.ggml.model") == "gpt2"
    assert v("tokenizer.ggml.pre") == "starcoder"
    tokenizer = json.loads((checkpoints(name) / "tokenizer.json").read_text())
    eot = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<|endoftext|>")
    assert v("tokenizer.ggml.bos_token_id") == eot and v("tokenizer.ggml.eos_token_id") == eot
    assert v("tokenizer.ggml.add_bos_token") is False

    tokens = [bytes(t).decode() for t in v("tokenizer.ggml.tokens")]
    types = [int(t[0]) for t in v("tokenizer.ggml.token_type")]
    assert len(tokens) == len(types) == spec.vocab_rows  # exactly the embedding rows, not the tokenizer's 1000
    n_real = len(tokenizer["model"]["vocab"])
    assert all(types[i] == gguf.TokenType.UNUSED for i in range(n_real, spec.vocab_rows))
    assert types[eot] == gguf.TokenType.CONTROL
    assert len(set(tokens)) == len(tokens)


def test_license_and_hub_id_from_hub_cache_layout(checkpoints, tmp_path):
    snapshot = tmp_path / "hub" / "models--EleutherAI--polyglot-ko-1.3b" / "snapshots" / "abc123"
    shutil.copytree(checkpoints("tf4-st-f16"), snapshot)
    out = pipeline.convert(snapshot, "f16", tmp_path / "m.gguf").path
    _, v = _fields(out)
    assert v("general.name") == "polyglot-ko-1.3b"
    assert v("general.license") == "apache-2.0"
    assert v("general.source.url") == "https://huggingface.co/EleutherAI/polyglot-ko-1.3b"
    assert pipeline.default_output(snapshot, "q4_k_m").name == "polyglot-ko-1.3b-q4_k_m.gguf"


def test_license_from_model_card(checkpoints, tmp_path):
    src = tmp_path / "my-finetune"
    shutil.copytree(checkpoints("tf4-st-f16"), src)
    (src / "README.md").write_text("---\nlanguage: ko\nlicense: cc-by-nc-4.0\n---\n# card\n")
    _, v = _fields(pipeline.convert(src, "f16", tmp_path / "m.gguf").path)
    assert v("general.license") == "cc-by-nc-4.0"


def test_name_option(checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = pipeline.convert(checkpoints("tf4-st-f16"), "f16", name="내-모델-v2")
    assert result.path == tmp_path / "내-모델-v2-f16.gguf"
    _, v = _fields(result.path)
    assert v("general.name") == "내-모델-v2"
