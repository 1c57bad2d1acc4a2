"""What running on a server costs: `malhae complete --endpoint` against `malhae serve` vs `malhae complete` locally.

    python benchmarks/remote_overhead.py [MODEL.gguf] [--rounds 3] [-n 64] [--threads 2] [--json FILE]

What it shows: the decode speed and time to first token a user sees through the remote backend (HTTP, SSE, the
server's scheduler) next to the local engine's, on the same GGUF and thread count, and that the two answers are the
same text (greedy). `malhae serve` runs in this process (one slot, the model's context) and the two front ends run
as `python -m malhae complete PROMPT --temperature 0 -n N --json` subprocesses, local and remote alternating, one at a
time, so they never compete for the cores; each round has its own prompt (its number first), so the server reuses no
earlier prompt. Printed: per round and as medians, decode tok/s (after the first token)
and TTFT of each, and the ratio remote / local. Both sides measure at the client: the local engine from its own
clock, the remote backend from the bytes arriving (`stats` in the --json output). One difference in what TTFT means:
locally it is the first token sampled, remotely the first chunk that carries text — a server sends nothing for a
token that ends inside a UTF-8 character, and a random-weight model's first tokens often do (measured: the server
had sampled at 0.26 s in every round, and the first text left it 0.28-0.57 s after the request), so with such a model
remote TTFT reads longer than it is; with real Korean text the first token almost always carries a character.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from malhae.runtime.settings import LoadOptions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "대한민국 헌법 제1조 대한민국은 민주공화국이다. 대한민국의 주권은"


def run(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    if done.returncode:
        raise SystemExit(f"malhae {' '.join(args)} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def main() -> None:
    from malhae.serve.server import Options, Server
    from malhae.store import models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="GGUF (default: the bundled demo)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", "--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()
    model = a.model or models.demo_model()
    rows = []
    with Server(Options(load=LoadOptions(model=model, threads=a.threads, parallel=1), model_id=model.stem,
                        port=0)) as server:
        url = server.url + "/v1"
        for r in range(a.rounds):
            # a prompt of its own each round: the server's slot would otherwise reuse the last round's prompt (a
            # shorter TTFT, and on Q4_K other rounding than a whole prompt evaluated at once)
            flags = ["complete", f"{r + 1}. {PROMPT}", "--temperature", "0", "-n", str(a.tokens), "--json"]
            order = ["local", "remote"] if r % 2 == 0 else ["remote", "local"]
            got = {}
            for side in order:
                extra = ["-m", str(model), "--threads", str(a.threads), "--endpoint", "local"] if side == "local" \
                    else ["--endpoint", url]
                got[side] = run([*flags, *extra])
            lo, re_ = got["local"]["stats"], got["remote"]["stats"]
            row = {"round": r + 1, "local_tps": lo["decode_tps"], "remote_tps": re_["decode_tps"],
                   "local_ttft": lo["ttft"], "remote_ttft": re_["ttft"], "tokens": [lo["generated_tokens"],
                                                                                    re_["generated_tokens"]],
                   "same_text": got["local"]["text"] == got["remote"]["text"]}
            rows.append(row)
            print(f"round {row['round']}: decode local {row['local_tps']:.1f} remote {row['remote_tps']:.1f} tok/s "
                  f"({row['remote_tps'] / row['local_tps']:.3f}×) · TTFT local {row['local_ttft'] * 1000:.0f} ms "
                  f"remote {row['remote_ttft'] * 1000:.0f} ms · tokens {row['tokens']} · same text "
                  f"{row['same_text']}", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in ("local_tps", "remote_tps", "local_ttft", "remote_ttft")}
    print(f"\n{model.name}, {a.threads} threads, {a.tokens} tokens, {a.rounds} rounds (medians): decode local "
          f"{med['local_tps']:.1f} tok/s, remote {med['remote_tps']:.1f} tok/s = "
          f"{med['remote_tps'] / med['local_tps']:.3f}× · TTFT local {med['local_ttft'] * 1000:.0f} ms, remote "
          f"{med['remote_ttft'] * 1000:.0f} ms · every text the same: {all(r['same_text'] for r in rows)}")
    if a.json:
        a.json.write_text(json.dumps({"model": str(model), "rounds": rows, "medians": med}, indent=1) + "\n")


if __name__ == "__main__":
    main()
