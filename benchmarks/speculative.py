"""Speculative decoding, side by side: plain decoding, prompt lookup and draft models on the demo's heavy twin.

    python benchmarks/speculative.py [-m MODEL.gguf] [--threads 2] [--tokens 200] [--rounds 3] [--quick] [--serve]
                                     [--modes plain,lookup,cut2,demo] [--cases quote,rewrite,bill,free]
                                     [--gpu-layers auto] [--tools DIR]

Why the twin (benchmarks/heavy_twin.py, built on first use under /tmp/twin): the demo decodes at ~2,000 tok/s, where
drafting only adds overhead, and a random model of a real size accepts drafts at random; the twin reads ~0.8 GB a
token at Q4_K_M like polyglot-ko-1.3b and answers as the demo does. Modes, each an Engine on the same file:
- plain: no speculation (the baseline every ratio is to);
- lookup: n-grams of the prompt and the answer (`--draft lookup`);
- cut2: the demo cut to its first two layers as a draft model (a cheap, sometimes wrong draft of the same tokenizer);
- demo: the demo itself as the draft (it computes the twin's function: the upper bound of a draft model).
Cases: a constitution chapter in the prompt and the model asked to write it out again (quote) or to restate it
(rewrite); a National Assembly bill, text the demo never saw, asked to be quoted (bill); a question with nothing to
quote (free: where speculation can only cost).

Every round runs every mode on every case, the order rotating, and the output of each mode is compared token for
token with plain decoding's (greedy, repeat penalty off, as llama-lookup runs). Where llama.cpp's tools are built
(benchmarks/build_llama_tools.py --server --speculative), llama-bench tg on the same file and threads and upstream
`llama-lookup` on the same prompts run in the same rounds. Prints a markdown table; ratios are to plain in the same
run. Machines are noisy: read the ratios, and run again on a quiet machine before believing a few percent.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from malhae.runtime.engine import Engine  # noqa: E402
from malhae.runtime.settings import LoadOptions, Sampling  # noqa: E402

DATA = ROOT / "models" / "data" / "ko-public-domain"
DEMO = ROOT / "models" / "malhae-demo-ko-f16.gguf"
TOOLS = Path.home() / ".cache" / "malhae"


def chapter(text: str, number: int) -> str:
    """Chapter `number` of the constitution (제N장 … up to the next chapter)."""
    start = text.index(f"제{number}장")
    end = text.find(f"제{number + 1}장", start)
    return text[start:end if end > 0 else None].strip()


def cases(chars: int) -> dict[str, str]:
    """The prompts; `chars` caps each document (whole chapters 2 and 3 are 1,439 and 1,141 demo tokens). Besides the
    four of the table, more quoting prompts of the same two kinds (other chapters, other bills) for
    benchmarks/lookup_replay.py, which has the time to replay many."""
    constitution = (DATA / "constitution.txt").read_text(encoding="utf-8")

    def bill(number: str) -> str:
        return (DATA / "bills" / f"{number}.txt").read_text(encoding="utf-8")[:min(chars, 1800)]

    def quote(text: str) -> str:
        return f"{text}\n\n위 조문을 그대로 다시 쓴다.\n\n{text[:30]}"

    def copy(text: str) -> str:
        return f"{text}\n\n위 법률안을 그대로 옮겨 쓰면 다음과 같다.\n\n{text[:30]}"

    two, three = chapter(constitution, 2)[:chars], chapter(constitution, 3)[:chars]
    return {
        "quote": quote(two),
        "rewrite": f"{three}\n\n위 내용을 조문별로 다시 정리하면 다음과 같다.\n\n",
        "bill": copy(bill("1809895")),
        "free": "대한민국의 수도는",
        **{f"quote-ch{n}": quote(chapter(constitution, n)[:min(chars, 4000)]) for n in (3, 4, 5)},
        **{f"bill-{n}": copy(bill(n)) for n in ("1809890", "1809893", "1809897")},
    }


@dataclass
class Runs:
    tps: list[float] = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0
    ids: list[list[int]] = field(default_factory=list)


def twin(threads: int) -> Path:
    from benchmarks import heavy_twin

    out = heavy_twin.DEFAULT_OUT
    hf = heavy_twin.build(heavy_twin.DEMO_HF, out)
    return heavy_twin.make_gguf(hf, out, "q4_k_m", threads=threads)


def llama_bench(tools: Path, model: Path, threads: int, tokens: int) -> float | None:
    exe = tools / "llama-bench"
    if not exe.exists():
        return None
    out = subprocess.run([str(exe), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(tokens), "-r", "1",
                          "-o", "json"], capture_output=True, text=True, timeout=900)
    rows = json.loads(out.stdout) if out.returncode == 0 else []
    return float(rows[0]["avg_ts"]) if rows else None


def llama_lookup(tools: Path, model: Path, prompt: str, threads: int, tokens: int, draft_max: int
                 ) -> tuple[float, float] | None:
    """(decode tok/s, % accepted) of upstream llama-lookup on the same prompt, greedy; `draft_max` is its
    --spec-draft-n-max (its default is 3)."""
    exe = tools / "llama-lookup"
    if not exe.exists():
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write(prompt + "\n")  # llama.cpp's -f drops one trailing newline: this one, so the prompt is the same
    try:
        proc = subprocess.run([str(exe), "-m", str(model), "-t", str(threads), "-f", f.name, "-n", str(tokens),
                               "-c", "2048", "--temp", "0", "--repeat-penalty", "1.0", "-ngl", "0",
                               "--spec-draft-n-max", str(draft_max)], capture_output=True, text=True, timeout=900)
    finally:
        Path(f.name).unlink()
    text = proc.stdout + proc.stderr
    speed = re.search(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", text)
    accept = re.search(r"accept\s+=\s+([\d.]+)%", text)
    return (float(speed.group(1)), float(accept.group(1)) if accept else 0.0) if speed else None


def serve_rounds(model: Path, prompts: dict[str, str], threads: int, tokens: int, rounds: int) -> None:
    """`malhae serve` with --draft lookup and without: one client alone (speculating), then three at once (batched,
    no drafts), each client a prompt of its own. Each client streams and times its answer from the first token to
    the last (decode only, what speculation changes) and from sending to the last (wall, prompt included)."""
    import http.client
    import threading

    from malhae.serve.server import Options, Server

    def post(port: int, prompt: str, out: list) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "repeat_penalty": 1.0, "stream": True,
                "stream_options": {"include_usage": True}}
        sent = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp, first, used = conn.getresponse(), None, 0
        while line := resp.readline():
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and any(c.get("text") for c in event["choices"]):
                first = time.perf_counter()
            if event.get("usage"):
                used = event["usage"]["completion_tokens"]
        ended = time.perf_counter()
        conn.close()
        out.append((used, sent, first or ended, ended))

    texts = list(prompts.values())
    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(rounds):
        for draft in (("lookup", None) if r % 2 == 0 else (None, "lookup")):
            opts = Options(load=LoadOptions(model=model, threads=threads, parallel=3, ctx=2048, gpu_layers=0,
                                            draft=draft), model_id=model.stem, port=0)
            with Server(opts) as server:
                server.state.ready.wait(600)
                for clients in (1, 3):
                    done: list[tuple[int, float, float, float]] = []
                    workers = [threading.Thread(target=post, args=(server.port, texts[i % len(texts)], done))
                               for i in range(clients)]
                    for w in workers:
                        w.start()
                    for w in workers:
                        w.join()
                    decode = statistics.mean((n - 1) / (end - first) for n, _, first, end in done)
                    wall = sum(n for n, *_ in done) / (max(d[3] for d in done) - min(d[1] for d in done))
                    rows.setdefault((draft or "off", clients), []).append((decode, wall))
    print("\n| malhae serve | 1 client: decode tok/s | wall tok/s | 3 clients: decode tok/s each | aggregate wall "
          "tok/s |\n|---|---:|---:|---:|---:|")
    for draft in ("off", "lookup"):
        cells = [f"{statistics.median(x[i] for x in rows[draft, n]):.1f}" for n in (1, 3) for i in (0, 1)]
        print(f"| --draft {draft} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", type=Path, help="the target GGUF (default: the heavy twin at Q4_K_M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chars", type=int, default=5000, help="at most this many characters of each document")
    parser.add_argument("--draft-max", type=int, default=16)
    parser.add_argument("--upstream-draft-max", type=int, default=3, help="llama-lookup's draft length (its "
                        "default: 3)")
    parser.add_argument("--modes", default="plain,lookup,cut2,demo")
    parser.add_argument("--cases", default="quote,rewrite,bill,free")
    parser.add_argument("--gpu-layers", default="0")
    parser.add_argument("--tools", type=Path, help="where llama-bench and llama-lookup are (default: the "
                        "build_llama_tools.py directory of this llama-cpp-python)")
    parser.add_argument("--quick", action="store_true", help="1 round, 64 tokens, quote and free only")
    parser.add_argument("--serve", action="store_true", help="measure malhae serve with and without --draft lookup "
                        "instead (1 client, then 3 at once)")
    a = parser.parse_args()
    if a.quick:
        a.rounds, a.tokens, a.cases = 1, 64, "quote,free"
    import importlib.metadata

    tools = a.tools or TOOLS / f"llama-tools-{importlib.metadata.version('llama-cpp-python')}" / "build" / "bin"
    model = a.model or twin(a.threads)
    modes, names = a.modes.split(","), a.cases.split(",")
    prompts = {k: v for k, v in cases(a.chars).items() if k in names}
    if a.serve:
        serve_rounds(model, prompts, a.threads, a.tokens, a.rounds)
        return
    gpu = a.gpu_layers if a.gpu_layers == "auto" else int(a.gpu_layers)
    with tempfile.TemporaryDirectory() as tmp:
        from malhae.convert.rewrite import first_layers

        drafts = {"plain": None, "lookup": "lookup", "cut2": first_layers(DEMO, Path(tmp) / "demo-2.gguf", 2),
                  "demo": DEMO}
        engines = {m: Engine(LoadOptions(model=model, ctx=2048, threads=a.threads, gpu_layers=gpu, draft=drafts[m],
                                         draft_max=a.draft_max)) for m in modes}
        sampling = Sampling(temperature=0, repeat_penalty=1.0, max_tokens=a.tokens, ignore_eos=True)
        results: dict[tuple[str, str], Runs] = {(c, m): Runs() for c in prompts for m in modes}
        upstream: dict[str, list[tuple[float, float]]] = {c: [] for c in prompts}
        bench: list[float] = []
        started = time.perf_counter()
        for r in range(a.rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for case, prompt in prompts.items():
                for mode in order:
                    e = engines[mode]
                    e.cache = []  # every run evaluates its prompt afresh, as a new question would
                    "".join(e.generate(prompt, sampling))
                    res = results[case, mode]
                    res.tps.append(e.stats.decode_tps)
                    res.proposed += e.stats.draft_proposed
                    res.accepted += e.stats.draft_accepted
                    res.ids.append(list(e.generated))
                up = llama_lookup(tools, model, prompt, a.threads, a.tokens, a.upstream_draft_max)
                if up:
                    upstream[case].append(up)
            tg = llama_bench(tools, model, a.threads, 128)
            if tg:
                bench.append(tg)
            print(f"round {r + 1}/{a.rounds} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        for e in engines.values():
            e.close()
    print(f"\n{model.name}, {a.threads} threads, gpu_layers {a.gpu_layers}, {a.tokens} tokens, greedy, "
          f"draft_max {a.draft_max}, {a.rounds} rounds (median tok/s)")
    if bench:
        print(f"llama-bench tg128: {statistics.median(bench):.1f} tok/s")
    print("\n| case | mode | tok/s | × plain | accepted / proposed | same tokens as plain |")
    print("|---|---|---:|---:|---:|---|")
    for case in prompts:
        base = statistics.median(results[case, "plain"].tps) if "plain" in modes else None
        want = results[case, "plain"].ids[0] if "plain" in modes else results[case, modes[0]].ids[0]
        for mode in modes:
            res = results[case, mode]
            equal = all(ids == want for ids in res.ids)
            tps = statistics.median(res.tps)
            rate = f"{res.accepted}/{res.proposed} ({100 * res.accepted / res.proposed:.0f}%)" if res.proposed \
                else "-"
            ratio = f"{tps / base:.2f}×" if base else "-"
            print(f"| {case} | {mode} | {tps:.1f} | {ratio} | {rate} | {'yes' if equal else 'NO'} |")
        if upstream[case]:
            tps = statistics.median(u[0] for u in upstream[case])
            acc = statistics.median(u[1] for u in upstream[case])
            ratio = f"{tps / base:.2f}×" if base else "-"
            print(f"| {case} | llama-lookup | {tps:.1f} | {ratio} | {acc:.0f}% | (upstream) |")


if __name__ == "__main__":
    main()
