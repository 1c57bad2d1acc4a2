"""`malhae bench` with a KV cache type: llama-bench gets the same K/V types and flash attention as the engine, the
engine's own side runs with them, at a depth when asked, and the output names them (issue 33).

The command line is read back from a stand-in that prints what llama-bench prints (llama-bench may be absent in CI);
where llama.cpp's own llama-bench is built, it runs on the demo for q8_0 and its KV bytes are held to the planner's.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from malhae.cli import main
from malhae.eval import bench, upstream
from malhae.runtime import kv, offload
from malhae.runtime.engine import Engine
from malhae.runtime.gguf_info import read_info
from malhae.runtime.settings import LoadOptions

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "malhae-demo-ko-f16.gguf"
# where benchmarks/build_llama_tools.py puts it, else where this project's benchmark machine keeps one
LLAMA_BENCH = next((p for p in (upstream.tools_dir() / "llama-bench", Path("/tmp/llama-tools/build/bin/llama-bench"))
                    if p.is_file()), None)


def _cpu_plan() -> offload.Plan:
    return offload.choose(read_info(DEMO), LoadOptions(ctx=256, gpu_layers=0))


def _args(options: LoadOptions, test: upstream.BenchTest | None = None) -> list[str]:
    return upstream.llama_bench_command(Path("llama-bench"), replace(options, model=DEMO, threads=2), _cpu_plan(),
                                        test or upstream.BenchTest(512, 64))


def _value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


@pytest.mark.parametrize(("k", "v", "flash", "fa"), [
    ("f16", "f16", "auto", None),  # llama-bench's own default: auto, resolved by the same llama.cpp
    ("f16", "f16", "off", "0"),
    ("f16", "f16", "on", "1"),
    ("q8_0", "q8_0", "auto", "1"),  # a quantized V exists only with flash attention: what auto resolves to
    ("q4_0", "q4_0", "auto", "1"),
    ("q8_0", "f16", "auto", None),  # a quantized K alone does not need it
    ("q4_0", "q4_0", "on", "1"),
])
def test_llama_bench_gets_the_engines_kv_types_and_flash_attention(k, v, flash, fa):
    args = _args(LoadOptions(kv_cache_k=k, kv_cache_v=v, flash_attn=flash))
    assert (_value(args, "-ctk"), _value(args, "-ctv"), _value(args, "-fa")) == (k, v, fa)
    assert (_value(args, "-m"), _value(args, "-t"), _value(args, "-p"), _value(args, "-n")) == (str(DEMO), "2",
                                                                                                 "512", "64")
    assert "-d" not in args
    assert _value(_args(LoadOptions(), upstream.BenchTest(512, 64, 3, depth=1536)), "-d") == "1536"


def _stand_in(tmp_path: Path, type_k: str, type_v: str) -> Path:
    script = tmp_path / "llama-bench"
    script.write_text("#!/bin/sh\necho \"$@\" > " + str(tmp_path / "args") + "\n"
                      f"echo '[{{\"n_prompt\": 16, \"n_gen\": 0, \"avg_ts\": 1.0, \"type_k\": \"{type_k}\", "
                      f"\"type_v\": \"{type_v}\"}}, {{\"n_prompt\": 0, \"n_gen\": 4, \"avg_ts\": 2.0, "
                      f"\"type_k\": \"{type_k}\", \"type_v\": \"{type_v}\"}}]'\n")
    script.chmod(0o755)
    return script


def test_bench_cli_runs_both_sides_with_the_types_and_names_them(tmp_path, capsys):
    script = _stand_in(tmp_path, "q8_0", "q8_0")
    common = ["bench", str(DEMO), "-p", "32", "-n", "8", "-r", "1", "--threads", "2", "--llama-bench", str(script)]
    assert main([*common, "--kv-cache", "q8_0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["kv_cache_k"], data["kv_cache_v"], data["flash_attn"]) == ("q8_0", "q8_0", "auto")
    assert data["upstream_prompt_tps"] == 1.0 and data["prompt_tps"] > 0 and data["depth"] == 0
    args = (tmp_path / "args").read_text().split()
    assert (_value(args, "-ctk"), _value(args, "-ctv"), _value(args, "-fa")) == ("q8_0", "q8_0", "1")
    assert main([*common, "--kv-cache", "q8_0"]) == 0
    assert "K/V q8_0, flash attention auto" in " ".join(capsys.readouterr().out.split())  # the title may wrap
    # a llama-bench that ran another cache than asked (one that ignores -ctk/-ctv) is not compared
    assert main([*common, "--kv-cache-k", "q4_0"]) == 2
    err = capsys.readouterr().err
    assert "ran a q8_0 KV cache, not K q4_0, V f16" in err and len(err.strip().splitlines()) == 1


def test_bench_depth_measures_after_the_depth(tmp_path, capsys):
    """Each test starts from `depth` tokens in the cache and evaluates only its own: what llama-bench -d does."""
    with Engine(LoadOptions(model=DEMO, ctx=256, threads=2, kv_cache_k="q8_0", kv_cache_v="q8_0")) as engine:
        pp, tg = bench.run_engine(engine, 32, 8, 2, depth=100)
        assert pp > 0 and tg > 0
        assert engine.stats.cached_tokens == 100 and engine.stats.prompt_tokens == 116
    script = _stand_in(tmp_path, "f16", "f16")
    assert main(["bench", str(DEMO), "-p", "32", "-n", "8", "-r", "1", "--depth", "100", "--llama-bench",
                 str(script), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["depth"] == 100
    assert _value((tmp_path / "args").read_text().split(), "-d") == "100"
    assert main(["bench", str(DEMO), "--depth", "-5"]) == 2
    assert "--depth -5: give 0 or more tokens" in capsys.readouterr().err


@pytest.mark.skipif(LLAMA_BENCH is None, reason="llama-bench not built (python benchmarks/build_llama_tools.py)")
def test_real_llama_bench_with_a_q8_0_cache():
    """llama.cpp's own llama-bench on the demo: it runs the q8_0 cache it was given (it reports its types back,
    checked by run_llama_bench), and the K/V bytes it allocates equal the planner's figure and the engine's."""
    options = LoadOptions(model=DEMO, ctx=512, threads=2, gpu_layers=0, kv_cache_k="q8_0", kv_cache_v="q8_0")
    plan = _cpu_plan()
    pp, tg = upstream.run_llama_bench(LLAMA_BENCH, options, plan, upstream.BenchTest(32, 8))
    assert pp > 0 and tg > 0
    report = upstream.llama_bench_kv(LLAMA_BENCH, options, plan, 512)
    info = read_info(DEMO)
    planned = offload.model_sizes(info, kv.cells(512), kv_types=("q8_0", "q8_0"))
    assert report is not None and (report.k, report.v) == ("q8_0", "q8_0")
    assert report.mib == round(planned.kv_bytes_per_layer * planned.n_layer / 2**20, 2)
    with Engine(options) as engine:
        assert engine.ctx.kv_report == report
