"""Merge before quantizing, side by side: `malhae convert --merge-lora -t q4_k_m` vs upstream llama.cpp's path.

    python benchmarks/lora_merge.py [--workdir DIR] [--repeat 2] [--rank 16] [--llama-src DIR] [--tools DIR]

Upstream's path is four steps (llama.cpp has no merge in its converter): convert_hf_to_gguf.py (base → F16),
convert_lora_to_gguf.py (PEFT adapter → adapter GGUF), llama-export-lora (merged F16) and llama-quantize (Q4_K_M).
malhae's is one command that merges in f32 while the checkpoint streams and quantizes with the same
llama_model_quantize. Both are timed with /usr/bin/time (wall seconds, peak RSS of each step; upstream's time is
the sum, its RSS the largest step's), alternating, on a random-weight checkpoint shaped like polyglot-ko-1.3b with a
random rank-16 LoRA on every linear layer (no rslora: upstream's converter ignores it). Upstream tools come from
benchmarks/build_llama_tools.py --lora (llama-export-lora, llama-quantize); the converters from the same source.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from convert_cost import make_checkpoint, timed, upstream_converter  # noqa: E402

TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def make_adapter(src: Path, out: Path, rank: int, seed: int = 0) -> Path:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors, PEFT's key names) with random A and
    B, written with numpy: loading a 1.3B model in torch just to save random matrices would cost gigabytes."""
    import numpy as np
    from safetensors.numpy import save_file

    if (out / "adapter_model.safetensors").is_file():
        return out
    cfg = json.loads((src / "config.json").read_text())
    d, ff, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    shapes = {"attention.query_key_value": (3 * d, d), "attention.dense": (d, d), "mlp.dense_h_to_4h": (ff, d),
              "mlp.dense_4h_to_h": (d, ff)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(layers):
        for module, (rows, cols) in shapes.items():
            key = f"base_model.model.gpt_neox.layers.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, cols)) / np.sqrt(cols)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((rows, rank)) * 0.01).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
        "base_model_name_or_path": str(src), "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
        "task_type": "CAUSAL_LM"}))
    return out


def upstream(src: Path, adapter: Path, work: Path, tools: Path, convert_hf: Path, env: dict) -> tuple[float, float]:
    """Upstream's four steps: (total wall seconds, largest peak RSS in MB)."""
    lora_script = convert_hf.parent / "convert_lora_to_gguf.py"
    steps = [
        [sys.executable, str(convert_hf), str(src), "--outtype", "f16", "--outfile", str(work / "up-base-f16.gguf")],
        [sys.executable, str(lora_script), str(adapter), "--base", str(src), "--outtype", "f16", "--outfile",
         str(work / "up-adapter.gguf")],
        [str(tools / "llama-export-lora"), "-m", str(work / "up-base-f16.gguf"), "--lora",
         str(work / "up-adapter.gguf"), "-o", str(work / "up-merged-f16.gguf"), "-t", "2"],
        [str(tools / "llama-quantize"), str(work / "up-merged-f16.gguf"), str(work / "up-merged-q4_k_m.gguf"),
         "Q4_K_M", "2"],
    ]
    walls, rss = [], []
    for cmd in steps:
        wall, peak = timed(cmd, env)
        walls.append(wall)
        rss.append(peak)
    print(f"  upstream steps: {', '.join(f'{w:.1f} s / {r:.0f} MB' for w, r in zip(walls, rss, strict=True))}",
          flush=True)
    for name in ("up-base-f16.gguf", "up-merged-f16.gguf"):
        (work / name).unlink(missing_ok=True)
    return sum(walls), max(rss)


def malhae(src: Path, adapter: Path, work: Path) -> tuple[float, float]:
    return timed([sys.executable, "-m", "malhae", "convert", str(src), "--merge-lora", str(adapter), "-t", "q4_k_m",
                  "-o", str(work / "malhae-merged-q4_k_m.gguf"), "--threads", "2", "--force"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/malhae-lora-merge"))
    parser.add_argument("--checkpoint", type=Path, help="a polyglot-shaped HF folder (default: build a 1.3b-shaped)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--llama-src", type=Path, default=None, help="llama.cpp source with the converters")
    parser.add_argument("--tools", type=Path, required=True, help="folder with llama-export-lora and llama-quantize")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.checkpoint or make_checkpoint(args.workdir)
    adapter = make_adapter(src, args.workdir / f"adapter-r{args.rank}", args.rank)
    convert_hf, env = upstream_converter(args.workdir, args.llama_src)
    shutil.copy((args.llama_src or convert_hf.parent) / "convert_lora_to_gguf.py", convert_hf.parent)
    results: dict[str, list[tuple[float, float]]] = {"malhae": [], "upstream": []}
    for i in range(args.repeat):
        for tool in (("malhae", "upstream") if i % 2 == 0 else ("upstream", "malhae")):
            run = malhae(src, adapter, args.workdir) if tool == "malhae" else upstream(
                src, adapter, args.workdir, args.tools, convert_hf, env)
            results[tool].append(run)
            print(f"run {i + 1} {tool}: {run[0]:.1f} s, peak {run[1]:.0f} MB", flush=True)
    m_wall = statistics.median(w for w, _ in results["malhae"])
    u_wall = statistics.median(w for w, _ in results["upstream"])
    m_rss = max(r for _, r in results["malhae"])
    u_rss = max(r for _, r in results["upstream"])
    shape = "polyglot-ko-1.3b-shaped" if args.checkpoint is None else args.checkpoint.name
    print(f"\n{shape}, rank-{args.rank} LoRA on every linear layer, merged then Q4_K_M, 2 threads:")
    print(f"  malhae convert --merge-lora: {m_wall:.1f} s, peak {m_rss:.0f} MB")
    print(f"  upstream (convert, convert_lora, export-lora, quantize): {u_wall:.1f} s, peak {u_rss:.0f} MB")
    print(f"  time ratio malhae/upstream {m_wall / u_wall:.2f}, RSS ratio {m_rss / u_rss:.2f}")
    for name in ("malhae-merged-q4_k_m.gguf", "up-merged-q4_k_m.gguf"):
        path = args.workdir / name
        if path.exists():
            print(f"  {name}: {path.stat().st_size / 1e6:.0f} MB")
    os.sync()


if __name__ == "__main__":
    main()
