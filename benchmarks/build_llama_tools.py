"""Build llama.cpp's own llama-bench, llama-quantize, llama-perplexity and llama-imatrix from llama-cpp-python's source.

    python benchmarks/build_llama_tools.py [--dest DIR] [--cuda] [--server] [--speculative] [--lora]

These are the anchors malhae is measured against (same llama.cpp version as the engine uses). The source comes from
the llama-cpp-python source distribution on PyPI (`pip download`); nothing is committed. About 9 minutes on 2 cores.
`--server` also builds upstream `llama-server` (configured with LLAMA_BUILD_SERVER and LLAMA_BUILD_EXAMPLES on, the
anchor for `malhae serve`; about 8 more minutes on 2 cores); it reconfigures the same build directory. `--lora`
also builds `llama-export-lora` (a tool, built without the server's flags: upstream's merge of LoRA adapters into a
base GGUF, the anchor for merging in benchmarks/lora.py; benchmarks/lora.py's run-time comparison needs --server).
Prints the directory holding the binaries.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TARGETS = ["llama-bench", "llama-quantize", "llama-perplexity", "llama-imatrix"]
SERVER_TARGETS = ["llama-server"]
SPECULATIVE_TARGETS = ["llama-lookup", "llama-speculative-simple"]  # the anchors of benchmarks/speculative.py
LORA_TARGETS = ["llama-export-lora"]  # upstream's adapter merge (tools/export-lora)


def main() -> None:
    version = importlib.metadata.version("llama-cpp-python")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path.home() / ".cache" / "malhae" / f"llama-tools-{version}")
    parser.add_argument("--cuda", action="store_true", help="build with -DGGML_CUDA=on")
    parser.add_argument("--server", action="store_true", help="also build llama-server (the anchor for malhae serve)")
    parser.add_argument("--speculative", action="store_true", help="also build llama-lookup and "
                        "llama-speculative-simple (examples: configured as --server is)")
    parser.add_argument("--lora", action="store_true", help="also build llama-export-lora (upstream's LoRA merge)")
    args = parser.parse_args()
    args.server = args.server or args.speculative
    targets = TARGETS + (SERVER_TARGETS if args.server else []) + (SPECULATIVE_TARGETS if args.speculative else []) \
        + (LORA_TARGETS if args.lora else [])
    bin_dir = args.dest / "build" / "bin"
    if all((bin_dir / t).is_file() for t in targets):
        print(bin_dir)
        return
    src = args.dest / "llama.cpp"
    if not src.is_dir():
        args.dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.dest) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                            "-d", tmp, f"llama-cpp-python=={version}"], check=True)
            with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
                tar.extractall(tmp, filter="data")
            os.replace(next(Path(tmp).glob("llama_cpp_python-*")) / "vendor" / "llama.cpp", src)
    server = "ON" if args.server else "OFF"
    flags = ["-DLLAMA_BUILD_TESTS=OFF", f"-DLLAMA_BUILD_EXAMPLES={server}", f"-DLLAMA_BUILD_SERVER={server}",
             "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"] + (["-DGGML_CUDA=on"] if args.cuda else [])
    subprocess.run(["cmake", "-S", str(src), "-B", str(args.dest / "build"), *flags], check=True)
    subprocess.run(["cmake", "--build", str(args.dest / "build"), "-j", str(os.cpu_count() or 2),
                    "--target", *targets], check=True)
    print(bin_dir)


if __name__ == "__main__":
    main()
