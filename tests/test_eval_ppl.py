"""`malhae eval ppl`: the batched, several-windows-per-decode perplexity equals computations that share none of its
code — token-by-token evaluation through llama.cpp and transformers on the demo checkpoint — and llama-perplexity's
own number where that binary is built (CI does not build it; the independent computations are the CI proof).

Each equality can fail: a wrong scored range (the first half, an off-by-one in the target), sequences mixed up in a
multi-window batch, a lost partial group, a window split over decodes that drops logits, a different tokenization.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from malhae.cli import main
from malhae.eval import perplexity, upstream
from malhae.runtime import windows as win
from malhae.runtime.llama import Context, Model
from malhae.runtime.settings import LoadOptions
from malhae.runtime.windows import Layout

ROOT = Path(__file__).resolve().parent.parent
GGUF = ROOT / "models" / "malhae-demo-ko-f16.gguf"
HF = ROOT / "models" / "demo" / "hf"
BILLS = ROOT / "models" / "data" / "ko-public-domain" / "bills"
HELD_OUT = ("1809898.txt", "1809899.txt")  # never trained on (models/demo/MODEL_CARD.md)


def _held_out() -> str:
    return "\n".join((BILLS / name).read_text(encoding="utf-8") for name in HELD_OUT)


@pytest.fixture(scope="module")
def model():
    with Model(GGUF) as m:
        yield m


@pytest.fixture(scope="module")
def short_text(model) -> str:
    """About 6.6 windows of 64 tokens: two decode groups of four windows at --batch 256, the second one partial."""
    text = _held_out()[:900]
    n = len(model.tokenize(text, parse_special=False))
    assert 6 * 64 < n < 8 * 64, n
    return text


def _nll(logits: np.ndarray, targets: list[int]) -> np.ndarray:
    """Independent of app.eval.perplexity: log-softmax in float64 from scratch."""
    x = logits.astype(np.float64)
    m = x.max(axis=1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def _reference_nll(windows: list[list[int]], logits_of) -> np.ndarray:
    """NLL of positions n/2+1 … n-1 of each window, predicted from the position before: llama-perplexity's range."""
    out = []
    for w in windows:
        n = len(w)
        out.append(_nll(logits_of(w)[n // 2:n - 1], w[n // 2 + 1:]))
    return np.concatenate(out)


def _windows(tokens: list[int], n: int) -> list[list[int]]:
    return [tokens[i * n:(i + 1) * n] for i in range(len(tokens) // n)]


@pytest.mark.parametrize("n_batch", [256, 64, 16])  # 4 windows per decode, 1, a window in 4 decodes
def test_batched_equals_token_by_token(model, short_text, n_batch):
    n_ctx = 64
    result = perplexity.evaluate(model, short_text, Layout.of(n_ctx, n_batch))
    tokens = model.tokenize(short_text, parse_special=False)
    windows = _windows(tokens, n_ctx)
    with Context(model, LoadOptions(ctx=n_ctx, batch=1)) as one:  # one token per llama_decode, one window at a time
        nll = _reference_nll(windows, one.logits)
    expected = float(np.exp(nll.mean()))
    assert result.windows == len(windows) == 6
    assert result.tokens_scored == nll.size == 6 * 31
    assert result.n_seq == max(1, n_batch // n_ctx)
    assert result.ppl == pytest.approx(expected, rel=1e-4)
    # the ± llama-perplexity prints: sqrt(var(NLL) / (N-1)) carried through exp
    assert result.error == pytest.approx(expected * np.sqrt(nll.var() / (nll.size - 1)), rel=1e-3)


def test_every_window_matches_token_by_token(model, short_text):
    """Window by window, not only the mean: a mix-up of sequences within a batch would average out less than this."""
    layout = Layout.of(64, 256)
    tokens = model.tokenize(short_text, parse_special=False)
    windows = _windows(tokens, 64)
    with win.context_for(model, layout, None) as ctx, Context(model, LoadOptions(ctx=64, batch=1)) as one:
        got = list(win.scored_logits(ctx, windows, layout))
        assert len(got) == len(windows)
        for w, (logits, targets) in zip(windows, got, strict=True):
            ref = one.logits(w)[32:63]
            assert targets.tolist() == w[33:]
            assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()
            assert (logits.argmax(-1) == ref.argmax(-1)).mean() > 0.95


def test_equals_transformers_on_the_same_windows(model):
    """The demo checkpoint in float32 through transformers, tokenized by its own tokenizer.json: same tokens, and
    the perplexity of the same positions within 0.1 % (measured logit differences are ~1e-2 on logits of 12-18)."""
    import torch
    from transformers import GPTNeoXForCausalLM

    text = _held_out()[:3000]
    hf_tokens = Tokenizer.from_file(str(HF / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert model.tokenize(text, add_special=True, parse_special=False) == hf_tokens
    windows = _windows(hf_tokens, 128)
    hf = GPTNeoXForCausalLM.from_pretrained(HF, dtype=torch.float32).eval()
    with torch.no_grad():
        nll = _reference_nll(windows, lambda w: hf(torch.tensor([w])).logits[0].numpy())
    result = perplexity.evaluate(model, text, Layout.of(128, 512))
    assert result.tokens_scored == nll.size
    assert result.ppl == pytest.approx(float(np.exp(nll.mean())), rel=1e-3)


@pytest.mark.parametrize(("n_ctx", "n_batch", "expected"), [
    (512, 2048, (512, 2048, 4)),  # llama-perplexity's defaults: four windows per decode
    (512, 512, (512, 512, 1)),
    (512, 100, (512, 100, 1)),  # a window over six decodes
    (1000, 2048, (1000, 2000, 2)),  # batch rounded down to whole windows, as main() does
    (1000, 1500, (1000, 1000, 1)),
])
def test_layout_follows_llama_perplexity(n_ctx, n_batch, expected):
    layout = Layout.of(n_ctx, n_batch)
    assert (layout.n_ctx, layout.n_batch, layout.n_seq) == expected
    assert layout.first == n_ctx // 2


def test_reads_the_file_as_llama_perplexity_does(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes("가나\r\n다\n\n".encode())
    assert win.read_text(f) == "가나\r\n다\n"  # one trailing newline removed, nothing translated


@pytest.mark.skipif(upstream.llama_perplexity_exe() is None,
                    reason="llama-perplexity not built (python benchmarks/build_llama_tools.py)")
@pytest.mark.parametrize(("n_ctx", "n_batch"), [(512, 2048), (256, 128)])
def test_same_number_as_llama_perplexity(tmp_path, n_ctx, n_batch):
    text = tmp_path / "held-out.txt"
    text.write_text(_held_out() + "\n", encoding="utf-8")
    theirs, theirs_err = upstream.run_llama_perplexity(upstream.llama_perplexity_exe(), GGUF, text,
                                                         Layout.of(n_ctx, n_batch))
    mine = perplexity.run(LoadOptions(model=GGUF, gpu_layers="0"), text, Layout.of(n_ctx, n_batch))
    assert mine.ppl == pytest.approx(theirs, rel=1e-4)  # the issue asks for 0.5 %; measured: 2e-7
    assert mine.error == pytest.approx(theirs_err, rel=1e-3)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["eval", "ppl", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_json_is_the_library_result(capsys, tmp_path, short_text):
    text = tmp_path / "t.txt"
    text.write_text(short_text, encoding="utf-8")
    code, out, _ = _cli(capsys, str(GGUF), "--text", str(text), "--ctx", "64", "--batch", "256", "--json")
    assert code == 0
    data = json.loads(out)
    with Model(GGUF) as m:
        expected = perplexity.evaluate(m, short_text, Layout.of(64, 256))
    assert data["ppl"] == pytest.approx(expected.ppl, rel=1e-9)
    assert (data["windows"], data["n_ctx"], data["n_seq"], data["tokens_scored"]) == (6, 64, 4, 6 * 31)
    assert data["error"] > 0 and data["tokens_per_second"] > 0


def test_cli_prints_perplexity_and_error(capsys, tmp_path, short_text):
    text = tmp_path / "t.txt"
    text.write_text(short_text, encoding="utf-8")
    code, out, _ = _cli(capsys, str(GGUF), "--text", str(text), "--ctx", "64")
    assert code == 0
    assert re.search(r"perplexity \d+\.\d{4} ± \d+\.\d{4}", out), out
    assert "186 tokens scored in 6 windows of 64" in out


@pytest.mark.parametrize(("setup", "args", "message"), [
    (None, ["--text", "{tmp}/missing.txt"], "does not exist"),
    ("cp949", ["--text", "{tmp}/t.txt"], "iconv -f cp949"),
    ("short", ["--text", "{tmp}/t.txt"], "shorter than one window of 512"),
    ("short", ["--text", "{tmp}/t.txt", "--ctx", "2"], "--ctx 2 is too small"),
    ("short", ["--text", "{tmp}/t.txt", "--batch", "0"], "--batch 0"),
    ("short", ["--text", "{tmp}/t.txt", "--gpu-layers", "many"], "--gpu-layers 'many'"),
    ("short", ["--text", "{tmp}"], "is a directory"),
])
def test_mistakes_are_one_line_errors(capsys, tmp_path, setup, args, message):
    if setup == "cp949":
        (tmp_path / "t.txt").write_bytes("대한민국".encode("cp949"))
    elif setup == "short":
        (tmp_path / "t.txt").write_text("대한민국의 주권은 국민에게 있다.", encoding="utf-8")
    code, out, err = _cli(capsys, str(GGUF), *[a.format(tmp=tmp_path) for a in args])
    assert code == 2
    assert message in err
    assert "Traceback" not in err and out == ""
    assert len(err.strip().splitlines()) == 1


def test_context_beyond_training_warns_and_runs(capsys, tmp_path):
    """Allowed, as llama-perplexity allows it, with its warning (the demo model was trained on 1,024 tokens)."""
    text = tmp_path / "t.txt"
    text.write_text(_held_out()[:2000], encoding="utf-8")  # 1,128 tokens
    code, out, err = _cli(capsys, str(GGUF), "--text", str(text), "--ctx", "1100", "--json")
    assert code == 0
    assert "longer than the 1024 tokens" in err
    assert json.loads(out)["windows"] == 1
