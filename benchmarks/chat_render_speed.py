"""What drawing costs: decode tokens/s through the chat REPL's own output path vs the bare engine loop.

    python benchmarks/chat_render_speed.py MODEL.gguf [--tokens 512] [--rounds 5] [--threads N] [--gpu-layers auto|N]

The REPL writes every piece as the engine yields it (app.chat.writer.write_answer: one write per piece, a flush at
most every 8 ms, control characters dropped on a terminal, Ctrl-C guarded). Each round generates the same greedy
answer three ways on one loaded engine: bare (iterate Engine.generate, print nothing), into a pseudo-terminal whose
other end is drained by another process as by a terminal emulator, and into /dev/null. The engine's own decode
tokens/s includes the time the consumer of each piece takes, so the ratio is the cost of drawing. Rounds alternate the
three so that a noisy machine hurts all alike; medians are reported. Goal: drawing costs < 3% (a ratio ≥ 97%), even at
GPU speeds of hundreds of tokens/s. Last, one answer's pieces are replayed back to back through write_answer without
the model: the Python side of drawing per piece, apart from the terminal's process competing with the model for CPU
time (which a machine with few cores shows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from malhae.chat.writer import write_answer  # noqa: E402
from malhae.runtime import templates  # noqa: E402
from malhae.runtime.engine import Engine  # noqa: E402
from malhae.runtime.settings import (
    LoadOptions,  # noqa: E402
    Sampling,  # noqa: E402
)


class PseudoTerminal:
    """A pty whose master side is read continuously by another process, as by a terminal emulator (a thread here
    would compete with the REPL for the GIL, which a real terminal does not); the slave is the REPL's stdout."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        self.file = open(slave, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
        self.reader = subprocess.Popen(["wc", "-c"], stdin=self.master, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True)  # EIO at the end is a pty's EOF
        self.received = 0

    def close(self) -> None:
        self.file.close()  # the reader sees the end once the slave side is closed
        os.close(self.master)
        out, _ = self.reader.communicate(timeout=10)
        self.received = int(out.split()[0]) if out.strip() else 0


def run(engine: Engine, prompt: str, sampling: Sampling, sink) -> float:
    engine.cache = []  # the same prompt evaluation every time; only decode speed is compared
    pieces = engine.generate(prompt, sampling)
    if sink is None:
        for _ in pieces:
            pass
    else:
        write_answer(pieces, sink, terminal=sink.isatty())
    if engine.stats.generated_tokens != sampling.max_tokens:
        raise SystemExit(f"generated {engine.stats.generated_tokens} tokens instead of {sampling.max_tokens}")
    return engine.stats.decode_tps


def replay_cost(pieces: list[str], out, repeat: int = 20) -> float:
    """Seconds per piece that write_answer itself takes on the terminal, with no model running: the REPL's own share
    of drawing, apart from the terminal process competing with the model for the CPU."""
    start = time.perf_counter()
    for _ in range(repeat):
        write_answer(iter(pieces), out, terminal=True)
    return (time.perf_counter() - start) / (repeat * len(pieces))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per answer")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--gpu-layers", default="auto")
    args = parser.parse_args()

    with Engine(LoadOptions(model=args.model, ctx=args.tokens + 256, threads=args.threads, gpu_layers=args.gpu_layers),
                notify=print) as engine:
        template = templates.for_model(engine.name)
        prompt = template.prompt([("user", "대한민국 헌법에 대해 자세히 설명해 주세요.")])
        # greedy, end tokens suppressed and no stop strings: every run writes exactly --tokens tokens
        sampling = Sampling(temperature=0, repeat_penalty=1.0, max_tokens=args.tokens, ignore_eos=True)
        where = engine.plan.where
        print(f"{args.model.name}: {engine.options.threads} threads, {where}, {args.tokens} tokens per answer",
              flush=True)
        terminal = PseudoTerminal()
        devnull = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
        try:
            run(engine, prompt, sampling, None)  # warm-up
            rows = []
            for r in range(args.rounds):
                bare = run(engine, prompt, sampling, None)
                tty = run(engine, prompt, sampling, terminal.file)
                null = run(engine, prompt, sampling, devnull)
                rows.append((bare, tty, null))
                print(f"round {r + 1}: bare {bare:9.1f} tok/s   pty {tty:9.1f} ({tty / bare:6.1%})   "
                      f"/dev/null {null:9.1f} ({null / bare:6.1%})", flush=True)
            recorded = list(engine.generate(prompt, sampling))
            replay = replay_cost(recorded, terminal.file)
        finally:
            devnull.close()
            terminal.close()
    bare = statistics.median(r[0] for r in rows)
    tty_ratio = statistics.median(r[1] / r[0] for r in rows)
    null_ratio = statistics.median(r[2] / r[0] for r in rows)
    print(f"\nmedian over {len(rows)} rounds: bare engine {bare:.1f} tok/s; through the REPL's output path: "
          f"pseudo-terminal {tty_ratio:.1%} of bare (drawing costs {1 - tty_ratio:.1%}), "
          f"/dev/null {null_ratio:.1%} (costs {1 - null_ratio:.1%}); goal: costs < 3%")
    per_token = statistics.median(1 / r[1] - 1 / r[0] for r in rows) * 1e6
    print(f"drawing per token on the pseudo-terminal: {per_token:.1f} µs measured in the runs, of which the REPL's "
          f"write_answer alone (replayed without the model) takes {replay * 1e6:.1f} µs; at 600 tok/s that is "
          f"{per_token * 600 / 1e4:.1f}% and {replay * 600 * 100:.2f}%; {terminal.received} bytes drawn")


if __name__ == "__main__":
    main()
