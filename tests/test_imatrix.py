"""Importance matrices: computed as llama-imatrix computes them, in its file format, used by llama.cpp's quantizer.

The sums are held to two references: upstream llama-imatrix itself on the same model, text, ctx and chunks (where
benchmarks/build_llama_tools.py built it; skipped otherwise), and always an independent numpy computation from the
activations transformers computes on a tiny checkpoint. The file format is held to llama.cpp's quantizer (a file
malhae wrote gives the bytes llama-quantize gives with it) and to hand-written files; the types table to llama.cpp's
own refusals; and the point of it all to the demo model's loss on the held-out bills.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from helpers import one_error_line

from malhae.convert import corpus, importance, pipeline
from malhae.convert import imatrix as imatrix_file
from malhae.convert import types as out_types
from malhae.errors import UserError
from malhae.eval import compare, upstream
from malhae.runtime import activations, quant
from malhae.runtime.llama import Model
from malhae.runtime.settings import LoadOptions

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "malhae-demo-ko-f16.gguf"
DEMO_HF = ROOT / "models" / "demo" / "hf"


def _malhae(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")  # rich wraps at 80 columns without a terminal
    return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calibration.txt"
    path.write_text(corpus.calibration_text()[1], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def demo_imatrix(calibration_file) -> imatrix_file.Imatrix:
    """The demo's importance matrix over 30 chunks of 128 tokens of the calibration text."""
    with Model(DEMO) as model:
        im, ppl, _ = importance.compute(model, calibration_file.read_text(encoding="utf-8"),
                                        importance.chunk_layout(128), LoadOptions(threads=2), chunks=30,
                                        datasets=("calibration.txt",))
    assert 1.0 < ppl < 50  # the demo read (and memorised) most of this text
    return im


def test_sums_cover_every_matrix_of_every_layer(demo_imatrix):
    names = {f"blk.{i}.{w}.weight" for i in range(6) for w in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")}
    assert set(demo_imatrix.sums) == names  # output.weight only with --process-output, as upstream
    assert demo_imatrix.sums["blk.0.ffn_down.weight"].shape == (1, 1024)  # its input is the 1024-wide FFN
    assert demo_imatrix.sums["blk.0.attn_qkv.weight"].shape == (1, 256)
    for name, counts in demo_imatrix.counts.items():
        assert counts.tolist() == [30 * 128], name  # every token of every chunk, last layer included
        assert (demo_imatrix.sums[name] > 0).all()
    assert demo_imatrix.chunk_count == 30 and demo_imatrix.chunk_size == 128


def test_process_output_adds_the_output_head(calibration_file):
    """--process-output (llama-imatrix's flag of the same name): output.weight too, over every position."""
    with Model(DEMO) as model:
        im, _, _ = importance.compute(model, calibration_file.read_text(encoding="utf-8"), importance.chunk_layout(64),
                                      LoadOptions(threads=2), chunks=3, output=True)
    assert im.sums["output.weight"].shape == (1, 256)
    assert im.counts["output.weight"].tolist() == [3 * 64]
    assert len(im.sums) == 25


def test_equals_upstream_llama_imatrix(demo_imatrix, calibration_file, tmp_path):
    exe = upstream.tool_exe("llama-imatrix")
    if exe is None:
        pytest.skip("llama-imatrix is not built (python benchmarks/build_llama_tools.py)")
    out = tmp_path / "upstream.imatrix.gguf"
    proc = subprocess.run([str(exe), "-m", str(DEMO), "-f", str(calibration_file), "-c", "128", "--chunks", "30",
                           "-t", "2", "-o", str(out), "--no-ppl"], capture_output=True, text=True,
                          env=upstream.same_libraries_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = imatrix_file.read(out)
    assert sorted(theirs.sums) == sorted(demo_imatrix.sums)
    assert (theirs.chunk_count, theirs.chunk_size) == (30, 128)
    for name, ours in demo_imatrix.sums.items():
        assert theirs.counts[name].tolist() == demo_imatrix.counts[name].tolist(), name
        rel = np.abs(ours - theirs.sums[name]) / np.abs(theirs.sums[name]).max()
        assert rel.max() < 1e-3, (name, rel.max())


def test_equals_numpy_sums_of_transformers_activations(k_quant_checkpoint, tmp_path):
    """An independent computation: forward pre-hooks on every linear layer of the transformers model collect the
    inputs, numpy adds up their squares per column; malhae's sums through llama.cpp must agree."""
    import torch
    from transformers import GPTNeoXForCausalLM

    gguf_path = pipeline.convert(k_quant_checkpoint, "f32", tmp_path / "m.gguf").path
    text = corpus.calibration_text()[1][:20000]
    n_ctx, n_chunks = 64, 6
    with Model(gguf_path) as model:
        ours, _, _ = importance.compute(model, text, importance.chunk_layout(n_ctx), LoadOptions(threads=2),
                                        chunks=n_chunks)
        tokens = model.tokenize(text, add_special=True, parse_special=False)
    hf = GPTNeoXForCausalLM.from_pretrained(k_quant_checkpoint, dtype=torch.float32).eval()
    expected: dict[str, np.ndarray] = {}

    def hook(name: str):
        def collect(_module, inputs):
            x = inputs[0].detach().double().numpy().reshape(-1, inputs[0].shape[-1])
            expected[name] = expected.get(name, 0) + (x * x).sum(axis=0)
        return collect

    for i, layer in enumerate(hf.gpt_neox.layers):
        for module, gguf_name in ((layer.attention.query_key_value, "attn_qkv"), (layer.attention.dense, "attn_output"),
                                  (layer.mlp.dense_h_to_4h, "ffn_up"), (layer.mlp.dense_4h_to_h, "ffn_down")):
            module.register_forward_pre_hook(hook(f"blk.{i}.{gguf_name}.weight"))
    with torch.no_grad():
        for c in range(n_chunks):
            hf(torch.tensor([tokens[c * n_ctx:(c + 1) * n_ctx]]))
    assert sorted(expected) == sorted(ours.sums)
    for name, want in expected.items():
        got = ours.sums[name].reshape(-1)
        assert ours.counts[name].tolist() == [n_ctx * n_chunks]
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3, name
        assert (np.abs(got - want) / want.max()).max() < 1e-3, name


def test_copy_from_device_path_gives_the_same_sums(calibration_file):
    """On a GPU the activations are copied out with ggml_backend_tensor_get: forced here on CPU buffers, the sums
    must be the very ones read in place."""
    text = calibration_file.read_text(encoding="utf-8")
    with Model(DEMO) as model:
        direct, _, _ = importance.compute(model, text, importance.chunk_layout(64), LoadOptions(threads=2), chunks=4,
                                          copy=False)
        copied, _, _ = importance.compute(model, text, importance.chunk_layout(64), LoadOptions(threads=2), chunks=4,
                                          copy=True)
    for name in direct.sums:
        assert np.array_equal(direct.sums[name], copied.sums[name]), name


def test_device_tensors_are_copied_not_read_in_place(monkeypatch, calibration_file):
    """What a CUDA build answers: the graph's tensors are not in host memory. Then every read goes through
    ggml_backend_tensor_get (counted here), and the sums equal the in-place ones."""
    from malhae.runtime import ggml

    text = calibration_file.read_text(encoding="utf-8")
    with Model(DEMO) as model:
        direct, _, _ = importance.compute(model, text, importance.chunk_layout(64), LoadOptions(threads=2), chunks=2)
        calls = []
        real_rows = ggml.f32_rows
        monkeypatch.setattr(ggml, "on_host", lambda t: False)
        monkeypatch.setattr(ggml, "f32_rows", lambda t, copy=None: calls.append(copy) or real_rows(t, copy))
        copied, _, _ = importance.compute(model, text, importance.chunk_layout(64), LoadOptions(threads=2), chunks=2)
    assert calls and all(c is None for c in calls)  # the collector left it to f32_rows, which saw "not host"
    for name in direct.sums:
        assert np.array_equal(direct.sums[name], copied.sums[name]), name


def test_weight_names_lose_backend_prefixes():
    assert activations.weight_name("CUDA0#blk.3.ffn_up.weight#0") == "blk.3.ffn_up.weight"
    assert activations.weight_name("blk.3.ffn_up.weight") == "blk.3.ffn_up.weight"


def test_file_round_trip_and_means(demo_imatrix, tmp_path):
    path = tmp_path / "x.imatrix.gguf"
    imatrix_file.write(demo_imatrix, path)
    reader = gguf.GGUFReader(str(path))  # llama-imatrix's layout, read by gguf-py rather than by malhae
    assert bytes(reader.get_field("general.type").parts[-1]).decode() == "imatrix"
    assert int(reader.get_field("imatrix.chunk_count").parts[-1][0]) == 30
    assert int(reader.get_field("imatrix.chunk_size").parts[-1][0]) == 128
    names = [t.name for t in reader.tensors]
    # as llama-imatrix orders them: entries sorted by name, each its sums then its counts
    assert names == [f"{n}.{part}" for n in sorted(demo_imatrix.sums) for part in ("in_sum2", "counts")]
    back = imatrix_file.read(path)
    assert back.datasets == ["calibration.txt"]
    for name, sums in demo_imatrix.sums.items():
        assert np.array_equal(back.sums[name], sums.astype(np.float32).astype(np.float64))
    means = back.means()["blk.0.ffn_up.weight"]
    expected = (demo_imatrix.sums["blk.0.ffn_up.weight"][0] / (30 * 128)).astype(np.float32)
    assert means.dtype == np.float32 and np.allclose(means, expected, rtol=1e-6)
    with pytest.raises(UserError, match="already exists"):
        imatrix_file.write(demo_imatrix, path)


def test_unreached_matrices_weigh_one():
    im = imatrix_file.Imatrix({"blk.0.x.weight": np.array([[4.0, 8.0], [0.0, 0.0]])},
                              {"blk.0.x.weight": np.array([2, 0])})
    assert im.means()["blk.0.x.weight"].tolist() == [2.0, 4.0, 1.0, 1.0]  # llama-quantize's rule for count 0


def _legacy_bytes(entries: dict[str, tuple[int, list[float]]], chunks: int, dataset: str) -> bytes:
    """llama-imatrix's .dat layout, written independently of the reader."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(values))
        out += struct.pack(f"<{len(values)}f", *values)
    return out + struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode()


def test_reads_the_legacy_dat_format(tmp_path):
    path = tmp_path / "old.dat"
    path.write_bytes(_legacy_bytes({"blk.0.ffn_up.weight": (10, [20.0, 40.0, 5.0])}, 10, "wiki.train.raw"))
    im = imatrix_file.read(path)
    assert im.legacy and im.chunk_count == 10 and im.datasets == ["wiki.train.raw"]
    assert im.means()["blk.0.ffn_up.weight"].tolist() == [2.0, 4.0, 0.5]  # values / ncall, as llama-quantize does


@pytest.mark.parametrize("content, why", [
    (b"", "truncated"),
    (b"hello world, not an imatrix at all" * 3, "neither GGUF"),
    (b"GGUF\x03\x00\x00\x00\xff", "damaged or truncated"),
])
def test_bad_files_are_refused_in_one_line(tmp_path, content, why):
    path = tmp_path / "bad.imatrix"
    path.write_bytes(content)
    with pytest.raises(UserError, match=why):
        imatrix_file.read(path)


def test_truncated_files_are_refused(demo_imatrix, tmp_path):
    good = tmp_path / "good.gguf"
    imatrix_file.write(demo_imatrix, good)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="not an importance matrix"):
        imatrix_file.read(cut)
    legacy = _legacy_bytes({"blk.0.ffn_up.weight": (10, [1.0] * 64)}, 10, "x")
    (tmp_path / "cut.dat").write_bytes(legacy[:40])
    with pytest.raises(UserError, match="truncated"):
        imatrix_file.read(tmp_path / "cut.dat")


def test_a_model_file_is_not_an_imatrix():
    with pytest.raises(UserError, match="type 'model'"):
        imatrix_file.read(DEMO)


def test_another_models_imatrix_is_refused_before_any_work(demo_imatrix, k_quant_checkpoint, tmp_path):
    mine = tmp_path / "demo.imatrix.gguf"
    imatrix_file.write(demo_imatrix, mine)
    out = tmp_path / "out.gguf"
    # the tiny checkpoint has 2 layers of width 256 and ffn 512: blk.0.ffn_down has 512 input columns, not 1024
    proc = _malhae("convert", str(k_quant_checkpoint), "--type", "q3_k_m", "--imatrix", str(mine), "-o", str(out))
    line = one_error_line(proc)
    assert "made for another model" in line and "blk.0.ffn_down.weight" in line
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    renamed = imatrix_file.Imatrix({k.replace("blk.", "layer."): v for k, v in demo_imatrix.sums.items()},
                                   {k.replace("blk.", "layer."): v for k, v in demo_imatrix.counts.items()})
    other = tmp_path / "other.imatrix.gguf"
    imatrix_file.write(renamed, other)
    with pytest.raises(UserError, match="none of its tensors"):
        pipeline.convert(DEMO_HF, "q2_k", tmp_path / "o.gguf", imatrix=other)
    assert not (tmp_path / "o.gguf").exists()


def test_types_that_need_an_imatrix_are_the_ones_llama_cpp_refuses(k_quant_checkpoint, tmp_path):
    """The table's needs_imatrix against llama.cpp itself: quantizing the F16 without an imatrix fails exactly for
    those types (and with one, they are made)."""
    f16 = pipeline.convert(k_quant_checkpoint, "f16", tmp_path / "f16.gguf").path
    for otype in out_types.TYPES.values():
        if otype.direct is not None:
            continue
        out = tmp_path / f"{otype.name}.gguf"
        rc = quant.quantize_file(f16, out, int(otype.ftype), 2)
        assert (rc != 0) == otype.needs_imatrix, otype.name
        out.unlink(missing_ok=True)


def test_needing_type_without_imatrix_is_refused_before_work(k_quant_checkpoint, tmp_path):
    out = tmp_path / "m.gguf"
    line = one_error_line(_malhae("convert", str(k_quant_checkpoint), "--type", "iq2_xxs", "-o", str(out)))
    assert "iq2_xxs needs an importance matrix" in line and "--imatrix auto" in line
    assert not list(tmp_path.iterdir())
    line = one_error_line(_malhae("convert", str(k_quant_checkpoint), "--type", "f16", "--imatrix", "auto"))
    assert "--imatrix" in line and "f16" in line


def test_imatrix_command_writes_a_file_llama_quantize_reads(tmp_path, calibration_file):
    out = tmp_path / "demo.imatrix.gguf"
    proc = _malhae("imatrix", str(DEMO), "--text", str(calibration_file), "--ctx", "128", "--chunks", "20",
                   "--threads", "2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    assert "20 chunks of 128 tokens" in proc.stdout.decode()
    assert imatrix_file.read(out).chunk_count == 20
    again = one_error_line(_malhae("imatrix", str(DEMO), "-o", str(out)))
    assert "already exists" in again and "--force" in again
    # the quantizer with it: malhae's file gives the bytes llama-quantize gives with the same file
    ours = tmp_path / "ours.gguf"
    pipeline.convert(DEMO_HF, "q2_k", ours, imatrix=out)
    plain = tmp_path / "plain.gguf"
    pipeline.convert(DEMO_HF, "q2_k", plain)
    tensors = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    assert any(not np.array_equal(t.data, tensors[t.name].data) for t in gguf.GGUFReader(str(plain)).tensors)
    exe = upstream.tool_exe("llama-quantize")
    if exe is not None:
        theirs = tmp_path / "theirs.gguf"
        staged = pipeline.convert(DEMO_HF, "f16", tmp_path / "f16.gguf").path
        proc = subprocess.run([str(exe), "--imatrix", str(out), str(staged), str(theirs), "Q2_K", "2"],
                              capture_output=True, text=True, env=upstream.same_libraries_env())
        assert proc.returncode == 0, proc.stderr[-2000:]
        for t in gguf.GGUFReader(str(theirs)).tensors:
            assert np.array_equal(t.data, tensors[t.name].data), t.name
    info = _malhae("info", str(ours))
    assert "importance matrix" in info.stdout.decode() and "demo.imatrix.gguf" in info.stdout.decode()
    assert "none (quantized without one" in _malhae("info", str(plain)).stdout.decode()
    assert "importance matrix" not in _malhae("info", str(DEMO)).stdout.decode()  # F16: nothing to say


def test_imatrix_command_bad_input(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "o.gguf"
    assert "is empty" in one_error_line(_malhae("imatrix", str(DEMO), "--text", str(empty), "-o", str(out)))
    assert "does not exist" in one_error_line(_malhae("imatrix", str(DEMO), "--text", str(tmp_path / "none.txt"),
                                                      "-o", str(out)))
    assert "--ctx 8 is too small" in one_error_line(_malhae("imatrix", str(DEMO), "--ctx", "8", "-o", str(out)))
    assert "--chunks 0" in one_error_line(_malhae("imatrix", str(DEMO), "--chunks", "0", "-o", str(out)))
    assert not list(tmp_path.glob("o.gguf*")) and not list(tmp_path.glob(".*partial"))


def test_calibration_corpus_never_holds_the_held_out_bills():
    name, text = corpus.calibration_text()
    assert name.startswith("malhae-ko-calibration")
    held = corpus.held_out_text()
    for start in range(0, len(held) - 200, 997):  # any 200-character stretch of the evaluation text
        assert held[start:start + 200] not in text
    kinds = [kind for kind, _ in corpus.manifest().sources]
    assert kinds == ["constitution", "bills", "dialogues"]
    first = text[:3 * corpus.PIECE_BYTES * 2]  # the interleaving: the first pieces already mix the sources
    assert "헌법" in first and "의안" in first and "사용자:" in first


def _losses(src: Path, tmp: Path) -> dict[tuple[str, str | None], float]:
    """Mean KL from the F16 on the held-out bills for Q2_K, Q3_K_M, Q4_K_M with and without `--imatrix auto`."""
    text = corpus.held_out_text()
    out = {}
    f16 = pipeline.convert(src, "f16", tmp / "f16.gguf").path
    with Model(f16) as reference:
        for type_name in ("q2_k", "q3_k_m", "q4_k_m"):
            for imatrix in (None, "auto"):
                path = pipeline.convert(src, type_name, tmp / f"{type_name}-{imatrix}.gguf", imatrix=imatrix).path
                with Model(path) as model:
                    out[type_name, imatrix] = compare.evaluate(reference, model, text, None,
                                                               LoadOptions(threads=2)).kl_mean
    return out


@pytest.fixture(scope="module")
def demo_losses(tmp_path_factory):
    return _losses(DEMO_HF, tmp_path_factory.mktemp("kl-demo"))


@pytest.fixture(scope="module")
def outlier_losses(tmp_path_factory):
    """The same on the demo's outlier twin (benchmarks/outlier_twin.py): the demo's function, with the outlier
    activation channels of a large model, where an importance matrix is what saves the low-bit types."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import outlier_twin

    tmp = tmp_path_factory.mktemp("kl-outliers")
    return _losses(outlier_twin.build(DEMO_HF, tmp / "hf"), tmp)


@pytest.mark.parametrize("type_name", ["q2_k", "q3_k_m", "q4_k_m"])
def test_imatrix_lowers_the_loss_where_activations_have_outliers(outlier_losses, type_name):
    # measured: Q2_K 7.95 → 0.103, Q3_K_M 0.066 → 0.044, Q4_K_M 0.064 → 0.027
    assert outlier_losses[type_name, "auto"] < 0.8 * outlier_losses[type_name, None]


@pytest.mark.parametrize("type_name", ["q2_k", "q4_k_m"])
def test_imatrix_lowers_the_demos_loss(demo_losses, type_name):
    assert demo_losses[type_name, "auto"] < demo_losses[type_name, None]


def test_imatrix_costs_the_demos_q3_k_m_little(demo_losses):
    """The one measured exception (0.01492 with, 0.01480 without; docs/benchmarks.md): on a model this small and
    this uniform an imatrix hardly matters, and for Q3_K_M it loses 1 %. Held to that, so that a change making it
    worse shows."""
    assert demo_losses["q3_k_m", "auto"] < 1.02 * demo_losses["q3_k_m", None]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_at_once_and_writes_nothing(sig, tmp_path):
    """Ctrl-C while llama.cpp evaluates: it used to be raised inside the eval callback, where ctypes swallowed it, and
    the run went on to the end and wrote its file. Now it stops llama_decode through the abort callback."""
    text = tmp_path / "long.txt"
    text.write_text("\n\n".join([corpus.calibration_text()[1]] * 6), encoding="utf-8")  # ~20 s of work here
    out = tmp_path / "o.imatrix.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "malhae", "imatrix", str(DEMO), "--text", str(text), "--ctx", "128",
                             "--threads", "2", "-o", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(2.5)  # loaded and computing
    assert proc.poll() is None, "it finished before it could be interrupted"
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < 3, "the interrupt waited for the computation"
    assert "interrupted" in err and "Traceback" not in err and "Exception ignored" not in err
    assert list(tmp_path.iterdir()) == [text]
