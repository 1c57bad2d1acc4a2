"""Several models behind one `malhae serve` (issue 31): switching cost, decode while another loads, memory over cycles.

    python benchmarks/decode_speed.py --shaped --llama-bench PATH   # once: the 1.3b-shaped Q4_K_M
    python benchmarks/serve_models.py [--rounds 5] [--cycles 20] [--model PATH] [--threads 2] [--json FILE]

One real `malhae serve` (no -m: the store by name) in a temporary MALHAE_HOME whose store holds the model twice, as
`big-a` and `big-b`: two hard links to one file (a copy where a link cannot be made), so one copy sits in the page
cache and both models map the same pages. Server flags: --threads T --parallel P --ctx C (defaults 2, 1, 512),
--draft off (the random-weight model's repetitive output would let lookup decoding skew token rates),
--no-prompt-cache (nothing restored from disk), --keep-alive 10m; the requests' keep_alive decides what unloads.
Every request is a streamed /v1/completions, greedy, `logprobs: 0` (one chunk per token, text or not: the
random-weight model's first tokens are often pieces of a character) and a prompt that starts with a tag of its own,
so no slot reuses another request's prefix. The server is tied to this process (malhae.children) and stopped in a
finally.

1. switch: time to first token (request sent → first token's chunk; 8 tokens) of big-a when it is not loaded
   (unloaded with Ollama's empty prompt + keep_alive 0, its file read once more so the page cache is warm) and when
   it is; the order alternates per round. Also the load alone (an empty-prompt /api/generate preload, timed by the
   client), and Ollama's `load_duration` of one cold non-streamed /api/generate.
2. decode: big-a's token rate over a greedy stream of --max-tokens (ignore_eos) alone, and with big-b loaded and
   unloaded over and over from its 20th token until the stream ends (preload, then keep_alive 0; one after the
   other). Rates: overall (first token to last) and inside the load windows (tokens that arrived while a preload was
   in flight / the windows' time), with the largest gap between tokens. Alone and with-load alternate. During each
   stream every thread of the server is sampled (/proc/PID/task/*/stat: CPU time and nice) to show where the cores go.
   --renice (root): the variant with every server thread set to nice 0 once big-a is loaded, so that big-a's decoding
   threads outrank the loader (niced +10) instead of inheriting its nice (what they did before commit 39783c5; since
   then they are born at the server's priority and the variant changes nothing).
3. memory: the server's RSS (/proc/PID/status) before any load, then --cycles times: load big-a with one short
   request, read RSS (loaded), unload (keep_alive 0; the answer comes once the memory is back), read RSS again.

Medians with ranges (min–max) over the rounds; ratios are per round, then their median. Never absolute: the machine is
shared; the 1-minute load average is printed per round.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import processes  # benchmarks/processes.py, beside this script
import serve_throughput as st  # its Server, start (health wait, port from the log) and stop

SHAPED = Path("/tmp/malhae-decode-speed/polyglot-ko-1.3b-shaped-q4_k_m.gguf")  # decode_speed.py --shaped's
A, B = "big-a", "big-b"
SHORT = "대한민국의 주권은"
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Stream:
    sent: float = 0.0
    times: list[float] = field(default_factory=list)  # perf_counter of each token's chunk
    tokens: int = 0  # completion_tokens as the server counts them
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent

    @property
    def rate(self) -> float:
        """Tokens per second from the first token to the last (the decode, without the prompt)."""
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def call(port: int, path: str, body: dict | None = None, timeout: float = 600) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET" if body is None else "POST", path, None if body is None else json.dumps(body).encode(),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{path}: HTTP {resp.status}: {data[:300].decode(errors='replace')}")
        return json.loads(data)
    finally:
        conn.close()


def preload(port: int, name: str, keep_alive: object = "10m") -> float:
    """Ollama's empty-prompt request: loads (keep_alive 0: unloads, once the memory is back); its wall seconds."""
    t0 = time.perf_counter()
    call(port, "/api/generate", {"model": name, "prompt": "", "keep_alive": keep_alive, "stream": False})
    return time.perf_counter() - t0


def loaded(port: int) -> list[str]:
    return [m["name"] for m in call(port, "/api/ps")["models"]]


def stream(port: int, name: str, prompt: str, max_tokens: int, out: Stream | None = None) -> Stream:
    """One streamed greedy /v1/completions of exactly max_tokens tokens, each chunk's arrival timed."""
    out = out or Stream()
    body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0, "keep_alive": "10m", "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.connect()
        out.sent = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            out.error = f"HTTP {resp.status}: {resp.read()[:300].decode(errors='replace')}"
        for line in resp if not out.error else ():
            line = line.strip()
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            now, chunk = time.perf_counter(), json.loads(line[5:])
            if "error" in chunk:
                out.error = json.dumps(chunk["error"], ensure_ascii=False)[:300]
            if any(c.get("finish_reason") is None for c in chunk.get("choices") or []):
                out.times.append(now)
            if chunk.get("usage"):
                out.tokens = int(chunk["usage"].get("completion_tokens", 0))
    except Exception as e:  # noqa: BLE001 - reported below
        out.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    if out.error or out.tokens != max_tokens or len(out.times) != max_tokens:
        raise RuntimeError(f"{name}: {out.error or f'{out.tokens} tokens, {len(out.times)} chunks'} (expected "
                           f"{max_tokens})")
    return out


def rss(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def warm_cache(path: Path) -> None:
    """Read the file through, so that a load maps pages already in memory (a warm page cache)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass


class Threads:
    """Samples every thread of a process (/proc/PID/task/TID/stat) until stopped: CPU seconds and nice per thread,
    and whether the thread existed when sampling began."""

    def __init__(self, pid: int) -> None:
        self.pid, self.seen, self.first = pid, {}, {}
        self._stop = threading.Event()
        self._read(initial=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self, initial: bool = False) -> None:
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                fields = task.joinpath("stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            cpu, nice = (int(fields[11]) + int(fields[12])) / TICK, int(fields[16])
            tid = int(task.name)
            self.first.setdefault(tid, (cpu, initial))
            self.seen[tid] = (cpu, nice)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._read()

    def stop(self) -> dict:
        """CPU seconds used while sampling, by the threads that were there (`old`) and those born since (`new`), the
        nice values of each kind, and the busiest old threads' (the decoding ones) CPU seconds and nice."""
        self._stop.set()
        self._thread.join()
        self._read()
        used = {tid: (cpu - self.first[tid][0], nice, self.first[tid][1]) for tid, (cpu, nice) in self.seen.items()}
        old = sorted(((u, n) for u, n, was in used.values() if was), reverse=True)
        new = [(u, n) for u, n, was in used.values() if not was]
        return {"old_cpu_s": round(sum(u for u, _ in old), 2), "new_cpu_s": round(sum(u for u, _ in new), 2),
                "new_threads": len(new), "new_nice": sorted({n for _, n in new}),
                "busiest_old": [(round(u, 2), n) for u, n in old[:3]]}


def max_gap(times: list[float]) -> float:
    return max(b - a for a, b in itertools.pairwise(times))


def spread(values: list[float | None], spec: str = ".2f") -> str:
    """Median (min–max) of the values measured (None: no such window in that round)."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return f"{format(statistics.median(values), spec)} ({format(min(values), spec)}–{format(max(values), spec)})"


def switch(port: int, model: Path, rounds: int) -> dict:
    """Part 1: time to first token of big-a not loaded vs loaded, alternating; the load alone; load_duration."""
    rows = []
    for r in range(rounds):
        row: dict = {"round": r, "load_avg": os.getloadavg()[0]}
        for kind in ("cold", "warm") if r % 2 == 0 else ("warm", "cold"):
            if kind == "cold":
                preload(port, A, 0)
                warm_cache(model)
            elif A not in loaded(port):
                preload(port, A)
            row[f"{kind}_ttft_s"] = stream(port, A, f"[r{r}-{kind}] {SHORT}", 8).ttft
        preload(port, A, 0)
        warm_cache(model)
        row["preload_s"] = preload(port, A)
        rows.append(row)
        print(f"  round {r + 1} (load {row['load_avg']:.2f}): TTFT not loaded {row['cold_ttft_s']:.3f} s, loaded "
              f"{row['warm_ttft_s']:.3f} s; preload {row['preload_s']:.3f} s", flush=True)
    preload(port, A, 0)
    warm_cache(model)
    t0 = time.perf_counter()
    told = call(port, "/api/generate", {"model": A, "prompt": f"[ollama] {SHORT}", "stream": False,
                                        "options": {"temperature": 0, "num_predict": 4}})
    wall = time.perf_counter() - t0
    out = {"rounds": rows, "ollama_cold": {"wall_s": wall, "load_duration_ns": told.get("load_duration"),
                                           "total_duration_ns": told.get("total_duration")}}
    for key in ("cold_ttft_s", "warm_ttft_s", "preload_s"):
        out[key] = statistics.median(x[key] for x in rows)
    out["cold_minus_warm_s"] = statistics.median(x["cold_ttft_s"] - x["warm_ttft_s"] for x in rows)
    out["cold_over_warm"] = statistics.median(x["cold_ttft_s"] / x["warm_ttft_s"] for x in rows)
    return out


def with_loads(port: int, pid: int, prompt: str, max_tokens: int) -> tuple[Stream, list, list, dict]:
    """big-a's stream while big-b is loaded and unloaded over and over from its 20th token on."""
    s, windows, unloads = Stream(), [], []
    streaming = threading.Thread(target=lambda: stream(port, A, prompt, max_tokens, s), daemon=True)
    sampler = Threads(pid)
    streaming.start()
    while streaming.is_alive() and len(s.times) < 20:
        time.sleep(0.01)
    while streaming.is_alive():
        t0 = time.perf_counter()
        preload(port, B)
        t1 = time.perf_counter()
        preload(port, B, 0)
        windows.append((t0, t1))
        unloads.append((t1, time.perf_counter()))
    streaming.join()
    cpu = sampler.stop()
    if len(s.times) != max_tokens:
        raise RuntimeError(f"{A} under loads: {s.error or f'{len(s.times)} tokens'}")
    return s, windows, unloads, cpu


def inside(times: list[float], windows: list[tuple[float, float]]) -> tuple[int, float]:
    """Tokens that arrived inside the windows (those ending before the stream's last token), and the windows' time."""
    last = times[-1]
    spans = [(a, min(b, last)) for a, b in windows if a < last]
    return sum(any(a < t <= b for a, b in spans) for t in times), sum(b - a for a, b in spans)


def decode(port: int, pid: int, rounds: int, max_tokens: int, renice: bool) -> dict:
    """Part 2: big-a's token rate alone vs while big-b loads and unloads, alternating."""
    preload(port, A)
    stream(port, A, f"[warm-up] {SHORT}", 8)  # big-a's decoding threads exist from here on
    if renice:
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.setpriority(os.PRIO_PROCESS, int(task.name), 0)
    rows = []
    for r in range(rounds):
        row: dict = {"round": r, "load_avg": os.getloadavg()[0]}
        for kind in ("alone", "loads") if r % 2 == 0 else ("loads", "alone"):
            prompt = f"[r{r}-{kind}] {st.PROMPT}"
            if kind == "alone":
                sampler = Threads(pid)
                s = stream(port, A, prompt, max_tokens)
                row["alone_cpu"] = sampler.stop()
                row["alone_tok_s"] = s.rate
                row["alone_max_gap_s"] = max_gap(s.times)
                continue
            s, windows, unloads, cpu = with_loads(port, pid, prompt, max_tokens)
            n, secs = inside(s.times, windows)
            un, usecs = inside(s.times, unloads)
            row |= {"loads_tok_s": s.rate, "in_load_tok_s": n / secs if secs else None, "loads": len(windows),
                    "load_window_s": secs, "in_unload_tok_s": un / usecs if usecs else None,
                    "loads_max_gap_s": max_gap(s.times), "loads_cpu": cpu,
                    "load_each_s": [round(b - a, 3) for a, b in windows],
                    "unload_each_s": [round(b - a, 3) for a, b in unloads]}
        row["overall_ratio"] = row["loads_tok_s"] / row["alone_tok_s"]
        row["in_load_ratio"] = row["in_load_tok_s"] and row["in_load_tok_s"] / row["alone_tok_s"]
        rows.append(row)
        print(f"  round {r + 1} (load {row['load_avg']:.2f}): alone {row['alone_tok_s']:.2f} tok/s; with loads "
              f"{row['loads_tok_s']:.2f} overall, {row['in_load_tok_s'] or 0:.2f} inside {row['loads']} loads "
              f"({row['load_window_s']:.2f} s), {row['in_unload_tok_s'] or 0:.2f} inside unloads; max gap "
              f"{row['alone_max_gap_s']:.3f} / {row['loads_max_gap_s']:.3f} s; CPU s old/new threads "
              f"{row['loads_cpu']['old_cpu_s']}/{row['loads_cpu']['new_cpu_s']} (new nice "
              f"{row['loads_cpu']['new_nice']}, decoding threads {row['loads_cpu']['busiest_old']})", flush=True)
    out: dict = {"rounds": rows}
    for key in ("alone_tok_s", "loads_tok_s", "in_load_tok_s", "in_unload_tok_s", "overall_ratio", "in_load_ratio",
                "alone_max_gap_s", "loads_max_gap_s"):
        found = [x[key] for x in rows if x[key] is not None]
        out[key] = statistics.median(found) if found else None
    out["load_s"] = statistics.median(t for x in rows for t in x["load_each_s"])
    return out


def memory(port: int, pid: int, cycles: int) -> dict:
    """Part 3: RSS before any load, and loaded / after unload over `cycles` load → request → unload cycles."""
    before, rows = rss(pid), []
    for c in range(cycles):
        stream(port, A, f"[cycle {c}] {SHORT}", 4)
        held = rss(pid)
        preload(port, A, 0)
        if loaded(port):
            raise RuntimeError(f"still loaded after keep_alive 0: {loaded(port)}")
        rows.append({"cycle": c + 1, "loaded": held, "after": rss(pid)})
        print(f"  cycle {c + 1}: loaded {held['VmRSS']:.0f} MiB, after unload {rows[-1]['after']['VmRSS']:.0f} MiB "
              f"(anon {rows[-1]['after']['RssAnon']:.0f}, file {rows[-1]['after']['RssFile']:.0f})", flush=True)
    after = [x["after"]["VmRSS"] for x in rows]
    tail = after[1:]  # cycle 1 pays for what the first load imports once (llama.cpp's libraries, the engine)
    slope = statistics.linear_regression(range(len(tail)), tail).slope if len(tail) > 1 else 0.0
    return {"before": before, "cycles": rows, "after_first": after[0], "after_last": after[-1],
            "after_max": max(after), "loaded_median": statistics.median(x["loaded"]["VmRSS"] for x in rows),
            "slope_mib_per_cycle": slope}


def store(model: Path, home: Path) -> str:
    """big-a and big-b in the store of `home`: hard links to `model` where possible, else copies."""
    folder = home / "models"
    folder.mkdir(parents=True)
    how = "hard links to one file"
    for name in (A, B):
        try:
            os.link(model, folder / f"{name}.gguf")
        except OSError:
            shutil.copyfile(model, folder / f"{name}.gguf")
            how = "copies"
    return how


def report(args: argparse.Namespace, how: str, parts: dict) -> None:
    rounds = f"; {args.rounds} rounds" if set(parts) - {"memory"} else ""
    variant = "; server threads reniced to 0 once big-a loaded" if args.renice else ""
    print(f"\n{args.model.name} as {A} and {B} ({how}); serve --threads {args.threads} --parallel {args.parallel} "
          f"--ctx {args.ctx}{rounds}{variant}\n")
    print("| measure | median (range) |\n|---|---|")
    if "switch" in parts:
        rows, sw = parts["switch"]["rounds"], parts["switch"]
        print(f"| TTFT, {A} not loaded (s) | {spread([x['cold_ttft_s'] for x in rows], '.3f')} |")
        print(f"| TTFT, {A} loaded (s) | {spread([x['warm_ttft_s'] for x in rows], '.3f')} |")
        print(f"| not loaded − loaded (s) | {spread([x['cold_ttft_s'] - x['warm_ttft_s'] for x in rows], '.3f')} |")
        print(f"| not loaded / loaded | {spread([x['cold_ttft_s'] / x['warm_ttft_s'] for x in rows], '.1f')}× |")
        print(f"| load alone: empty-prompt preload (s) | {spread([x['preload_s'] for x in rows], '.3f')} |")
        o = sw["ollama_cold"]
        print(f"| Ollama /api/generate, not loaded: wall (s), load_duration (ns) | {o['wall_s']:.3f}, "
              f"{o['load_duration_ns']} |")
    if "decode" in parts:
        rows = parts["decode"]["rounds"]
        print(f"| {A} decode alone (tok/s) | {spread([x['alone_tok_s'] for x in rows])} |")
        print(f"| {A} decode with {B} loading/unloading, overall (tok/s) | "
              f"{spread([x['loads_tok_s'] for x in rows])} |")
        print(f"| … inside {B}'s load windows (tok/s) | {spread([x['in_load_tok_s'] for x in rows])} |")
        print(f"| … inside {B}'s unload windows (tok/s) | {spread([x['in_unload_tok_s'] for x in rows])} |")
        print(f"| ratio overall (with / alone) | {spread([x['overall_ratio'] for x in rows], '.3f')} |")
        print(f"| ratio inside load windows (goal ≥ 0.9) | {spread([x['in_load_ratio'] for x in rows], '.3f')} |")
        cpu = [x["loads_cpu"] for x in rows]
        print(f"| nice of {A}'s decoding threads / of threads born during the stream | "
              f"{sorted({n for c in cpu for _, n in c['busiest_old'][:2]})} / "
              f"{sorted({n for c in cpu for n in c['new_nice']})} |")
        print(f"| {B} load time under the stream (s) | "
              f"{spread([t for x in rows for t in x['load_each_s']], '.3f')} |")
        print(f"| largest gap between tokens, alone / with loads (s) | "
              f"{spread([x['alone_max_gap_s'] for x in rows], '.3f')} / "
              f"{spread([x['loads_max_gap_s'] for x in rows], '.3f')} |")
    if "memory" in parts:
        m = parts["memory"]
        print(f"| RSS before any load (MiB) | {m['before']['VmRSS']:.0f} |")
        print(f"| RSS loaded, median of {args.cycles} (MiB) | {m['loaded_median']:.0f} |")
        print(f"| RSS after unload: cycle 1, cycle {args.cycles}, max (MiB) | {m['after_first']:.0f}, "
              f"{m['after_last']:.0f}, {m['after_max']:.0f} |")
        print(f"| after-unload RSS trend, cycles 2–{args.cycles} (MiB/cycle) | {m['slope_mib_per_cycle']:+.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:4]))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cycles", type=int, default=20, help="load/unload cycles for the memory part")
    parser.add_argument("--model", type=Path, default=SHAPED, help=f"the GGUF served twice (default: {SHAPED})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=200, help="the decode part's stream length")
    parser.add_argument("--parts", default="memory,switch,decode", help="which parts, comma-separated")
    parser.add_argument("--renice", action="store_true", help="a variant: once big-a is loaded, every thread of the "
                        "server at nice 0 (needs root), as if its decoding threads had not inherited the loader's")
    parser.add_argument("--json", type=Path, help="also write everything measured to this file")
    args = parser.parse_args()
    if args.renice and os.geteuid() != 0:
        parser.error("--renice lowers nice values, which needs root (CAP_SYS_NICE); run it as root, or leave it out")
    if not args.model.is_file():
        parser.error(f"no model at {args.model}: build the 1.3b-shaped Q4_K_M with `python benchmarks/decode_speed.py "
                     "--shaped --llama-bench PATH` (it writes the default path; or give --model FILE.gguf)")
    wanted = [p for p in ("memory", "switch", "decode") if p in args.parts.split(",")]  # memory first: see below
    if not wanted or set(args.parts.split(",")) - {"memory", "switch", "decode"}:
        parser.error("--parts takes memory, switch and decode, comma-separated")
    if min(args.rounds, args.cycles) < 1 or args.max_tokens < 40:
        parser.error("--rounds and --cycles take 1 or more, --max-tokens 40 or more")
    args.model = args.model.resolve()

    tmp = Path(tempfile.mkdtemp(prefix="serve-models-"))
    os.environ["MALHAE_HOME"] = str(tmp / "home")  # no config.toml, store or cache of the user's
    how = store(args.model, tmp / "home")
    server = st.Server("malhae", [sys.executable, "-m", "malhae", "serve", "--port", "0", "--threads",
                                  str(args.threads), "--parallel", str(args.parallel), "--ctx", str(args.ctx),
                                  "--draft", "off", "--no-prompt-cache", "--keep-alive", "10m", "--quiet"],
                       "/health", None, [1], "usage")
    parts: dict = {}
    try:
        st.start(server, tmp, 120)
        pid = server.proc.pid
        print(f"store: {A}, {B} ({how}); server pid {pid}, port {server.port}: {' '.join(server.cmd)}", flush=True)
        warm_cache(args.model)
        for part in wanted:  # memory first by default: its "before" is a server that has loaded nothing yet
            print(f"{part}:", flush=True)
            if part == "memory":
                parts[part] = memory(server.port, pid, args.cycles)
            elif part == "switch":
                parts[part] = switch(server.port, args.model, args.rounds)
            else:
                parts[part] = decode(server.port, pid, args.rounds, args.max_tokens, args.renice)
    except RuntimeError as e:  # a request that failed, the server's last words
        raise SystemExit(f"error: {e}\n{st.log_tail(server)}") from None
    finally:
        processes.stop(server.proc)
        shutil.rmtree(tmp / "home", ignore_errors=True)  # the store (copies, where links failed); the log stays
    report(args, how, parts)
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "store": how, "threads": args.threads,
                                         "parallel": args.parallel, "ctx": args.ctx, "max_tokens": args.max_tokens,
                                         "server": server.cmd, **parts}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
