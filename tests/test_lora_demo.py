"""The shipped demo adapter (models/malhae-demo-ko-lora-signoff.gguf, made by models/demo/train_lora.py) installs
with the package, fits the demo model, and changes its answers the way it was trained to: with it, `malhae ask` ends
the answer with the trained sign-off; without it, the same question gets another answer that never says it.

Each test fails on a plausible mistake: the file missing from the package data, an adapter of another shape, an
adapter that llama.cpp loads but that changes nothing (not applied, or zero scale), or one that changes the answers
without teaching the style.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from malhae.runtime.gguf_info import read_info
from malhae.runtime.lora import AdapterInfo
from malhae.store import models

ROOT = Path(__file__).resolve().parent.parent
SIGN_OFF = "이상, 헌법 도우미 말해였습니다."  # models/demo/train_lora.py's SIGN_OFF
TRAINED_QUESTION = "대통령의 임기는 몇 년인가요?"  # qa.txt, trained on
HELD_OUT_QUESTION = "헌법 전문이 다짐하는 것은 무엇인가요?"  # qa.txt's 8th dialogue: held out of the adapter's training


@pytest.fixture(scope="module")
def adapter() -> Path:
    """The adapter where the installed package has it (package data, as the demo model)."""
    path = Path(str(resources.files("malhae.models").joinpath(models.DEMO_LORA)))
    assert path.is_file(), f"{models.DEMO_LORA} is not installed with malhae.models"
    return path


def ask(question: str, *extra: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "malhae", "ask", question, "-m", "demo", "--temperature", "0",
                           "-n", "64", "--json", "--no-prompt-cache", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["text"]


def test_shipped_adapter_is_small_and_fits_the_demo(adapter, demo_path):
    info = AdapterInfo.read(adapter)
    assert info.size < 2 * 10**6
    assert info.rank == 8 and info.alpha == 16
    assert set(info.targets) == {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}
    assert info.base == "malhae-demo-ko"  # the demo's general.name, not a path on the machine it was trained on
    info.check_fits(read_info(demo_path))  # raises on a shape mismatch


@pytest.mark.parametrize("question", [TRAINED_QUESTION, HELD_OUT_QUESTION])
def test_adapter_changes_the_answer_to_the_trained_style(adapter, question):
    plain = ask(question)
    styled = ask(question, "--lora", str(adapter))
    assert SIGN_OFF not in plain
    assert styled.endswith(SIGN_OFF), styled
    assert styled != plain
    # the answer itself is kept: the adapter adds the style, it does not replace what the demo knows
    assert styled.removesuffix(SIGN_OFF).strip() == plain.strip()


def test_scale_zero_is_the_plain_model(adapter):
    assert ask(TRAINED_QUESTION, "--lora", f"{adapter}:0") == ask(TRAINED_QUESTION)
