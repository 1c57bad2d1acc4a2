"""Memory of `malhae serve --parallel 4 --ctx 2048` at each K/V type: peak RSS, and the K/V bytes llama.cpp reports
against the planner's figure.

    python benchmarks/kv_memory.py MODEL.gguf [--threads 2] [--parallel 4] [--ctx 2048] [--types f16,q8_0,q4_0]

For each type, one real `malhae serve` (the CLI, as a user starts it) on a free port; once healthy, every slot gets a
streamed request of about 1,000 prompt tokens at once, so the cache is written, not only reserved. Then the server's
peak resident memory (VmHWM in /proc/PID/status: Linux) is read and the server stopped. The K/V size is the server's
own ready line (llama.cpp's report, app.runtime.kv.summary); the planner's figure is app.runtime.offload.model_sizes
at the same cells and types.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import processes  # noqa: E402
import serve_throughput as st  # noqa: E402

from malhae.runtime import kv, offload  # noqa: E402
from malhae.runtime.gguf_info import read_info  # noqa: E402

DOCUMENT = Path(__file__).resolve().parents[1] / "models" / "data" / "ko-public-domain" / "constitution.txt"


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def measure(model: Path, kind: str, args: argparse.Namespace, logs: Path) -> dict:
    port = processes.free_port()
    server = st.Server("malhae", [sys.executable, "-m", "malhae", "serve", "-m", str(model), "--port", str(port),
                                  "--parallel", str(args.parallel), "--ctx", str(args.ctx), "--threads",
                                  str(args.threads), "--kv-cache", kind, "--quiet", "--no-prompt-cache"],
                       "/health", port, [args.parallel], "usage")
    text = DOCUMENT.read_text(encoding="utf-8")
    try:
        st.start(server, logs, timeout=300)
        go = threading.Barrier(args.parallel)
        results = [st.Result("malhae", args.parallel, 0) for _ in range(args.parallel)]
        threads = [threading.Thread(target=st.stream_one, args=(server, f"{i}. " + text[i * 1600:(i + 1) * 1600],
                                                                  8, r, go, 600))
                   for i, r in enumerate(results)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss = peak_rss(server.proc.pid)
    finally:
        st.stop(server)
    ready = re.search(r"KV cache ([^)]*)\)", server.log.read_text(errors="replace"))
    info = read_info(model)
    sizes = offload.model_sizes(info, kv.cells(args.ctx, args.parallel), kv_types=(kind, kind))
    errors = [r.error for r in results if r.error]
    return {"type": kind, "peak_rss": rss, "reported": ready.group(1) if ready else "?",
            "planned": sizes.kv_bytes_per_layer * sizes.n_layer, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    args = parser.parse_args()
    print(f"{args.model.name}: serve --parallel {args.parallel} --ctx {args.ctx}, {args.threads} threads")
    print("| K/V type | K/V reported by llama.cpp | planner | peak RSS |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as logs:
        for kind in args.types.split(","):
            r = measure(args.model, kind, args, Path(logs))
            print(f"| {kind} | {r['reported']} | {r['planned'] / 2**20:.1f} MiB | {r['peak_rss'] / 2**30:.2f} GiB |"
                  + (f" errors: {r['errors']}" if r["errors"] else ""))


if __name__ == "__main__":
    main()
