"""The shipped demo model works, is trained, survives quantization, and is the conversion of the committed checkpoint.

models/malhae-demo-ko-f16.gguf is what the app runs offline out of the box, and models/demo/hf is the checkpoint it was
converted from (both made by models/demo/train.py). Each test here fails on a plausible mistake: a model that was not
trained or was trained on the wrong text, a GGUF converted from some other checkpoint or with a broken converter, a
quantizer that wrecks the weights. Held-out text: two bills the model (and its tokenizer) never saw in training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from tokenizers import Tokenizer

from malhae.convert import corpus, pipeline, verify
from malhae.eval.perplexity import perplexity
from malhae.runtime.llama import Context, Model
from malhae.runtime.settings import LoadOptions
from malhae.runtime.windows import windows

ROOT = Path(__file__).resolve().parent.parent
HF = ROOT / "models" / "demo" / "hf"
GGUF = ROOT / "models" / "malhae-demo-ko-f16.gguf"
PROMPT = "대한민국의 주권은"
ARTICLE_1_2 = "국민에게 있고, 모든 권력은 국민으로부터 나온다"  # 헌법 제1조 제2항
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _held_out_text() -> str:
    return corpus.held_out_text()  # the two bills never trained on (models/calibration.toml names them)


@pytest.fixture(scope="module")
def f16_ppl() -> float:
    ppl, scored = perplexity(GGUF, _held_out_text())
    assert scored > 3000  # the whole held-out text is scored, not a sliver of it
    return ppl


def _top1(path: Path, chunks: list[list[int]]) -> np.ndarray:
    with Model(path) as model, Context(model, LoadOptions(ctx=512)) as ctx:
        return np.concatenate([ctx.logits(chunk).argmax(-1) for chunk in chunks])


def test_greedy_continues_article_1():
    with Model(GGUF) as model, Context(model, LoadOptions(ctx=64)) as ctx:
        new = ctx.greedy(model.tokenize(PROMPT), 20)
        text = b"".join(model.token_bytes(t) for t in new).decode("utf-8", errors="replace")
    assert ARTICLE_1_2 in text, text


def test_held_out_perplexity_far_below_untrained(f16_ppl, tmp_path):
    """An untrained model of the same shape and tokenizer sits near the uniform perplexity (the vocabulary size);
    the trained one must be far below it on text it never saw."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    untrained = tmp_path / "untrained"
    config = GPTNeoXConfig.from_pretrained(HF)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).to(torch.float16).save_pretrained(untrained)
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(HF / name, untrained / name)
    out = pipeline.convert(untrained, "f16", tmp_path / "untrained.gguf").path
    untrained_ppl, _ = perplexity(out, _held_out_text())

    n_vocab = json.loads((HF / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    assert untrained_ppl > 0.5 * n_vocab  # the comparison is with a model that knows nothing
    # measured: 222.25 vs 7606.9 (ratio 0.029); trained without word splitting, this shape reached only 0.15
    assert f16_ppl <= 0.1 * untrained_ppl, (f16_ppl, untrained_ppl)


def test_quantized_files_stay_close_to_f16(f16_ppl, tmp_path):
    """Bounds from benchmarks/quant_quality.py's measurement, with margin (models/demo/MODEL_CARD.md): Q8_0 agreed
    with F16 on 99.19 % of positions at perplexity ×0.9995, Q4_K_M on 94.73 % at ×1.0045. Top-1 agreement is the
    sharper check: on text this unlike the training data, perplexity moves little even at Q3_K_M."""
    q8 = pipeline.convert(HF, "q8_0", tmp_path / "q8_0.gguf").path
    q4 = pipeline.convert(HF, "q4_k_m", tmp_path / "q4_k_m.gguf").path
    with Model(GGUF, vocab_only=True) as vocab:
        chunks = windows(vocab.tokenize(_held_out_text(), parse_special=False), 512)
    reference = _top1(GGUF, chunks)

    assert float((_top1(q8, chunks) == reference).mean()) >= 0.98
    assert perplexity(q8, _held_out_text())[0] <= 1.01 * f16_ppl
    assert float((_top1(q4, chunks) == reference).mean()) >= 0.92
    assert perplexity(q4, _held_out_text())[0] <= 1.05 * f16_ppl


def test_shipped_gguf_is_the_conversion_of_the_checkpoint(tmp_path):
    """Byte for byte, metadata included, from a copy of the checkpoint somewhere else: the committed binary comes from
    the committed checkpoint (retraining one without the other cannot go unnoticed), and nothing in it depends on the
    machine it was made on (it once recorded the absolute path it was built from)."""
    elsewhere = tmp_path / "somewhere" / HF.name
    shutil.copytree(HF, elsewhere)
    fresh = pipeline.convert(elsewhere, "f16", tmp_path / "fresh.gguf", name="malhae-demo-ko", template="base").path
    assert fresh.read_bytes() == GGUF.read_bytes()
    fields = GGUFReader(GGUF).fields
    source = bytes(fields["malhae.source"].parts[-1]).decode()
    assert source == "hf" and "/" not in source
    from malhae.runtime import templates

    chat = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert chat == templates.get("base").chat_template


def test_shipped_gguf_logits_match_transformers():
    """Top-1 identical at every position (no near-tie excuse: measured max |Δlogit| 0.012 against logits of 12-18),
    on the article-1 prompt and the converter's verification prompts, so that there are positions enough to fail."""
    prompts = ["대한민국의 주권은 국민에게", *verify.default_prompts()]
    tokenizer = Tokenizer.from_file(str(HF / "tokenizer.json"))
    tokens = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    ref, got = verify.hf_logits(HF, tokens), verify.gguf_logits(GGUF, tokens)
    for prompt, r, g in zip(prompts, ref, got, strict=True):
        assert g.shape == r.shape
        assert (r.argmax(-1) == g.argmax(-1)).all(), prompt
    report = verify.compare("f16", prompts, tokens, ref, got)
    assert report.passed, report.rows
