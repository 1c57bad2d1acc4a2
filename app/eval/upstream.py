"""llama.cpp's own tools, run side by side with malhae on the same file: llama-bench (speed) and llama-perplexity.

Both are run on the very llama.cpp libraries the engine loads and with the same weight layout, so that a ratio or a
difference measures malhae, not two compilations of llama.cpp. They are built from llama-cpp-python's vendored source
by benchmarks/build_llama_tools.py; nothing here is needed to use malhae.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from malhae import children
from malhae.errors import UserError
from malhae.files import parse_json
from malhae.runtime import hardware, kv, llama
from malhae.runtime.settings import LoadOptions
from malhae.runtime.windows import Layout


@dataclass(frozen=True)
class BenchTest:
    """One llama-bench measurement: a prompt of n_prompt tokens and n_gen generated ones, each after `depth` tokens
    already in the cache (llama-bench's -p, -n, -d), repeated `repetitions` times (-r)."""

    n_prompt: int
    n_gen: int
    repetitions: int = 1
    depth: int = 0


def tools_dir() -> Path:
    """Where benchmarks/build_llama_tools.py puts the binaries for this llama-cpp-python version."""
    import importlib.metadata

    version = importlib.metadata.version("llama-cpp-python")
    return Path.home() / ".cache" / "malhae" / f"llama-tools-{version}" / "build" / "bin"


def same_libraries_env() -> dict[str, str]:
    """Make llama-bench load the very llama.cpp libraries the engine uses (it links them through RUNPATH, which
    LD_LIBRARY_PATH overrides), so that the ratio measures the engine, not two different compilations of llama.cpp
    (a llama-bench built separately from the same source has a different libggml-cpu.so here)."""
    lib_dir = str(llama.lib_dir())
    return dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(filter(None, [lib_dir, os.environ.get("LD_LIBRARY_PATH")])))


def flash_attn_arg(options: LoadOptions) -> list[str]:
    """llama-bench's -fa for malhae's flash_attn: on → 1, off → 0 (the words older builds take too); auto → 1 with
    a quantized V (what llama.cpp resolves it to: such a V cache cannot exist without flash attention), else nothing:
    llama-bench's own default, auto in the build benchmarks/build_llama_tools.py makes, resolved by the same
    llama.cpp libraries as the engine's."""
    if options.flash_attn == "on" or options.flash_attn == "auto" and kv.quantized(options.kv_cache_v):
        return ["-fa", "1"]
    return ["-fa", "0"] if options.flash_attn == "off" else []


def llama_bench_command(exe: Path, options: LoadOptions, plan, test: BenchTest) -> list[str]:
    """The llama-bench command line for the engine's resolved options (its file, threads, K/V types and flash
    attention) and plan (an app.runtime.offload.Plan: its layers, and its devices and split when it names them), so
    that both run the same computation on the same hardware."""
    # same weight layout as the engine: extra CPU buffers off on AMX CPUs (see llama.use_extra_buffer_types)
    repack = "1" if llama.use_extra_buffer_types() else "0"
    cmd = [str(exe.absolute()), "-m", str(options.model), "-p", str(test.n_prompt), "-n", str(test.n_gen),
           "-t", str(options.threads), "-ngl", str(plan.n_gpu_layers), "-r", str(test.repetitions), "--repack",
           repack, "-ctk", options.kv_cache_k, "-ctv", options.kv_cache_v, *flash_attn_arg(options), "-o", "json"]
    if test.depth:
        cmd += ["-d", str(test.depth)]
    chosen = plan.load_devices
    if chosen is not None:
        cmd += ["-dev", "/".join(d.name for d in plan.devices) if chosen else "none"]
    if plan.split:
        cmd += ["-ts", "/".join(f"{n:g}" for n in plan.split)]
    return cmd


def run_llama_bench(exe: Path, options: LoadOptions, plan, test: BenchTest) -> tuple[float, float]:
    """(prompt, decode) tokens/s from llama-bench on the engine's options and plan (llama_bench_command); a
    llama-bench that ran other K/V types than asked (one that ignores -ctk/-ctv) is refused, not compared."""
    if not exe.is_file():
        raise UserError(f"--llama-bench {exe} does not exist; build llama.cpp's llama-bench (see "
                        "benchmarks/build_llama_tools.py)")
    proc = children.run(llama_bench_command(exe, options, plan, test), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, env=same_libraries_env())
    if proc.returncode != 0:
        raise UserError(f"llama-bench failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    try:
        rows = parse_json(proc.stdout, "llama-bench's output")  # the user's own binary: bounded like any input
        pp = next(r["avg_ts"] for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0)
        tg = next(r["avg_ts"] for r in rows if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0)
        ran = {(r.get("type_k", options.kv_cache_k), r.get("type_v", options.kv_cache_v)) for r in rows}
    except (UserError, ValueError, TypeError, AttributeError, KeyError, StopIteration):
        raise UserError(f"--llama-bench {exe} did not answer as llama-bench does (no JSON with prompt and "
                        "generation rows); give the path of llama.cpp's llama-bench") from None
    asked = (options.kv_cache_k, options.kv_cache_v)
    other = next((t for t in sorted(ran) if t != asked), None)
    if other is not None:
        raise UserError(f"--llama-bench {exe} ran a {kv.describe(*other)} KV cache, not "
                        f"{kv.describe(*asked)}; give a llama-bench that takes -ctk/-ctv")
    return float(pp), float(tg)


def llama_bench_kv(exe: Path, options: LoadOptions, plan, n_tokens: int) -> kv.Report | None:
    """What llama.cpp, inside llama-bench, says it allocated for K and V in a context of `n_tokens` (its log line,
    printed only with -v; one prompt test of n_tokens, so the context is exactly that long). Not timed."""
    cmd = llama_bench_command(exe, options, plan, BenchTest(n_tokens, 0, 1)) + ["-v", "--no-warmup"]
    proc = children.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                        env=same_libraries_env())
    if proc.returncode != 0:
        raise UserError(f"llama-bench failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return next((r for line in proc.stderr.splitlines() if (r := kv.Report.parse(line))), None)


def tool_exe(name: str) -> Path | None:
    """One of llama.cpp's own tools (llama-perplexity, llama-imatrix, llama-quantize …), where
    benchmarks/build_llama_tools.py builds it; None when absent."""
    exe = tools_dir() / name
    return exe if exe.is_file() else None


def llama_perplexity_exe() -> Path | None:
    return tool_exe("llama-perplexity")


def run_llama_perplexity(exe: Path, model_path: Path, text_path: Path, layout: Layout | None = None,
                         threads: int | None = None) -> tuple[float, float]:
    """(perplexity, ±) from `llama-perplexity -m MODEL -f TEXT -c CTX -b BATCH` for `layout`'s windows (default:
    its own 512 and 2048), run on the same llama.cpp libraries and weight layout as malhae, so that a difference is
    the method's, not two compilations'."""
    layout = layout or Layout.of()
    cmd = [str(exe), "-m", str(model_path), "-f", str(text_path), "-c", str(layout.n_ctx), "-b", str(layout.n_batch),
           "-t", str(threads or hardware.physical_cores()), "-ngl", "0",
           "--repack" if llama.use_extra_buffer_types() else "--no-repack"]
    for _attempt in range(3):  # its logger writes from a thread and can exit before the last lines are out
        proc = children.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            env=same_libraries_env())
        found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", proc.stdout + proc.stderr)
        if found or proc.returncode != 0:
            break
    if proc.returncode != 0 or not found:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"llama-perplexity failed (exit {proc.returncode}): {tail}")
    return float(found.group(1)), float(found.group(2))
