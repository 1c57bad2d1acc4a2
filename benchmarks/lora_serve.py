"""What mixing LoRA adapter sets costs a server (issue 29): `malhae serve` and llama-server, 4 slots, side by side.

    python benchmarks/build_llama_tools.py --server --lora   # once: llama-server
    python benchmarks/lora_serve.py [--rounds 3] [--threads 2] [--model Q4.gguf --hf HF_FOLDER] [--json FILE]

Two random rank-16 PEFT adapters on all four linear layers of every block (alpha 16, init_lora_weights=False, seeds 0
and 1; A is the adapter `lora.py --speed` makes, B the same with seed 1; both converted by malhae to F16) on the
1.3b-shaped Q4_K_M that `python benchmarks/decode_speed.py --shaped` builds. Both servers load both adapters (malhae
`--lora A --lora B`; llama-server `--lora A,B`: given twice, its --lora keeps the last file only) with 4 slots of CTX
tokens (llama-server: -np 4 -c 4*CTX), the same threads; malhae with `--draft off` (llama-server drafts nothing by
default) and `--no-prompt-cache`, in a malhae home of its own.

Three scenarios, each 4 concurrent clients streaming one /v1/completions request (a prompt of its own, greedy,
max_tokens 64, ignore_eos, so every request generates 64 tokens), picking its set with llama-server's per-request
`lora` field:
  same:  all four `lora: [{"id": 0, "scale": 1}]` (set A);
  mixed: two with set A, two with `[{"id": 1, "scale": 1}]` (set B), sent in the order A, B, A, B;
  none:  all four `lora: [{"id": 0, "scale": 0}, {"id": 1, "scale": 0}]` (not `[]`, which llama-server takes for
         "not given": its start's scales, both adapters at 1; malhae takes it for none).
One llama_decode applies one adapter set. malhae's scheduler (app/runtime/batching.py, slots.py) decodes the slots of
one set together and lets the sets take turns, longest-waiting first; llama-server batches the slots whose set equals
that of the first busy slot in slot order. Each switch makes llama.cpp re-reserve its compute graph.

Measured per cell: aggregate tok/s (generated tokens of the four / wall time from the first request sent to the last
stream done), TTFT (request sent to the chunk of the first token) p50 and max, and per set the time its last stream
ended. The random-weight model's first tokens are often bytes of a character or empty pieces, which neither server
streams as text; llama-server sends a chunk per token anyway, malhae one per token with text or a log-probability:
so every request asks `logprobs: 0` (malhae computes the sampled token's log-probability, llama-server ignores 0), and
TTFT ends at the first chunk of a token, text or not.
Every round measures both servers (which goes first alternates) and the three scenarios (their order rotates); the
1-minute load average is printed per round. Reported: medians over the rounds, and the medians of the per-round
ratios mixed/same and same/none per server.

--switch (in-process, no server): what the scheduler's steps cost in llama.cpp itself, on one context of 4 sequences
as `serve --parallel 4` makes it: a decode of 4 rows under set A, of 2 rows under A every time, of 2 rows alternating
A and B (every decode a switch: llama.cpp re-reserves its graph), and of 4 rows with no adapter; 40 decodes each after
5 of warm-up, medians, --rounds times. Mixing turns one 4-row decode into two 2-row decodes; the switch's own cost is
the third column minus the second.
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
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llama_cpp as lc  # noqa: E402
import lora as lora_bench  # noqa: E402  benchmarks/lora.py: the adapter makers
import processes  # noqa: E402
import serve_throughput as st  # noqa: E402

from malhae.runtime.llama import Batch, Context, Model  # noqa: E402
from malhae.runtime.settings import LoadOptions, Lora  # noqa: E402

MALHAE, LLAMA_SERVER = "malhae", "llama-server"
SET_A, SET_B = [{"id": 0, "scale": 1}], [{"id": 1, "scale": 1}]
# not `lora: []`: llama-server takes an empty list for none given (its start's scales, here both adapters at 1)
NONE = [{"id": 0, "scale": 0}, {"id": 1, "scale": 0}]
SCENARIOS = {"same": [SET_A] * 4, "mixed": [SET_A, SET_B, SET_A, SET_B], "none": [NONE] * 4}


@dataclass
class Stream:
    set: str  # "A", "B" or "none"
    sent: float = 0.0
    first: float | None = None
    done: float = 0.0
    tokens: int = 0
    error: str = ""


def set_name(loras: list[dict]) -> str:
    on = [e["id"] for e in loras if e["scale"]]
    return "AB"[on[0]] if on else "none"


def stream(port: int, prompt: str, loras: list[dict], max_tokens: int, out: Stream, go: threading.Barrier) -> None:
    """One streamed completion with its adapter set, filling `out` (errors recorded, never raised)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "logprobs": 0, "lora": loras, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.connect()
        go.wait()
        out.sent = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            out.error = f"HTTP {resp.status}: {resp.read()[:300].decode(errors='replace')}"
            return
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                out.error = json.dumps(chunk["error"], ensure_ascii=False)[:300]
            if out.first is None and any(c.get("finish_reason") is None for c in chunk.get("choices") or []):
                out.first = time.perf_counter()
            if chunk.get("usage"):
                out.tokens = int(chunk["usage"].get("completion_tokens", 0))
        out.done = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - a failed request is a result, reported
        out.error = f"{type(e).__name__}: {e}"
        out.done = time.perf_counter()
    finally:
        conn.close()


def cell(server: st.Server, scenario: str, tag: str, max_tokens: int) -> dict:
    sets = SCENARIOS[scenario]
    streams = [Stream(set_name(s)) for s in sets]
    go = threading.Barrier(len(sets))
    threads = [threading.Thread(target=stream, daemon=True, args=(
        server.port, f"[{tag}-{i}] {st.PROMPT}", s, max_tokens, streams[i], go)) for i, s in enumerate(sets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [s.error for s in streams if s.error]
    if errors or any(s.tokens != max_tokens for s in streams):
        raise RuntimeError(f"{server.name} {scenario}: {errors[:1] or [s.tokens for s in streams]} (expected "
                           f"{max_tokens} tokens each)\n{st.log_tail(server)}")
    t0 = min(s.sent for s in streams)
    wall = max(s.done for s in streams) - t0
    ttft = [s.first - s.sent for s in streams]
    return {"tok_s": sum(s.tokens for s in streams) / wall, "wall_s": wall, "ttft_p50_s": statistics.median(ttft),
            "ttft_max_s": max(ttft), "set_done_s": {n: max(s.done for s in streams if s.set == n) - t0
                                                    for n in sorted({s.set for s in streams})},
            "streams": [asdict(s) for s in streams]}


def switch(args: argparse.Namespace, a: Path, b: Path) -> list[dict]:
    """Milliseconds per llama_decode (median of 40) of the scheduler's kinds of steps, --rounds times."""
    rows = []
    with Model(args.model) as model, Context(model, LoadOptions(model=args.model, ctx=args.ctx, threads=args.threads,
                                                                parallel=4)) as ctx, Batch(4) as batch:
        pos = [0] * 4

        def decode(seqs: list[int], loras: tuple[Lora, ...]) -> float:
            ctx.set_adapters(loras)
            for i, seq in enumerate(seqs):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.wants_logits[i] = 100 + i, pos[seq], 1, 1
                batch.ptr.seq_id[i][0] = seq
                pos[seq] += 1
            batch.n_tokens = len(seqs)
            t0 = time.perf_counter()
            if lc.llama_decode(ctx.ptr, batch.ptr) != 0:
                raise RuntimeError("llama_decode failed")
            lc.llama_synchronize(ctx.ptr)
            return time.perf_counter() - t0

        sa, sb = (Lora(a),), (Lora(b),)
        kinds = {"4 rows, A": lambda i: decode([0, 1, 2, 3], sa), "2 rows, A every time": lambda i: decode([0, 1], sa),
                 "2 rows, A and B in turn": lambda i: decode([0, 1], sa) if i % 2 == 0 else decode([2, 3], sb),
                 "4 rows, no adapter": lambda i: decode([0, 1, 2, 3], ())}
        for r in range(args.rounds):
            row = {}
            for name, step in kinds.items():
                ctx.clear()
                pos[:] = [0] * 4
                for _ in range(5):
                    decode([0, 1, 2, 3], sa)
                row[name] = 1000 * statistics.median(step(i) for i in range(40))
            rows.append(row)
            print(f"round {r + 1} (load {os.getloadavg()[0]:.2f}): "
                  + " | ".join(f"{n} {v:.1f} ms" for n, v in row.items()), flush=True)
    med = {n: statistics.median(row[n] for row in rows) for n in rows[0]}
    print("medians: " + " | ".join(f"{n} {v:.1f} ms" for n, v in med.items()))
    print(f"a switch costs {med['2 rows, A and B in turn'] - med['2 rows, A every time']:+.1f} ms; two 2-row decodes "
          f"cost {2 * med['2 rows, A and B in turn'] / med['4 rows, A']:.2f}× one 4-row decode")
    return rows


def adapters(args: argparse.Namespace) -> tuple[Path, Path]:
    """A: lora.py --speed's adapter (seed 0); B: the same recipe with seed 1 (each made once in --workdir)."""
    out = []
    for seed, name in ((0, "speed-r16-all-linear"), (1, "speed-r16-all-linear-seed1")):
        folder = lora_bench.peft_adapter(args.hf, args.workdir / name, 16, 16, lora_bench.ALL_LINEAR, False,
                                         seed=seed, dtype="float16")
        out.append(lora_bench.malhae_gguf(folder, args.model, args.workdir / f"{name}-f16.gguf", "f16"))
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:4]))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=512, help="context per slot (default 512)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", type=Path, default=lora_bench.SHAPED, help="the base GGUF")
    parser.add_argument("--hf", type=Path, default=lora_bench.SHAPED_HF, help="its HF folder, for the PEFT adapters")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/malhae-lora-bench"))
    parser.add_argument("--llama-server", type=Path, default=Path("/tmp/llama-tools/build/bin/llama-server"))
    parser.add_argument("--no-llama-server", action="store_true", help="measure malhae alone")
    parser.add_argument("--json", type=Path, help="also write everything measured to this file")
    parser.add_argument("--switch", action="store_true", help="measure the decode steps in-process instead (above)")
    args = parser.parse_args()
    if not (args.model.is_file() and (args.hf / "config.json").is_file()):
        parser.error(f"needs {args.model} and its HF folder {args.hf}: python benchmarks/decode_speed.py --shaped "
                     "--llama-bench PATH builds both")
    if not (args.switch or args.no_llama_server) and not args.llama_server.is_file():
        parser.error(f"no llama-server at {args.llama_server}: python benchmarks/build_llama_tools.py --server "
                     "(or --no-llama-server)")
    if args.rounds < 1:
        parser.error("--rounds takes 1 or more")
    args.workdir.mkdir(parents=True, exist_ok=True)
    a, b = adapters(args)
    print(f"adapters: A {a.name}, B {b.name} ({a.stat().st_size / 2**20:.1f} MiB each)", flush=True)
    if args.switch:
        rows = switch(args, a, b)
        if args.json:
            args.json.write_text(json.dumps({"threads": args.threads, "ctx": args.ctx, "switch": rows}, indent=1))
        return

    logs = Path(tempfile.mkdtemp(prefix="lora-serve-"))
    os.environ["MALHAE_HOME"] = str(logs / "home")  # no config.toml, store or prompt cache of the user's
    t, p, c = str(args.threads), 4, args.ctx
    port = processes.free_port()
    servers = [st.Server(MALHAE, [sys.executable, "-m", "malhae", "serve", "-m", str(args.model), "--lora", str(a),
                                  "--lora", str(b), "--port", str(port), "--parallel", str(p), "--ctx", str(c),
                                  "--threads", t, "--draft", "off", "--no-prompt-cache", "--quiet"],
                         "/health", port, [4], "usage")]
    if not args.no_llama_server:
        port = processes.free_port()
        servers.append(st.Server(LLAMA_SERVER, [str(args.llama_server), "-m", str(args.model), "--lora", f"{a},{b}",
                                                "-np", str(p), "-c", str(p * c), "-t", t, "--host", "127.0.0.1",
                                                "--port", str(port)], "/health", port, [4], "usage"))
    rows: list[dict] = []
    try:
        for s in servers:
            st.start(s, logs, 300)
            print(f"{s.name} healthy after {s.load_s:.1f} s: {' '.join(s.cmd)}", flush=True)
            for scenario in SCENARIOS:  # warm-up: every set applied once, at 8 tokens
                cell(s, scenario, f"warm-{scenario}", 8)
        names = list(SCENARIOS)
        for r in range(args.rounds):
            print(f"round {r + 1}: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
            order = servers if r % 2 == 0 else servers[::-1]
            for s in order:
                for scenario in names[r % 3:] + names[:r % 3]:
                    row = cell(s, scenario, f"r{r}-{scenario}", args.max_tokens) | {
                        "server": s.name, "scenario": scenario, "round": r}
                    rows.append(row)
                    done = ", ".join(f"{k} {v:.2f} s" for k, v in row["set_done_s"].items())
                    print(f"  {s.name:12} {scenario:5}: {row['tok_s']:6.2f} tok/s, TTFT p50 {row['ttft_p50_s']:.3f} s "
                          f"max {row['ttft_max_s']:.3f} s; done: {done}", flush=True)
    finally:
        for s in servers:
            st.stop(s)
    summary = summarize(rows, [s.name for s in servers], args.rounds)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "ctx": c, "parallel": p,
                                         "max_tokens": args.max_tokens, "adapters": [str(a), str(b)],
                                         "servers": [s.cmd for s in servers], "summary": summary, "cells": rows},
                                        indent=1, ensure_ascii=False))


def summarize(rows: list[dict], names: list[str], rounds: int) -> dict:
    def get(name: str, scenario: str, r: int) -> dict:
        return next(x for x in rows if x["server"] == name and x["scenario"] == scenario and x["round"] == r)

    out: dict = {}
    print("\n| server | scenario | aggregate tok/s | TTFT p50 (s) | TTFT max (s) | set A done (s) | set B done (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in names:
        out[name] = {}
        for scenario in SCENARIOS:
            cells = [get(name, scenario, r) for r in range(rounds)]
            m = {k: statistics.median(x[k] for x in cells) for k in ("tok_s", "ttft_p50_s", "ttft_max_s")}
            for n in ("A", "B"):
                if n in cells[0]["set_done_s"]:
                    m[f"done_{n}_s"] = statistics.median(x["set_done_s"][n] for x in cells)
            out[name][scenario] = m
            print(f"| {name} | {scenario} | {m['tok_s']:.2f} | {m['ttft_p50_s']:.3f} | {m['ttft_max_s']:.3f} | "
                  f"{m.get('done_A_s', float('nan')):.2f} | {m.get('done_B_s', float('nan')):.2f} |")
        for top, bottom in (("mixed", "same"), ("same", "none")):
            ratio = statistics.median(get(name, top, r)["tok_s"] / get(name, bottom, r)["tok_s"] for r in range(rounds))
            out[name][f"{top}/{bottom}"] = ratio
            print(f"{name}: aggregate tok/s {top}/{bottom} {ratio:.3f} (median of the per-round ratios)")
    if len(names) == 2:
        for scenario in SCENARIOS:
            ratio = statistics.median(get(names[0], scenario, r)["tok_s"] / get(names[1], scenario, r)["tok_s"]
                                      for r in range(rounds))
            out[f"{names[0]}/{names[1]} {scenario}"] = ratio
            print(f"{names[0]}/{names[1]} aggregate tok/s, {scenario}: {ratio:.3f}")
    return out


if __name__ == "__main__":
    main()
