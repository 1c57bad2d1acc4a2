"""The converted GGUF computes what transformers computes and tokenizes what `tokenizers` tokenizes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SPECS
from tokenizers import Tokenizer

from malhae.convert import parity, pipeline, verify
from malhae.runtime.llama import Model


def _prompt_tokens(src):
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    prompts = verify.default_prompts()
    return prompts, [tok.encode(p, add_special_tokens=False).ids for p in prompts]


@pytest.mark.parametrize("name", list(SPECS))
def test_f32_logits_match_transformers(name, checkpoints, tmp_path):
    src = checkpoints(name)
    out = pipeline.convert(src, "f32", tmp_path / "m.gguf").path
    prompts, tokens = _prompt_tokens(src)
    ref = verify.hf_logits(src, tokens)
    got = verify.gguf_logits(out, tokens)
    for r, g in zip(ref, got, strict=True):
        assert g.shape == r.shape  # exactly n_vocab (embedding rows) logits per position
        scale = max(1.0, float(np.abs(r).max()))
        assert float(np.abs(r - g).max()) <= 1e-3 * scale
        assert (r.argmax(-1) == g.argmax(-1)).all()


@pytest.mark.parametrize("name", list(SPECS))
def test_f16_top1_matches_transformers(name, checkpoints, tmp_path):
    src = checkpoints(name)
    out = pipeline.convert(src, "f16", tmp_path / "m.gguf").path
    prompts, tokens = _prompt_tokens(src)
    report = verify.compare("f16", prompts, tokens, verify.hf_logits(src, tokens), verify.gguf_logits(out, tokens))
    assert report.passed, report.rows
    # near-ties excused by the criterion must stay rare; the bulk must agree outright
    assert sum(r.top1_agree for r in report.rows) >= 0.97 * report.positions


def test_qkv_order_matters(checkpoints, tmp_path, monkeypatch):
    """Without the QKV reorder the file still loads and runs: only the logit comparison can catch it."""
    from malhae.convert import tensors

    src = checkpoints("tf4-st-f16")
    monkeypatch.setattr(tensors, "reorder_qkv", lambda data, n_head: data)
    out = pipeline.convert(src, "f32", tmp_path / "wrong.gguf").path
    prompts, tokens = _prompt_tokens(src)
    report = verify.compare("f32", prompts, tokens, verify.hf_logits(src, tokens), verify.gguf_logits(out, tokens))
    assert report.passed is False


@pytest.mark.parametrize("name", list(SPECS))
def test_token_ids_identical(name, checkpoints, tmp_path):
    src = checkpoints(name)
    out = pipeline.convert(src, "f16", tmp_path / "m.gguf").path
    reference = Tokenizer.from_file(str(src / "tokenizer.json"))
    specials = ["<|endoftext|>", "<|sep|>", "<|acc|>", "<|rrn|>", "<|tell|>"]
    texts = parity.sample_texts(specials) + [
        "제1조 ① 대한민국은 민주공화국이다.", "ㅋㅋㅋ ㅎㅎ ㄱㄴㄷ", "大韓民國", "👍🏽🇰🇷",
        "2024년 12월 31일 010-0000-0000",
        "mixed 한국어 and English", "  \t  여러  공백  \n\n\n줄바꿈 ", "<|sep|>질문<|endoftext|>", "",
    ]
    with Model(out, vocab_only=True) as model:
        for text in texts:
            assert model.tokenize(text) == reference.encode(text, add_special_tokens=False).ids, text
        # the special tokens are single tokens on both sides
        for s in specials:
            assert model.tokenize(s) == [reference.token_to_id(s)]


def test_wrong_pre_tokenizer_is_refused(checkpoints, tmp_path):
    """A digits-splitting tokenizer written with the plain GPT-2 pre-tokenizer must fail the parity proof."""
    from malhae.convert import gguf_out
    from malhae.convert.config import read_config
    from malhae.convert.vocab import read_vocab

    src = checkpoints("tf5-bin-f32-digits")
    cfg = read_config(src)
    vocab = read_vocab(src, cfg.n_vocab, {})
    assert vocab.pre == "starcoder"
    vocab.pre = "gpt-2"
    path = tmp_path / "vocab.gguf"
    gguf_out.write_vocab_only(path, cfg, vocab, gguf_out.Metadata("x", "x", None, None))
    with pytest.raises(parity.ParityError, match="splits '.*' differently"):
        parity.check(src / "tokenizer.json", path, vocab.specials, vocab.pre)
