"""`malhae complete` / `ask` / `bench` as a user runs them: pipes, JSON, and every mistake in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_error_line

from app.runtime import templates
from convert import pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_path(k_quant_checkpoint, tmp_path_factory) -> Path:
    return pipeline.convert(k_quant_checkpoint, "q8_0", tmp_path_factory.mktemp("cli") / "m.gguf").path


def malhae(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], input=stdin, capture_output=True, cwd=ROOT,
                          timeout=120)


def test_complete_from_a_pipe_is_plain_text(model_path):
    proc = malhae("complete", "-m", str(model_path), "-n", "12", "--temperature", "0",
                  stdin="대한민국의 주권은\n".encode())
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert out.strip() and "\x1b[" not in out  # no colours when stdout is not a terminal
    assert "llama_model_load" not in proc.stderr.decode() and "load_tensors" not in proc.stderr.decode()
    verbose = malhae("--verbose", "complete", "x", "-m", str(model_path), "-n", "2")
    assert "load_tensors" in verbose.stderr.decode()  # llama.cpp's own log only when asked for
    same = malhae("complete", "-", "-m", str(model_path), "-n", "12", "--temperature", "0",
                  stdin="대한민국의 주권은".encode())
    assert same.stdout == proc.stdout  # trailing newline of piped input is not part of the prompt


def test_json_output(model_path):
    proc = malhae("ask", "헌법 제1조는?", "-m", str(model_path), "-n", "8", "--json", "--seed", "1")
    assert proc.returncode == 0, proc.stderr.decode()
    data = json.loads(proc.stdout)
    assert data["kind"] == "ask" and data["template"] == "base" and isinstance(data["text"], str)
    stats = data["stats"]
    assert stats["generated_tokens"] <= 8 and stats["prompt_tokens"] > 10 and stats["decode_tps"] >= 0
    assert {"ttft", "prompt_tps", "stop_reason"} <= set(stats)


def test_json_of_a_run_that_generates_nothing():
    """The demo model ends this sentence at once (its first token is end-of-text): 0 tokens, and a decode speed of
    0, not the negative -1/seconds it once reported."""
    from app.store import models

    demo = models.demo_model()
    if demo is None:
        pytest.skip("the bundled demo model is not built")
    proc = malhae("complete", "대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.", "-m", str(demo),
                  "--temperature", "0", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    stats = json.loads(proc.stdout)["stats"]
    assert stats["generated_tokens"] == 0 and stats["stop_reason"] == "eos"
    assert stats["decode_tps"] == 0 and stats["prompt_tps"] > 0


def test_invalid_utf8_stdin(model_path):
    err = one_error_line(malhae("complete", "-m", str(model_path), stdin="대한민국".encode("cp949")))
    assert "not valid UTF-8" in err and "iconv" in err


def test_missing_and_wrong_model_files(tmp_path):
    assert "does not exist" in one_error_line(malhae("complete", "x", "-m", str(tmp_path / "none.gguf")))
    (tmp_path / "notes.gguf").write_text("not a model")
    assert "not a GGUF file" in one_error_line(malhae("complete", "x", "-m", str(tmp_path / "notes.gguf")))
    assert "is a directory" in one_error_line(malhae("complete", "x", "-m", str(tmp_path)))


def test_empty_prompts_and_usage_mistakes_are_one_line(model_path):
    for kind, what in (("ask", "the question is empty"), ("complete", "the prompt is empty")):
        for empty in ("", "  \n"):
            proc = malhae(kind, empty, "-m", str(model_path))
            assert what in one_error_line(proc) and "loading" not in proc.stderr.decode()
    for args in (["ask", "x", "--bogus"], ["eval", "ppl"], ["nosuch"]):  # click's own usage block, as one line
        proc = malhae(*args)
        err = proc.stderr.decode()
        assert one_error_line(proc) and err.startswith("malhae: error:") and err.count("\n") == 1, err
        assert "-h`" in err


def test_prompt_longer_than_context(model_path):
    err = one_error_line(malhae("complete", "대한민국 헌법 " * 50, "-m", str(model_path), "--ctx", "32"))
    assert "more than the context of 32" in err and "--ctx" in err


def test_bad_option_values(model_path):
    err = one_error_line(malhae("complete", "x", "-m", str(model_path), "--gpu-layers", "many"))
    assert "--gpu-layers" in err
    err = one_error_line(malhae("ask", "x", "-m", str(model_path), "--template", "chatml"))
    assert "unknown template 'chatml'" in err


def test_no_prompt_on_a_terminal_is_explained(model_path):
    code = ("import sys, io; sys.stdin.isatty = lambda: True; from app.cli import main; "
            f"sys.exit(main(['complete', '-m', {str(model_path)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT)
    assert "give the prompt as an argument, or pipe it in" in one_error_line(proc)


def test_templates_follow_the_model_name():
    assert templates.for_model("KoAlpaca-Polyglot-12.8B").name == "koalpaca"
    assert templates.for_model("kullm-polyglot-5.8b-v2").name == "kullm"
    assert templates.for_model("polyglot-ko-1.3b").name == "base"
    prompt = templates.get("kullm").prompt([("user", "요약해 주세요")])
    assert prompt.endswith("### 명령어:\n요약해 주세요\n\n### 응답:\n") and prompt.startswith("아래는 작업을")


def test_bench_runs_the_engine(model_path):
    proc = malhae("bench", str(model_path), "-p", "32", "-n", "16", "-r", "1", "--json", "--gpu-layers", "0")
    assert proc.returncode == 0, proc.stderr.decode()
    data = json.loads(proc.stdout)
    assert data["prompt_tps"] > 0 and data["decode_tps"] > 0 and data["upstream_decode_tps"] is None
