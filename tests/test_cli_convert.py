"""`malhae convert` as a user runs it: entry points, the summary line, --verify's table and verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from malhae.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_python_dash_m_app_runs():
    proc = subprocess.run([sys.executable, "-m", "malhae", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "convert" in proc.stdout


def test_list_types(capsys):
    assert main(["convert", "--list-types"]) == 0
    out = capsys.readouterr().out
    assert "q4_k_m" in out and "llama.cpp quantizer" in out and "malhae (direct)" in out


def test_convert_verify_passes_and_reports(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = checkpoints("tf4-st-f16")
    assert main(["convert", str(src), "--type", "f32", "--verify"]) == 0
    out = capsys.readouterr().out
    default_name = tmp_path / "tf4-st-f16-f32.gguf"  # <model-name>-<type>.gguf in the current directory
    assert default_name.is_file()
    assert f"wrote {default_name}" in out and "F32" in out and "bits/weight" in out
    assert "max |Δ logit|" in out and "PASS" in out and "FAIL" not in out


def test_convert_verify_fails_on_a_wrong_file(checkpoints, tmp_path, capsys, monkeypatch):
    from malhae.convert import tensors

    monkeypatch.setattr(tensors, "reorder_qkv", lambda data, n_head: data)  # a broken converter
    code = main(["convert", str(checkpoints("tf4-st-f16")), "-t", "f16", "-o", str(tmp_path / "x.gguf"), "--verify"])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAIL" in captured.out and "verification failed" in captured.err
