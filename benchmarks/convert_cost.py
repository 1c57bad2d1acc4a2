"""Conversion cost, side by side: malhae convert vs llama.cpp's own convert_hf_to_gguf.py, same machine, same run.

    python benchmarks/convert_cost.py [--workdir DIR] [--types f16 q8_0 q4_k_m] [--repeat 2] [--llama-src DIR]

Builds a random-weight checkpoint shaped exactly like polyglot-ko-1.3b (fp16 safetensors, the published config keys,
1,331,810,304 parameters; ~2.7 GB, about a minute), then times each conversion with /usr/bin/time (wall seconds and
peak resident memory), alternating the two tools, each run starting from a synced disk, and prints the ratios.

llama.cpp's converter comes from the llama-cpp-python source distribution of the installed version (pip download, or
--llama-src pointing at a llama.cpp checkout). It fails on this checkpoint as shipped, so a scratch copy is patched in
two places, exactly as ../shared/notes/anchors.md describes: the GPT-NeoX rotary fraction is read from transformers 5's
rope_parameters when rotary_pct is gone (KeyError 'rotary_pct'), and the unknown BPE pre-tokenizer is taken as
"gpt-2" instead of refused. Upstream has no q4_k_m output; for that row only malhae's time is shown (its
quantization step is llama.cpp's own llama_model_quantize, the same code llama-quantize runs).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SHAPE_1_3B = dict(hidden=2048, heads=16, layers=24, ff=8192, vocab_rows=30080, tokenizer_entries=30000, ctx=2048)


def make_checkpoint(workdir: Path) -> Path:
    import factory

    src = workdir / "polyglot-ko-1.3b-shaped"
    if not (src / "config.json").is_file():
        print(f"building a 1.3b-shaped checkpoint in {src} …", flush=True)
        factory.build(src, factory.Spec("polyglot-ko-1.3b-shaped", weights="safetensors-sharded", dtype="f16",
                                        schema="tf4", legacy_buffers=False, **SHAPE_1_3B))
    return src


def upstream_converter(workdir: Path, llama_src: Path | None) -> tuple[Path, dict[str, str]]:
    """A patched scratch copy of convert_hf_to_gguf.py (+ its conversion/ package and gguf-py)."""
    if llama_src is None:
        version = importlib.metadata.version("llama-cpp-python")
        cache = workdir / f"llama-cpp-python-{version}"
        if not cache.is_dir():
            print(f"downloading the llama-cpp-python {version} source distribution …", flush=True)
            dl = Path(tempfile.mkdtemp(dir=workdir))
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                            "-d", str(dl), f"llama-cpp-python=={version}"], check=True)
            with tarfile.open(next(dl.glob("*.tar.gz"))) as tar:
                tar.extractall(dl, filter="data")
            shutil.move(str(next(dl.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"), cache)
            shutil.rmtree(dl)
        llama_src = cache
    scratch = workdir / "upstream-patched"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    shutil.copy(llama_src / "convert_hf_to_gguf.py", scratch)
    if (llama_src / "conversion").is_dir():
        shutil.copytree(llama_src / "conversion", scratch / "conversion")
    patched = 0
    for path in [scratch / "convert_hf_to_gguf.py", *sorted((scratch / "conversion").glob("*.py"))]:
        text = path.read_text()
        new = text
        if path.name in ("gptneox.py", "convert_hf_to_gguf.py") and "GPTNeoX" in text:
            new = new.replace('self.hparams["rotary_pct"]',
                              '(self.hparams.get("rotary_pct") or '
                              'self.hparams["rope_parameters"]["partial_rotary_factor"])')
        new = re.sub(r'raise NotImplementedError\("BPE pre-tokenizer was not recognized[^\n]*\)',
                     'res = "gpt-2"', new)
        if new != text:
            path.write_text(new)
            patched += 1
    if patched == 0:
        raise SystemExit("could not patch llama.cpp's converter: its source has changed; update this script")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(llama_src / "gguf-py"), str(scratch)]))
    return scratch / "convert_hf_to_gguf.py", env


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a command, by GNU time.

    Every run starts with no dirty pages (os.sync): a previous run's gigabytes still being written back would
    otherwise slow the next writer by seconds, whichever tool it is.
    """
    os.sync()
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        proc = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%e %M", *cmd], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        wall, rss_kb = report.read().split()[-2:]
    return float(wall), int(rss_kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "malhae-bench")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--llama-src", type=Path, help="a llama.cpp source tree (default: the installed version's)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    src = make_checkpoint(args.workdir)
    upstream, upstream_env = upstream_converter(args.workdir, args.llama_src)
    for f in src.iterdir():  # warm the page cache so that the first run is not the only one reading from disk
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass

    rows = []
    for type_name in args.types:
        results: dict[str, list[tuple[float, float]]] = {"malhae": [], "llama.cpp": []}
        for _ in range(args.repeat):
            out = args.workdir / f"out-malhae-{type_name}.gguf"
            results["malhae"].append(timed([sys.executable, "-m", "malhae", "convert", str(src), "-t", type_name,
                                            "-o", str(out), "--force"]))
            out.unlink()
            if type_name in ("f32", "f16", "bf16", "q8_0"):
                out = args.workdir / f"out-upstream-{type_name}.gguf"
                results["llama.cpp"].append(timed([sys.executable, str(upstream), str(src), "--outtype", type_name,
                                                   "--outfile", str(out)], upstream_env))
                out.unlink()
        for tool, runs in results.items():
            if runs:
                rows.append((type_name, tool, statistics.median(r[0] for r in runs),
                             statistics.median(r[1] for r in runs), len(runs)))

    print(f"\nconversion of the polyglot-ko-1.3b shape, {os.cpu_count()} CPUs, median of {args.repeat} run(s)")
    print(f"{'type':<8} {'tool':<10} {'wall s':>8} {'peak RSS MB':>12} {'time ratio':>11} {'RSS ratio':>10}")
    by_key = {(r[0], r[1]): r for r in rows}
    for type_name, tool, wall, rss, _ in rows:
        ref = by_key.get((type_name, "llama.cpp"))
        ratios = f"{wall / ref[2]:>10.2f}× {rss / ref[3]:>9.2f}×" if ref and tool == "malhae" else ""
        print(f"{type_name:<8} {tool:<10} {wall:>8.1f} {rss:>12.0f} {ratios}")


if __name__ == "__main__":
    main()
