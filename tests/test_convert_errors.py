"""Every user mistake: one line on stderr naming problem and fix, exit ≠ 0, no traceback, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import factory
import pytest
import torch

from malhae.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def model(checkpoints, tmp_path):
    """A private copy of the published-layout checkpoint, free to break."""
    dst = tmp_path / "src"
    shutil.copytree(checkpoints("tf4-st-f16"), dst)
    return dst


@pytest.fixture
def bin_model(checkpoints, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(checkpoints("bin-f16-seq"), dst)
    return dst


def run_cli(capsys, out_dir: Path, *args: str) -> tuple[int, str]:
    code = main(["convert", *args])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("malhae: error:")]
    assert "Traceback" not in captured.err + captured.out
    assert code not in (0, 1), f"expected a user error, got exit {code}: {captured.err}"
    assert len(lines) == 1, captured.err
    leftovers = [p.name for p in out_dir.iterdir() if p.name.endswith(".partial") or p.suffix == ".gguf"]
    assert not leftovers, leftovers
    return code, lines[0]


def test_missing_config(model, tmp_path, capsys):
    (model / "config.json").unlink()
    _, err = run_cli(capsys, tmp_path, str(model), "-o", str(tmp_path / "o.gguf"))
    assert "no config.json" in err and "Hugging Face model" in err


def test_unreadable_config(model, tmp_path, capsys):
    (model / "config.json").write_bytes(b"\x00\xff{not json")
    _, err = run_cli(capsys, tmp_path, str(model), "-o", str(tmp_path / "o.gguf"))
    assert "config.json is not valid JSON" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_config_without_permission(model, tmp_path, capsys):
    (model / "config.json").chmod(0)
    _, err = run_cli(capsys, tmp_path, str(model), "-o", str(tmp_path / "o.gguf"))
    assert "cannot read" in err


def test_other_architecture(model, tmp_path, capsys):
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (model / "config.json").write_text(json.dumps(cfg))
    _, err = run_cli(capsys, tmp_path, str(model), "-o", str(tmp_path / "o.gguf"))
    assert "LlamaForCausalLM" in err and "GPT-NeoX" in err and "Polyglot-Ko" in err


def test_missing_tokenizer(model, tmp_path, capsys):
    (model / "tokenizer.json").unlink()
    _, err = run_cli(capsys, tmp_path, str(model), "-o", str(tmp_path / "o.gguf"))
    assert "no tokenizer.json" in err


def test_unsupported_pre_tokenizer(model, tmp_path, capsys):
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (model / "tokenizer.json").write_text(json.dumps(tok))
    _, err = run_cli(capsys, tmp_path, str(model), "-o", str(tmp_path / "o.gguf"))
    assert "pre-tokenizer Metaspace" in err and "no llama.cpp equivalent" in err


def test_truncated_safetensors(model, tmp_path, capsys):
    shard = sorted(model.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _, err = run_cli(capsys, tmp_path, str(model), "-o", str(tmp_path / "o.gguf"))
    assert f"{shard.name} is truncated" in err and "download it again" in err


def test_shard_missing(model, tmp_path, capsys):
    shard = sorted(model.glob("*.safetensors"))[0]
    shard.unlink()
    _, err = run_cli(capsys, tmp_path, str(model), "-o", str(tmp_path / "o.gguf"))
    assert f"shard {shard.name} named in model.safetensors.index.json is missing" in err


def test_shard_index_pointing_outside_the_folder_is_refused(model, tmp_path, capsys):
    """A shard named ../other/model.safetensors (or an absolute path) was followed out of the checkpoint."""
    other = tmp_path / "other"
    other.mkdir()
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(model / first, other / first)  # a real file is there: only the name's escape is refused
    original = dict(index["weight_map"])
    for outside in (f"../other/{first}", str(other / first)):
        index["weight_map"] = {k: (outside if v == first else v) for k, v in original.items()}
        index_path.write_text(json.dumps(index))
        _, err = run_cli(capsys, tmp_path / "other", str(model), "-o", str(tmp_path / "o.gguf"))
        assert "outside" in err and outside in err


def test_tokenizer_json_of_the_wrong_kind(model, tmp_path, capsys):
    for content in ('{"version": "1.0"}', "[1, 2, 3]", '{"model": {"type": "Unigram", "vocab": []}}',
                    '{"model": {"type": "BPE", "vocab": {}}, "normalizer": "NFC"}'):
        (model / "tokenizer.json").write_text(content)
        _, err = run_cli(capsys, tmp_path, str(model), "-o", str(tmp_path / "o.gguf"))
        assert "None" not in err and "tokenizer" in err, err


def test_tensor_with_wrong_shape(model, tmp_path, capsys):
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the weights have 256
    (model / "config.json").write_text(json.dumps(cfg))
    _, err = run_cli(capsys, tmp_path, str(model), "-o", str(tmp_path / "o.gguf"))
    assert "has shape" in err and "gpt_neox.layers.0.mlp.dense_" in err and "config.json implies" in err


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_malicious_pickle_is_refused_and_never_run(bin_model, tmp_path, capsys):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    weights = bin_model / "pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    state["gpt_neox.embed_in.weight"] = _Exploit()
    torch.save(state, weights)
    _, err = run_cli(capsys, tmp_path, str(bin_model), "-o", str(tmp_path / "o.gguf"))
    assert "refuses it" in err and "safetensors" in err
    assert not marker.exists(), "the pickle's code ran"
    # as a user sees it (pytest captures warnings, a real run does not): the one line and nothing of torch's
    proc = subprocess.run([sys.executable, "-m", "malhae", "convert", str(bin_model), "-o", str(tmp_path / "o.gguf")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "refuses it" in lines[0], proc.stderr
    assert not marker.exists()


def test_unknown_type(model, tmp_path, capsys):
    _, err = run_cli(capsys, tmp_path, str(model), "--type", "q9_k", "-o", str(tmp_path / "o.gguf"))
    assert "unknown --type 'q9_k'" in err and "q4_k_m" in err


def test_output_exists_needs_force(model, tmp_path, capsys):
    out = tmp_path / "keep.bin"
    out.write_bytes(b"precious")
    _, err = run_cli(capsys, tmp_path, str(model), "-o", str(out))
    assert "already exists" in err and "--force" in err
    assert out.read_bytes() == b"precious"
    assert main(["convert", str(model), "-o", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_not_enough_disk_space(model, tmp_path, capsys, monkeypatch):
    # Filling a real disk is not cheap; the OS's free-space answer is what is replaced here.
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    _, err = run_cli(capsys, tmp_path, str(model), "-t", "q4_k_m", "-o", str(tmp_path / "o.gguf"))
    assert "not enough free disk space" in err and "and 0.1 MB are free" in err


def test_failure_mid_write_leaves_nothing(model, tmp_path, capsys, monkeypatch):
    """The disk filling up half-way (simulated at the 5th tensor) removes the partial file."""
    import errno

    from malhae.convert import tensors

    real, calls = tensors.convert, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(tensors, "convert", failing)
    _, err = run_cli(capsys, tmp_path, str(model), "-o", str(tmp_path / "o.gguf"))
    assert "filled up while writing" in err and len(calls) == 5


def test_src_is_not_a_directory(tmp_path, capsys):
    _, err = run_cli(capsys, tmp_path, str(tmp_path / "nope"), "-o", str(tmp_path / "o.gguf"))
    assert "is not a directory" in err


def test_pickle_without_torch(bin_model, tmp_path):
    code = ("import sys; sys.modules['torch'] = None; from app.cli import main; "
            f"sys.exit(main(['convert', {str(bin_model)!r}, '-o', {str(tmp_path / 'o.gguf')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "needs torch" in proc.stderr and "pip install 'malhae[torch]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


@pytest.fixture(scope="module")
def larger_model(tmp_path_factory):
    """Big enough (≈50 M parameters) that writing and quantizing take long enough to be interrupted."""
    return factory.build(tmp_path_factory.mktemp("big") / "big",
                         factory.Spec("big", hidden=768, heads=12, ff=3072, layers=6, vocab_rows=4096,
                                      weights="safetensors", legacy_buffers=False))


@pytest.mark.parametrize("stage", ["staged", "quantized"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_nothing(larger_model, tmp_path, stage, sig):
    """Ctrl-C (or a kill) while writing or while llama.cpp quantizes: exit 130, no partial or final file."""
    out = tmp_path / "o.gguf"
    # as a terminal's Ctrl-C finds it: SIGINT not ignored (a test run started in the background, `pytest &`, ignores
    # it, and so would its children, which then run to the end)
    proc = subprocess.Popen([sys.executable, "-m", "malhae", "convert", str(larger_model), "-t", "q4_k_m", "-o",
                             str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(f".*.{stage}.partial")) and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "conversion finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    time.sleep(0.2)  # the quantizer child is gone too: nothing reappears
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_llama_cpp_cannot_reproduce_is_refused(model, tmp_path, capsys):
    """An added token that swallows the space before it (lstrip) passes every structural check; only the token-id
    proof catches that llama.cpp would tokenize it differently."""
    tok = json.loads((model / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        if added["content"] == "<|sep|>":
            added["lstrip"] = True
    (model / "tokenizer.json").write_text(json.dumps(tok))
    _, err = run_cli(capsys, tmp_path, str(model), "-o", str(tmp_path / "o.gguf"))
    assert "splits" in err and "differently from tokenizer.json" in err and "<|sep|>" in err


def test_output_onto_the_checkpoint_itself_is_refused(model, tmp_path, capsys):
    shard = sorted(model.glob("*.safetensors"))[0]
    before = shard.read_bytes()
    code = main(["convert", str(model), "-o", str(shard), "--force"])
    err = capsys.readouterr().err
    assert code == 2 and "one of the checkpoint's own files" in err
    assert shard.read_bytes() == before
