"""Bad input a careless or hostile user gives, beyond the reported list (issue 12's own trial, second round): each
is a real file, device, FIFO or process, and each must end in one line naming the problem, exit 2, nothing else."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from malhae.store import models

ROOT = Path(__file__).resolve().parent.parent
DEMO = models.demo_model()
pytestmark = pytest.mark.skipif(DEMO is None, reason="the bundled demo model is not built")


def malhae(*args: str, stdin=None, env: dict | None = None, timeout: float = 60) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "malhae", *args], stdin=stdin, capture_output=True, cwd=ROOT,
                          timeout=timeout, env=os.environ | (env or {}))
    return proc.returncode, proc.stderr.decode("utf-8", "replace")


def one_error(code: int, err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("malhae: error:")]
    assert code == 2 and len(errors) == 1, err
    assert "Traceback" not in err and "internal error" not in err
    return errors[0]


def _patched(tmp_path: Path, key: str, value: int) -> Path:
    """The demo with one uint32 hyperparameter changed: a well-formed header that lies."""
    data = bytearray(DEMO.read_bytes())
    name = key.encode()
    at = data.find(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    assert struct.unpack_from("<I", data, at)[0] == 4  # uint32
    struct.pack_into("<I", data, at + 4, value)
    out = tmp_path / f"{key}.gguf"
    out.write_bytes(data)
    return out


@pytest.mark.parametrize(("key", "value", "says"), [
    ("gptneox.block_count", 2**31, "block_count says 2147483648 layers, its tensors have 6"),  # llama.cpp aborted
    ("gptneox.embedding_length", 0, "embedding_length says 0"),
    ("gptneox.attention.head_count", 0, "head_count is 0"),
])
def test_a_header_that_lies_about_the_shape(tmp_path, key, value, says):
    """block_count = 2³¹ made `info` allocate until the kernel killed it and llama.cpp abort with a core dump."""
    bad = _patched(tmp_path, key, value)
    for args in (["complete", "가", "-m", str(bad)], ["info", str(bad)]):
        assert says in one_error(*malhae(*args)), args


def test_special_files_as_models_do_not_hang(tmp_path):
    """A FIFO given as the model blocked complete, info, models import and chat /model forever."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for args in (["complete", "가", "-m", str(fifo)], ["info", str(fifo)], ["models", "import", str(fifo)],
                 ["complete", "가", "-m", "/dev/zero"]):
        assert "not a GGUF file" in one_error(*malhae(*args, timeout=30)), args
    proc = subprocess.run([sys.executable, "-m", "malhae", "chat", "-m", str(DEMO)], input=f"/model {fifo}\n".encode(),
                          capture_output=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 0 and b"named pipe (FIFO), not a GGUF file" in proc.stderr


def test_endless_standard_input_is_bounded():
    """`malhae complete < /dev/zero` read until the kernel killed it; `chat < /dev/zero` read one endless line."""
    with open("/dev/zero", "rb") as zero:
        assert "longer than 16 MB" in one_error(*malhae("complete", "-m", str(DEMO), "-n", "1", stdin=zero))
    with open("/dev/zero", "rb") as zero:
        proc = subprocess.run([sys.executable, "-m", "malhae", "chat", "-m", str(DEMO)], stdin=zero,
                              capture_output=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stderr.decode().count("longer than 16 MB") == 1


def test_text_that_is_not_utf8_in_the_arguments():
    """Bytes a non-UTF-8 terminal passes arrive as lone surrogates: an internal UnicodeEncodeError before."""
    proc = subprocess.run([sys.executable.encode(), b"-m", b"malhae", b"ask", b"\xff\xfe", b"-m", bytes(DEMO)],
                          capture_output=True, cwd=ROOT, timeout=60)
    assert "not valid UTF-8" in one_error(proc.returncode, proc.stderr.decode())


def test_unopenable_model_paths(tmp_path):
    loop = tmp_path / "loop.gguf"
    loop.symlink_to(loop)
    assert "symbolic links" in one_error(*malhae("complete", "가", "-m", str(loop)))
    long = "/tmp/" + "가" * 300 + ".gguf"  # over NAME_MAX: an internal OSError before
    assert "too long" in one_error(*malhae("complete", "가", "-m", long))


def test_empty_stop_text_and_unbounded_windows():
    assert "cannot be empty" in one_error(*malhae("complete", "가", "-m", str(DEMO), "--stop", ""))
    text = ROOT / "models" / "data" / "ko-public-domain" / "constitution.txt"
    # --batch 10⁸ asked llama.cpp for a context of 10⁸ tokens
    assert "--batch 100000000 must be from 1" in one_error(*malhae("eval", "ppl", str(DEMO), "--text", str(text),
                                                                  "--batch", "100000000"))
    assert "at most 256" in one_error(*malhae("eval", "ppl", str(DEMO), "--text", str(text), "--ctx", "4",
                                              "--batch", "4096"))
    assert "larger than any context" in one_error(*malhae("eval", "ppl", str(DEMO), "--text", str(text),
                                                          "--ctx", "999999999"))


def test_malhae_home_and_config_mistakes(tmp_path):
    not_a_folder = tmp_path / "home"
    not_a_folder.write_text("")
    assert "is a file, not a folder" in one_error(*malhae("models", env={"MALHAE_HOME": str(not_a_folder)}))
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)  # blocked every command for ever
    assert "named pipe (FIFO)" in one_error(*malhae("complete", "가", "-m", str(DEMO), "-n", "1",
                                                     env={"MALHAE_CONFIG": str(fifo)}, timeout=30))
    bom = tmp_path / "bom.toml"  # Notepad writes a BOM and CRLF: tomllib refused line 1, column 1
    bom.write_bytes("\ufeffthreads = 1\r\n[sampling]\r\ntemperature = 0\r\n".encode())
    code, err = malhae("complete", "대한민국", "-m", str(DEMO), "-n", "2", env={"MALHAE_CONFIG": str(bom)})
    assert code == 0, err
    huge = tmp_path / "huge.toml"
    huge.write_text("# " + "x" * (2 << 20) + "\n")
    assert "larger than such a file can be" in one_error(*malhae("models", env={"MALHAE_CONFIG": str(huge)}))


def test_an_error_during_a_progress_bar_is_one_line_with_no_blank_line_before(tmp_path):
    """In a pipe, rich's final redraw of the bars left an empty line in front of the error."""
    data = tmp_path / "kobest" / "boolq"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("", encoding="utf-8")
    code, err = malhae("eval", "kobest", str(DEMO), "--data", str(tmp_path / "kobest"), "--tasks", "boolq",
                       "--shots", "0")
    one_error(code, err)
    assert not err.startswith("\n") and "\n\n" not in err, repr(err)


def test_a_kv_cache_larger_than_the_ram_is_refused_before_it_is_allocated(monkeypatch, capsys):
    """Linux overcommits, so an oversized cache is granted and the process killed later, mid-answer. The machine's
    answer is faked (4 GiB of RAM, as a small laptop has): the demo at --ctx 1048576 needs 6 GiB of f16 K and V."""
    from malhae.cli import main
    from malhae.runtime import hardware

    monkeypatch.setattr(hardware, "total_ram", lambda: 4 << 30)
    assert main(["complete", "대한민국", "-m", str(DEMO), "-n", "2", "--ctx", "1048576"]) == 2
    err = capsys.readouterr().err
    assert "needs 6.00 GiB of KV cache in RAM, more than this machine's 4.00 GiB" in err and "--ctx" in err
    assert main(["complete", "대한민국", "-m", str(DEMO), "-n", "2", "--ctx", "65536"]) == 0  # 384 MiB: fine
