"""`malhae complete` / `ask` / `bench` as a user runs them: pipes, JSON, and every mistake in one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_error_line

from malhae.convert import pipeline
from malhae.errors import UserError
from malhae.runtime import templates

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_path(k_quant_checkpoint, tmp_path_factory) -> Path:
    return pipeline.convert(k_quant_checkpoint, "q8_0", tmp_path_factory.mktemp("cli") / "m.gguf").path


def malhae(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """The command with `stdin` piped in, else /dev/null: `ask "…"` reads a piped standard input as a document, so
    it must not inherit whatever the test runner's is."""
    feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, cwd=ROOT, timeout=120, **feed)


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
    from malhae.store import models

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


# --- documents: piped input and --file before the question ------------------------------------------------------

A, B, Q = "대한민국은 민주공화국이다.", "모든 권력은 국민으로부터 나온다.", "이 조항의 뜻은"


def greedy(model: Path, kind: str, *args: str, stdin: bytes | None = None) -> dict:
    proc = malhae(kind, *args, "-m", str(model), "--temperature", "0", "-n", "8", "--json", stdin=stdin)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def same_run(a: dict, b: dict) -> bool:
    """Two greedy runs saw the same prompt: the same number of prompt tokens and the same continuation."""
    return a["text"] == b["text"] and a["stats"]["prompt_tokens"] == b["stats"]["prompt_tokens"]


@pytest.mark.parametrize("kind", ["complete", "ask"])
def test_piped_input_goes_before_the_question(model_path, kind):
    """`cat 계약서.txt | malhae ask "…"` is the document, a blank line, then the question (once, the pipe was
    ignored); a BOM and the trailing newlines of the piped text are not part of it."""
    piped = greedy(model_path, kind, Q, stdin=f"\ufeff{A}\n\n".encode())
    assert same_run(piped, greedy(model_path, kind, f"{A}\n\n{Q}"))
    assert not same_run(piped, greedy(model_path, kind, f"{Q}\n\n{A}"))  # the order shows in the output
    assert not same_run(piped, greedy(model_path, kind, Q))


def test_files_go_after_piped_input_in_their_order(model_path, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(A + "\n", encoding="utf-8")
    b.write_bytes(("\ufeff" + B + "\r\n").encode())
    both = greedy(model_path, "complete", Q, "--file", str(a), "--file", str(b), stdin="머리말".encode())
    assert same_run(both, greedy(model_path, "complete", f"머리말\n\n{A}\n\n{B}\n\n{Q}"))
    swapped = greedy(model_path, "complete", Q, "--file", str(b), "--file", str(a), stdin="머리말".encode())
    assert same_run(swapped, greedy(model_path, "complete", f"머리말\n\n{B}\n\n{A}\n\n{Q}"))
    assert not same_run(both, swapped)
    alone = greedy(model_path, "ask", "--file", str(a))  # no question: the document is the prompt
    assert same_run(alone, greedy(model_path, "ask", A))
    piped_question = greedy(model_path, "complete", "--file", str(a), stdin=Q.encode())  # no argument: stdin is it
    assert same_run(piped_question, greedy(model_path, "complete", f"{A}\n\n{Q}"))


def test_empty_piped_input_with_a_question_is_just_the_question(model_path):
    assert same_run(greedy(model_path, "complete", Q, stdin=b""), greedy(model_path, "complete", Q))
    assert same_run(greedy(model_path, "complete", Q, stdin=b"\n \n"), greedy(model_path, "complete", Q))
    err = one_error_line(malhae("ask", Q, "-m", str(model_path), stdin="헌법".encode("cp949")))
    assert "standard input is not valid UTF-8" in err and "offset 0" in err and "iconv -f cp949" in err
    err = one_error_line(malhae("ask", Q, "-m", str(model_path), stdin=b"\x7fELF\x02\x01\x00\x00"))
    assert "standard input is binary" in err and "offset 6" in err


def test_prompt_reading_rules(monkeypatch, tmp_path):
    """read_prompt's text, exactly, for each way a prompt can arrive (in-process, stdin replaced)."""
    import io

    from malhae.chat import oneshot

    class Stdin(io.TextIOWrapper):
        def isatty(self) -> bool:
            return self.tty

    def prompt(arg, piped: bytes | None, *paths, kind="ask"):
        stdin = Stdin(io.BytesIO(piped or b""), encoding="utf-8")
        stdin.tty = piped is None
        monkeypatch.setattr(sys, "stdin", stdin)
        return oneshot.read_prompt(arg, kind, paths)

    doc = tmp_path / "문서.txt"
    doc.write_text("본문\n", encoding="utf-8")
    assert prompt(Q, "위의 글\n".encode()).text == f"위의 글\n\n{Q}"
    assert [d.name for d in prompt(Q, b"x", doc).documents] == ["standard input", str(doc)]
    assert prompt(Q, b"x", doc).text == f"x\n\n본문\n\n{Q}"
    assert prompt(Q, None, doc, doc).text == f"본문\n\n본문\n\n{Q}"
    assert prompt(Q, b"").text == Q and prompt(Q, None).documents == ()
    assert prompt("-", "질문\n".encode(), doc).text == "본문\n\n질문"
    assert prompt(None, None, doc).text == "본문"
    with pytest.raises(UserError, match="standard input is empty"):
        prompt("-", b"", doc)
    with pytest.raises(UserError, match="give the prompt as an argument"):
        prompt(None, None)

    class Unreadable(io.TextIOBase):  # pytest's stand-in while it captures: not a tty, and read() raises
        def readable(self) -> bool:
            return False

        def read(self, size: int = -1) -> str:
            raise OSError("reading from stdin while output is captured")

    monkeypatch.setattr(sys, "stdin", Unreadable())
    assert oneshot.read_prompt(Q, "ask").text == Q  # `main(["ask", "…"])` in-process: no stdin to read


def test_unreadable_document(monkeypatch, tmp_path):
    """Permissions, even as root (who reads anything): the open itself is refused."""
    import errno
    import os

    from malhae.chat import documents

    doc = tmp_path / "비밀.txt"
    doc.write_text("x", encoding="utf-8")

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(UserError) as e:
        documents.read_document(doc)
    assert str(e.value).startswith(f"cannot read {doc}: permission denied") and "\n" not in str(e.value)


def _bad_documents(tmp_path: Path) -> list[tuple[Path, str]]:
    """(file, what its one error line must say) for every kind of document that cannot be used."""
    from malhae.chat.reader import MAX_INPUT

    (tmp_path / "폴더").mkdir()
    (tmp_path / "cp949.txt").write_bytes("대한민국 헌법".encode("cp949"))
    (tmp_path / "late.txt").write_bytes("앞부분은 괜찮다 ".encode() + "뒤".encode("cp949"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "utf16.txt").write_bytes("헌법".encode("utf-16"))
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"\xef\xbb\xbf\n\n")
    with open(tmp_path / "huge.txt", "wb") as f:
        f.truncate(MAX_INPUT + 1)  # sparse: its size is refused before a byte is read
    os.mkfifo(tmp_path / "fifo")
    late = len("앞부분은 괜찮다 ".encode())
    cases = [("missing.txt", "no such file"), ("폴더", "is a directory"),
             ("cp949.txt", "not valid UTF-8 (byte 0xb4 at offset 0)"),
             ("late.txt", f"at offset {late}"), ("image.png", "binary, not text (a NUL byte at offset 8)"),
             ("utf16.txt", "UTF-16"), ("empty.txt", "is empty"), ("blank.txt", "is empty"),
             ("huge.txt", "longer than 16 MB"), ("fifo", "named pipe (FIFO), not a regular file")]
    if os.geteuid() != 0:
        (tmp_path / "locked.txt").write_text("x")
        (tmp_path / "locked.txt").chmod(0)
        cases.append(("locked.txt", "permission denied"))
    return [(tmp_path / name, says) for name, says in cases]


def test_bad_document_files_are_one_line_each(model_path, tmp_path):
    for path, says in _bad_documents(tmp_path):
        for kind in ("ask", "complete"):
            proc = malhae(kind, Q, "-m", str(model_path), "--file", str(path))
            err = one_error_line(proc)
            assert str(path) in err and says in err, (kind, err)
            assert "loading" not in proc.stderr.decode()  # found before the model is loaded
    err = one_error_line(malhae("ask", Q, "-m", str(model_path), "--file", str(tmp_path / "cp949.txt")))
    assert "iconv -f cp949 -t utf-8" in err


def test_documents_too_long_for_the_context_are_named(model_path, tmp_path):
    long, short = tmp_path / "헌법.txt", tmp_path / "짧은.txt"
    long.write_text("대한민국 헌법 " * 50, encoding="utf-8")
    short.write_text("짧다", encoding="utf-8")
    err = one_error_line(malhae("ask", Q, "-m", str(model_path), "--ctx", "32", "--file", str(long),
                                "--file", str(short), stdin="머리말".encode()))
    assert "more than the context of 32" in err and "--ctx" in err
    named = re.findall(r"(standard input|\S+\.txt) ([\d,]+) tokens", err.split("the documents in it:")[1])
    assert [name for name, _ in named] == ["standard input", str(long), str(short)]
    counts = [int(n.replace(",", "")) for _, n in named]
    assert counts[1] > 32 and counts[1] > 10 * counts[2]  # the long file is what made it too long
