"""The KV cache's types: a load setting like any other, sized by one rule that equals what llama.cpp allocates."""

from __future__ import annotations

import subprocess
import sys

import pytest

from malhae.cli import options as o
from malhae.errors import UserError
from malhae.runtime import kv, llama, offload
from malhae.runtime.gguf_info import read_info
from malhae.runtime.settings import LoadOptions


def _allocated(path, options: LoadOptions) -> kv.Report:
    """llama.cpp's own report of the cache it made (its log line)."""
    with llama.Model(path) as model, llama.Context(model, options) as ctx:
        assert ctx.kv_report is not None, "llama.cpp said nothing about its KV cache"
        return ctx.kv_report


@pytest.mark.parametrize("k,v", [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")])
@pytest.mark.parametrize("ctx,parallel", [(300, 1), (128, 3)])
def test_the_planners_figure_is_what_llama_cpp_allocates(demo_path, k, v, ctx, parallel):
    options = LoadOptions(model=demo_path, ctx=ctx, parallel=parallel, threads=1, kv_cache_k=k, kv_cache_v=v)
    report = _allocated(demo_path, options)
    assert (report.k, report.v) == (k, v)
    info = read_info(demo_path)
    sizes = offload.model_sizes(info, kv.cells(ctx, parallel), kv_types=(k, v))
    planned = sizes.kv_bytes_per_layer * sizes.n_layer / 2**20
    assert planned == pytest.approx(report.mib, abs=0.006)  # llama.cpp prints MiB with two decimals
    n_embd_kv = info.arch_int("embedding_length")
    cells = kv.cells(ctx, parallel)
    assert report.k_mib == pytest.approx(sizes.n_layer * cells * kv.row_bytes(k, n_embd_kv) / 2**20, abs=0.006)
    assert report.v_mib == pytest.approx(sizes.n_layer * cells * kv.row_bytes(v, n_embd_kv) / 2**20, abs=0.006)


def test_sizes_by_hand():
    """The rule against numbers worked out by hand: polyglot-ko-12.8b (5120 wide, 40 layers) at 2048 tokens."""
    per_layer_f16 = kv.layer_bytes(2048, 5120)
    assert per_layer_f16 * 40 == 2048 * 40 * 2 * 5120 * 2 == int(1.5625 * 2**30)  # the 1.56 GiB
    assert kv.layer_bytes(2048, 5120, "q8_0", "q8_0") == 2048 * 2 * 5120 // 32 * 34
    assert kv.layer_bytes(2048, 5120, "q4_0", "q4_0") == 2048 * 2 * 5120 // 32 * 18
    assert kv.cells(300) == 512 and kv.cells(128, 3) == 768 and kv.cells(2048, 4) == 8192
    assert kv.cells(300, 4, unified=True) == 512


def test_settings_file_and_flags(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    monkeypatch.setenv("MALHAE_CONFIG", str(path))
    path.write_text('kv_cache = "q8_0"\nflash_attn = "on"\n', encoding="utf-8")
    load, _ = o.settings_for("chat", kv_cache=None, kv_cache_k=None, kv_cache_v=None, flash_attn=None)
    assert (load.kv_cache_k, load.kv_cache_v, load.flash_attn) == ("q8_0", "q8_0", "on")
    load, _ = o.settings_for("chat", kv_cache="Q4_0", kv_cache_k=None, kv_cache_v="f16", flash_attn=None)
    assert (load.kv_cache_k, load.kv_cache_v) == ("q4_0", "f16")  # a flag beats the file; V's own beats both
    path.write_text('kv_cache_v = "q4_0"\n', encoding="utf-8")
    load, _ = o.settings_for("ask", kv_cache=None, kv_cache_k=None, kv_cache_v=None, flash_attn=None)
    assert (load.kv_cache_k, load.kv_cache_v, load.flash_attn) == ("f16", "q4_0", "auto")
    path.write_text('kv_cache = "q5_1"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 1.*kv_cache must be one of f16, q8_0, q4_0"):
        o.settings_for("ask", kv_cache=None, kv_cache_k=None, kv_cache_v=None, flash_attn=None)


def test_what_llama_cpp_would_refuse_is_refused_first():
    with pytest.raises(UserError, match="q4_0 V cache needs flash attention; use --flash-attn auto"):
        kv.check_types("f16", "q4_0", "off")
    kv.check_types("q8_0", "f16", "off")  # a quantized K alone needs no flash attention
    with pytest.raises(UserError, match="heads of 48"):
        kv.check_types("q8_0", "q8_0", "auto", head_dim=48)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags,message", [
    (["--kv-cache", "q8_0", "--flash-attn", "off"], "a q8_0 V cache needs flash attention"),
    (["--kv-cache", "int8"], "--kv-cache 'int8' is not valid: kv_cache must be one of f16, q8_0, q4_0"),
    (["--flash-attn", "yes"], "--flash-attn 'yes' is not valid: flash_attn must be one of auto, on, off"),
])
def test_bad_types_are_one_line(flags, message):
    proc = _run("ask", "안녕", "-m", "demo", "-n", "2", *flags)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_a_quantized_cache_answers(demo_path):
    """q8_0 K and V with flash attention give the demo's answer to its own opening line (the same as f16)."""
    out = {}
    for kind in ("f16", "q8_0"):
        proc = _run("complete", "대한민국은 민주공화국이다. 대한민국의", "-m", str(demo_path), "-n", "8",
                    "--temperature", "0", "--kv-cache", kind, "--threads", "1")
        assert proc.returncode == 0, proc.stderr
        out[kind] = proc.stdout
    assert "주권" in out["f16"] and out["q8_0"] == out["f16"]


def test_a_device_without_flash_attention_is_told_what_to_do(demo_path, monkeypatch):
    """A GPU backend without flash attention for these shapes makes llama.cpp's auto turn it off, and then refuse
    the quantized V cache. No such GPU here: llama.cpp's answer on one is faked (its log line and a NULL context)."""

    def refuses(model, params):
        assert params.flash_attn_type == llama.lc.LLAMA_FLASH_ATTN_TYPE_AUTO and params.type_v == kv.ggml_type("q8_0")
        llama._log_sink(2, "llama_init_from_model: failed to initialize the context: quantized V cache was "
                           "requested, but this requires Flash Attention\n")
        return None

    monkeypatch.setattr(llama.lc, "llama_init_from_model", refuses)
    options = LoadOptions(model=demo_path, ctx=64, threads=1, kv_cache_k="q8_0", kv_cache_v="q8_0")
    with llama.Model(demo_path) as model, pytest.raises(UserError) as e:
        llama.Context(model, options)
    message = str(e.value)
    assert "requires Flash Attention" in message and "use --kv-cache-v f16" in message and "\n" not in message
