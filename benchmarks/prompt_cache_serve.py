"""What a streaming client sees while another request's document is restored from the prompt cache, or read afresh.

    python benchmarks/prompt_cache_serve.py MODEL.gguf [--threads 2] [--doc-chars 6000]

A real `malhae serve --parallel 2` in a malhae home of its own. First a request about the document (the constitution's
opening, ~2,000 tokens) is answered, so its state is saved; the server is restarted, so no slot holds it in memory.
Then client A streams 96 tokens of an unrelated prompt; half a second after A's first token, client B asks another
question about the same document. Measured: B's time to first token, and A's gaps between tokens while B starts
(the largest, and the median over A's whole answer). The same again with `--no-prompt-cache`, where B's 2,000
tokens are evaluated in the slots' shared batches.

A restore runs on the server's scheduler thread (read + CRC + llama_state_seq_set_data), so A waits for it once;
without the cache A's steps carry B's prompt chunks instead, for as long as the prompt takes to read.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import processes  # noqa: E402
import serve_throughput as st  # noqa: E402

TEXT = Path(__file__).resolve().parents[1] / "models" / "data" / "ko-public-domain" / "constitution.txt"


def stream(port: int, prompt: str, max_tokens: int, times: list[float], started: threading.Event | None = None,
           after: int = 0) -> None:
    """One streamed completion; `times` gets the time it was sent, then the arrival of every chunk; `started` is set
    after `after` of them."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    times.append(time.perf_counter())  # sent
    resp = conn.getresponse()
    for line in resp:
        if line.startswith(b"data:") and b'"choices": [{' in line:  # a token's chunk (its text may be empty)
            times.append(time.perf_counter())
            if started is not None and len(times) - 1 == after:
                started.set()
    conn.close()


def serving(model: Path, threads: int, cached: bool, home: Path) -> st.Server:
    port = processes.free_port()
    cmd = [sys.executable, "-m", "malhae", "serve", "-m", str(model), "--port", str(port), "--parallel", "2",
           "--ctx", "2560", "--threads", str(threads), "--quiet"] + ([] if cached else ["--no-prompt-cache"])
    server = st.Server("malhae", cmd, "/health", port, [2], "usage")
    st.start(server, home, timeout=300)
    return server


def run(model: Path, threads: int, doc: str, cached: bool, home: Path) -> dict:
    old = os.environ.get("MALHAE_HOME")
    os.environ["MALHAE_HOME"] = str(home)  # the servers' own cache folder
    try:
        server = serving(model, threads, cached, home)
        try:  # read once (and saved, with the cache); then a new server: no slot holds it in memory
            stream(server.port, doc + "\n\n질문: 대통령의 임기는?\n답:", 1, [])
        finally:
            st.stop(server)  # waits for the state being written
        server = serving(model, threads, cached, home)
        try:
            a: list[float] = []
            b: list[float] = []
            go = threading.Event()
            ta = threading.Thread(target=stream, args=(server.port, "대한민국의 국민은 " * 8, 96, a, go, 1))
            ta.start()
            go.wait(600)
            time.sleep(0.5)  # A is streaming
            stream(server.port, doc + "\n\n질문: 국회의원의 임기는?\n답:", 4, b)
            ta.join()
        finally:
            st.stop(server)
    finally:
        if old is None:
            os.environ.pop("MALHAE_HOME", None)
        else:
            os.environ["MALHAE_HOME"] = old
    gaps = [y - x for x, y in zip(a[1:], a[2:], strict=False)]
    during = [y - x for x, y in zip(a[1:], a[2:], strict=False) if y >= b[0]]
    return {"b_ttft": b[1] - b[0], "a_max_gap": max(during or gaps), "a_median_gap": statistics.median(gaps),
            "a_total": a[-1] - a[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--doc-chars", type=int, default=6000, help="characters of the document (~2,000 tokens)")
    args = parser.parse_args()
    doc = TEXT.read_text(encoding="utf-8")[:args.doc_chars]
    print(f"{args.model.name}, serve --parallel 2, {args.threads} threads")
    print("| prompt cache | B's first token | A's largest gap while B starts | A's median gap | A's 96 tokens |")
    print("|---|---:|---:|---:|---:|")
    for cached in (True, False):
        with tempfile.TemporaryDirectory() as home:
            r = run(args.model, args.threads, doc, cached, Path(home))
        print(f"| {'on (restored)' if cached else 'off (read)'} | {r['b_ttft']:.2f} s | {r['a_max_gap']:.2f} s | "
              f"{r['a_median_gap'] * 1000:.0f} ms | {r['a_total']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
