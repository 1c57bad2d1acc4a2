"""Serving throughput: `malhae serve` against upstream llama-server (and llama-cpp-python's own server), side by side.

    python benchmarks/build_llama_tools.py --server      # once: builds llama-server from the same llama.cpp source
    python benchmarks/serve_throughput.py MODEL.gguf [--threads 2] [--parallel 4] [--ctx 1024] [--clients 1,4,8]
        [--max-tokens 64] [--rounds 2] [--llama-server PATH] [--no-llama-cpp-python] [--json FILE]

Starts every server once on the same GGUF with the same threads and slots (malhae: `--parallel P --ctx C`, C per slot;
llama-server: `-np P -c P*C`, its -c being the total split among slots; llama_cpp.server: one context of C, one
request at a time), waits for each to answer its health check, sends each one warm-up request, then measures in
rounds, alternating which server goes first. A cell is N concurrent clients, each streaming one `/v1/completions`
request (temperature 0, max_tokens as given, a prompt of its own so that no server reuses another's cache). Only one
server is measured at a time; the others sit idle.

- aggregate tok/s: generated tokens of all N clients / wall time from the first request sent to the last stream done.
  Generated tokens are what the server reports (`stream_options.include_usage`; llama-server's final usage) — not
  max_tokens: random-weight models may end early at an end token, and neither ignore_eos nor logit_bias is available in
  malhae. llama_cpp.server reports no usage when streaming: its count is max_tokens when it finished for "length",
  else the number of chunks with text (a lower bound: a token ending inside a character, common with byte-level
  tokens on Korean text, sends no text; so do malhae and llama-server, whence no chunk counting for them).
- TTFT: from a client's request sent to its first chunk with text (the first token that completes a character),
  pooled over the rounds (p50, p95 interpolated).
- ratio: malhae's aggregate tok/s over llama-server's at the same number of clients (means over the rounds).

llama_cpp.server is measured at 4 clients only (when `python -m llama_cpp.server` imports, i.e. the
`llama-cpp-python[server]` extras are installed; else it is skipped with a note). It runs with
`--interrupt_requests False`: by default a second concurrent stream cuts the first one off.

Every server is killed at the end, also on Ctrl-C or an error. The servers' logs go to a temporary folder, shown when a
server fails. Measure on a quiet machine: other work skews the comparison more than anything measured here.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import processes  # benchmarks/processes.py, beside this script

from malhae import children

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("대한민국 헌법 제1조 대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, "
          "모든 권력은 국민으로부터 나온다. 제2조 대한민국의 국민이 되는 요건은 법률로 정한다.")
MALHAE, LLAMA_SERVER, LLAMA_CPP_PYTHON = "malhae", "llama-server", "llama_cpp.server"


@dataclass
class Server:
    name: str
    cmd: list[str]
    health: str  # a GET path that answers 200 once the model is loaded
    port: int | None  # None: read from the log (malhae --port 0)
    clients: list[int]
    usage: str  # how generated tokens are counted: "usage" or "chunks"
    log: Path | None = None
    proc: subprocess.Popen | None = None
    load_s: float = 0.0


@dataclass
class Result:
    """One streamed request."""

    server: str
    clients: int
    round: int
    sent: float = 0.0  # perf_counter
    first: float | None = None  # first chunk with text
    done: float = 0.0
    tokens: int = 0  # generated tokens as the server counts them (chunks for llama_cpp.server)
    chunks: int = 0  # SSE chunks with text
    finish: str | None = None
    error: str = ""
    usage: dict | None = field(default=None, repr=False)


def log_tail(server: Server, n: int = 20) -> str:
    if server.log is None or not server.log.exists():
        return ""
    return "\n".join(server.log.read_text(errors="replace").splitlines()[-n:])


def start(server: Server, logs: Path, timeout: float) -> None:
    """Start the server and return once its health check answers 200 (RuntimeError if it dies or times out)."""
    server.log = logs / f"{server.name}.log"
    env = os.environ | {"COLUMNS": "400", "PYTHONUNBUFFERED": "1"}  # malhae's rich messages on one line each
    t0 = time.perf_counter()
    with open(server.log, "wb") as log:
        # tied to this process (malhae.children): a benchmark killed with -9 leaves no server behind
        server.proc = children.popen(server.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=env, cwd=ROOT)
    while time.perf_counter() - t0 < timeout:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited ({server.proc.returncode}) while loading:\n{log_tail(server)}")
        if server.port is None:
            m = re.search(r"serving on http://[^\s:]+:(\d+)", server.log.read_text(errors="replace"))
            if m:
                server.port = int(m.group(1))
        if server.port is not None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
                conn.request("GET", server.health)
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    server.load_s = time.perf_counter() - t0
                    return
            except OSError:
                pass
        time.sleep(0.25)
    raise RuntimeError(f"{server.name} did not become healthy in {timeout:.0f} s:\n{log_tail(server)}")


def stop(server: Server) -> None:
    processes.stop(server.proc)


def stream_one(server: Server, prompt: str, max_tokens: int, result: Result, go: threading.Barrier,
               timeout: float) -> None:
    """One streamed /v1/completions request, filling `result` (errors recorded, never raised)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if server.usage == "usage":
        body["stream_options"] = {"include_usage": True}
    payload = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.connect()  # connect before the barrier: the clock starts at the request, not at the TCP handshake
        go.wait()
        result.sent = time.perf_counter()
        conn.request("POST", "/v1/completions", payload, {"Content-Type": "application/json",
                                                          "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            result.error = f"HTTP {resp.status}: {resp.read()[:300].decode(errors='replace')}"
            return
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = json.dumps(chunk["error"], ensure_ascii=False)[:300]
                continue
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    result.chunks += 1
                    if result.first is None:
                        result.first = time.perf_counter()
                if choice.get("finish_reason"):
                    result.finish = choice["finish_reason"]
            if chunk.get("usage"):
                result.usage = chunk["usage"]
        result.done = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - a failed request is a result, reported in the table
        result.error = f"{type(e).__name__}: {e}"
        result.done = time.perf_counter()
    finally:
        conn.close()
    if server.usage == "usage" and result.usage is not None:
        result.tokens = int(result.usage.get("completion_tokens", 0))
    elif server.usage == "usage" and not result.error:
        result.error = "no usage in the stream"
        result.tokens = result.chunks
    elif result.finish == "length" and not result.error:
        result.tokens = max_tokens  # all it was asked for (the prompt is short: the context did not end it)
    else:
        result.tokens = result.chunks  # a lower bound: a token that ends inside a character sends no text


def measure(server: Server, clients: int, rnd: int, max_tokens: int, timeout: float, tag: str) -> list[Result]:
    results = [Result(server.name, clients, rnd) for _ in range(clients)]
    go = threading.Barrier(clients)
    threads = [threading.Thread(target=stream_one, daemon=True,
                                args=(server, f"[{tag}-{i}] {PROMPT}", max_tokens, results[i], go, timeout))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def cell_summary(results: list[Result]) -> dict:
    """Aggregate tok/s per round (then their mean), TTFT percentiles pooled over rounds."""
    per_round = []
    for rnd in sorted({r.round for r in results}):
        rs = [r for r in results if r.round == rnd]
        wall = max(r.done for r in rs) - min(r.sent for r in rs)
        tokens = sum(r.tokens for r in rs)
        per_round.append({"round": rnd, "tokens": tokens, "wall_s": round(wall, 3),
                          "tok_s": round(tokens / wall, 2) if wall > 0 else None})
    ttft = [r.first - r.sent for r in results if r.first is not None]
    rates = [p["tok_s"] for p in per_round if p["tok_s"] is not None]
    p50, p95 = percentile(ttft, 0.5), percentile(ttft, 0.95)
    return {"tok_s": round(statistics.mean(rates), 2) if rates else None,
            "ttft_p50_s": round(p50, 3) if p50 is not None else None,
            "ttft_p95_s": round(p95, 3) if p95 is not None else None,
            "tokens_per_request": round(statistics.mean(r.tokens for r in results), 1),
            "errors": sum(bool(r.error) for r in results), "rounds": per_round,
            "finish": dict(sorted({str(r.finish): sum(str(x.finish) == str(r.finish) for x in results)
                                   for r in results}.items()))}


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table(summary: dict[tuple[str, int], dict]) -> str:
    lines = ["| server | clients | aggregate tok/s | TTFT p50 (s) | TTFT p95 (s) | tokens/request | errors | "
             "malhae / llama-server |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (name, clients), s in summary.items():
        ratio = ""
        anchor = summary.get((LLAMA_SERVER, clients))
        if name == MALHAE and anchor and anchor["tok_s"] and s["tok_s"] is not None:
            ratio = f"{s['tok_s'] / anchor['tok_s']:.2f}"
        lines.append(f"| {name} | {clients} | {fmt(s['tok_s'], '.1f')} | {fmt(s['ttft_p50_s'], '.2f')} | "
                     f"{fmt(s['ttft_p95_s'], '.2f')} | {s['tokens_per_request']} | {s['errors']} | {ratio} |")
    return "\n".join(lines)


def has_llama_cpp_server() -> str | None:
    """None when `python -m llama_cpp.server` can start, else why not."""
    probe = subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], capture_output=True, text=True)
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
    return f"{last} (pip install 'llama-cpp-python[server]')"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:5]))
    parser.add_argument("model", type=Path, help="the GGUF file all servers load")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4, help="slots of malhae and llama-server")
    parser.add_argument("--ctx", type=int, default=1024, help="context per slot")
    parser.add_argument("--clients", default="1,4,8", help="concurrent clients per cell, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the server order alternates between them")
    parser.add_argument("--llama-server", type=Path, default=processes.default_llama_server(),
                        help="upstream llama-server binary (default: build_llama_tools.py --server's)")
    parser.add_argument("--no-llama-server", action="store_true", help="measure without upstream llama-server")
    parser.add_argument("--no-llama-cpp-python", action="store_true", help="skip llama_cpp.server")
    parser.add_argument("--load-timeout", type=float, default=600, help="seconds a server may take to load")
    parser.add_argument("--request-timeout", type=float, default=600, help="seconds a request may stay silent")
    parser.add_argument("--json", type=Path, help="also write everything measured (per request too) to this file")
    args = parser.parse_args()
    model = args.model.resolve()
    if not model.is_file():
        parser.error(f"{model}: no such file")
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if not clients or min(clients) < 1 or args.rounds < 1:
        parser.error("--clients takes positive numbers and --rounds at least 1")

    t, p, c = str(args.threads), args.parallel, args.ctx
    servers = [Server(MALHAE, [sys.executable, "-m", "malhae", "serve", "-m", str(model), "--port", "0", "--parallel",
                               str(p), "--ctx", str(c), "--threads", t], "/health", None, clients, "usage")]
    if args.no_llama_server:
        pass
    elif args.llama_server.is_file():
        port = processes.free_port()
        servers.append(Server(LLAMA_SERVER, [str(args.llama_server), "-m", str(model), "-np", str(p), "-c",
                                             str(p * c), "-t", t, "--host", "127.0.0.1", "--port", str(port)],
                              "/health", port, clients, "usage"))
    else:
        print(f"note: no llama-server at {args.llama_server} (python benchmarks/build_llama_tools.py --server); "
              "measuring without it", file=sys.stderr)
    if not args.no_llama_cpp_python:
        why = has_llama_cpp_server()
        if why:
            print(f"note: skipping llama_cpp.server: {why}", file=sys.stderr)
        elif 4 not in clients:
            print("note: skipping llama_cpp.server: it is measured at 4 clients only", file=sys.stderr)
        else:
            port = processes.free_port()
            servers.append(Server(LLAMA_CPP_PYTHON, [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                                                     "--n_threads", t, "--n_threads_batch", t, "--n_ctx", str(c),
                                                     "--host", "127.0.0.1", "--port", str(port),
                                                     "--interrupt_requests", "False"],
                                  "/v1/models", port, [4], "chunks"))

    # SIGTERM (and SIGHUP) end the run like Ctrl-C does: through the finally below, which stops every server
    def interrupted(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    results: list[Result] = []
    logs = Path(tempfile.mkdtemp(prefix="serve-throughput-"))
    print(f"server logs: {logs}", file=sys.stderr)
    try:
        for s in servers:
            print(f"starting {s.name}: {' '.join(s.cmd)}", file=sys.stderr)
            start(s, logs, args.load_timeout)
            print(f"  healthy after {s.load_s:.1f} s on port {s.port}", file=sys.stderr)
            warm = measure(s, 1, -1, 8, args.request_timeout, "warm")[0]
            if warm.error:
                print(f"  warm-up request failed: {warm.error}", file=sys.stderr)
        for rnd in range(args.rounds):
            order = servers if rnd % 2 == 0 else servers[::-1]
            for n in clients:
                for s in order:
                    if n not in s.clients:
                        continue
                    rs = measure(s, n, rnd, args.max_tokens, args.request_timeout, f"r{rnd}-c{n}")
                    results.extend(rs)
                    wall = max(r.done for r in rs) - min(r.sent for r in rs)
                    errors = [r.error for r in rs if r.error]
                    print(f"round {rnd + 1}/{args.rounds} {s.name:16} {n} clients: {sum(r.tokens for r in rs)} "
                          f"tokens in {wall:.2f} s" + (f"; {len(errors)} errors, e.g. {errors[0]}" if errors else ""),
                          file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted: stopping the servers", file=sys.stderr)
        raise SystemExit(130) from None
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        for s in servers:
            stop(s)

    summary = {}
    for n in clients:
        for s in servers:
            rs = [r for r in results if r.server == s.name and r.clients == n]
            if rs:
                summary[(s.name, n)] = cell_summary(rs)
    print(f"\n{model.name}, {args.threads} threads, {args.parallel} slots × {args.ctx} ctx, max_tokens "
          f"{args.max_tokens}, {args.rounds} rounds\n")
    print(table(summary))
    if args.json:
        out = {"model": str(model), "threads": args.threads, "parallel": args.parallel, "ctx": args.ctx,
               "max_tokens": args.max_tokens, "rounds": args.rounds,
               "servers": [{"name": s.name, "cmd": s.cmd, "load_s": round(s.load_s, 2), "counts": s.usage}
                           for s in servers],
               "summary": [{"server": k[0], "clients": k[1], **v} for k, v in summary.items()],
               "requests": [asdict(r) | {"ttft_s": None if r.first is None else round(r.first - r.sent, 4),
                                         "seconds": round(r.done - r.sent, 4)} for r in results]}
        args.json.write_text(json.dumps(out, indent=2, ensure_ascii=False))
        print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
