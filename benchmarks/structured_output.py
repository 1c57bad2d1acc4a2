"""Structured output (issue 30): greedy decoding under a JSON schema in malhae's engine, against upstream llama-server
with the same schema and against malhae without one; and what turning a schema into a grammar sampler costs.

    python benchmarks/build_llama_tools.py --server      # once: llama-server from the same llama.cpp source
    python benchmarks/structured_output.py [--threads 2] [--rounds 3] [--max-tokens 200] [--shaped PATH]
        [--no-shaped] [--llama-server PATH] [--json FILE]

Models: the demo (models/malhae-demo-ko-f16.gguf) and the 1.3b-shaped Q4_K_M that `python benchmarks/decode_speed.py
--shaped` builds (its default place, or --shaped PATH; skipped with a note when the default file is missing). For
each, with the same prompt tokens, greedy, --max-tokens tokens at most, every sampler but the choice off
(repeat_penalty 1, as llama-server's default, on all three):

  a. malhae's Engine, Sampling(grammar=grammar.from_schema(SCHEMA)): stats.decode_tps;
  b. llama-server (started once per model: -t THREADS -c 2048 -np 1) `/completion` with `json_schema`: SCHEMA,
     `cache_prompt` false: timings.predicted_per_second;
  c. malhae's Engine without a schema, ignore_eos: stats.decode_tps.

Every round runs a, b and c one after the other (the order reversed every other round), so a noisy minute weighs on
all three; the ratios a/b and a/c are taken per round and their medians reported, with median tok/s. Generated token
counts are shown too: with a grammar, an end token may come only where the JSON is complete, so a model that closes
the object early decodes fewer than --max-tokens; its tok/s still compare. "same text" says whether malhae's
constrained answer equals llama-server's (the grammars come from two converters: llama.cpp's C++ one and
llama-cpp-python's port that app.runtime.grammar mends).

Compile cost: `grammar.from_schema` and `sampler.grammar_sampler(vocab, g)` (the demo's vocabulary), the median of
20, for the decoding schema (12 strings) and for schemas of 12 and 50 properties of mixed kinds (bounded integers,
enums, arrays, numbers, booleans, dates).

llama-server is tied to this process (malhae.children: it dies with it, even on kill -9) and stopped in a finally.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import processes  # noqa: E402  benchmarks/processes.py, beside this script

from malhae import children  # noqa: E402
from malhae.errors import UserError  # noqa: E402
from malhae.runtime import grammar  # noqa: E402
from malhae.runtime.engine import Engine  # noqa: E402
from malhae.runtime.sampler import grammar_sampler  # noqa: E402
from malhae.runtime.settings import LoadOptions, Sampling  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "malhae-demo-ko-f16.gguf"
SHAPED = Path("/tmp/malhae-decode-speed/polyglot-ko-1.3b-shaped-q4_k_m.gguf")  # decode_speed.py --shaped's
CTX = 2048
PROMPT = ("다음 사람의 정보를 JSON으로 적어 주세요.\n김민준은 서울에 사는 서른두 살 개발자이고, 주말에는 등산을 하며 "
          "김치찌개를 좋아한다.\nJSON:")
FIELDS = ("name", "age", "city", "job", "hobby", "food", "color", "animal", "season", "sport", "book", "movie")
SCHEMA = {"type": "object", "properties": {f: {"type": "string"} for f in FIELDS}, "required": list(FIELDS)}
COMPILE_REPEATS = 20
A, B, C = "malhae + schema", "llama-server + schema", "malhae, no schema"


def mixed_schema(n: int) -> dict:
    """n required properties of the kinds a form asks for, so that the grammar has more than string rules."""
    kinds = ({"type": "string", "description": "자유롭게"}, {"type": "integer", "minimum": 0, "maximum": 150},
             {"type": "string", "enum": ["서울", "부산", "대구", "인천", "광주"]}, {"type": "boolean"},
             {"type": "array", "items": {"type": "string"}, "maxItems": 5}, {"type": "number"},
             {"type": "string", "format": "date"}, {"type": "integer", "minimum": -1000, "maximum": 1000})
    props = {f"항목_{i:02d}": kinds[i % len(kinds)] for i in range(n)}
    return {"type": "object", "properties": props, "required": list(props)}


# --- llama-server --------------------------------------------------------------------------------------------------

def start_server(binary: Path, model: Path, threads: int, log: Path, timeout: float = 300
                 ) -> tuple[subprocess.Popen, int]:
    """llama-server on a free port, tied to this process; returns once /health answers 200."""
    port = processes.free_port()
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-c", str(CTX), "-np", "1", "--host", "127.0.0.1",
           "--port", str(port)]
    print(f"starting {' '.join(cmd)} (log: {log})", file=sys.stderr)
    with open(log, "wb") as out:
        proc = children.popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"llama-server exited ({proc.returncode}) while loading:\n{tail}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            if ok:
                return proc, port
        except OSError:
            pass
        time.sleep(0.25)
    processes.stop(proc)
    raise RuntimeError(f"llama-server did not become healthy in {timeout:.0f} s (log: {log})")


def server_run(port: int, tokens: list[int], max_tokens: int) -> dict:
    body = {"prompt": tokens, "n_predict": max_tokens, "temperature": 0, "repeat_penalty": 1.0,
            "json_schema": SCHEMA, "cache_prompt": False, "stream": False}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/completion", json.dumps(body).encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"llama-server answered HTTP {resp.status}: {data[:300].decode(errors='replace')}")
    out = json.loads(data)
    t = out["timings"]
    stop = {"eos": "eos", "limit": "length", "word": "stop"}.get(out.get("stop_type"), str(out.get("stop_type")))
    return {"tps": t["predicted_per_second"], "tokens": t["predicted_n"], "stop": stop, "text": out["content"]}


# --- malhae ----------------------------------------------------------------------------------------------------

def engine_run(engine: Engine, tokens: list[int], max_tokens: int, g: grammar.Grammar | None) -> dict:
    s = Sampling(temperature=0, max_tokens=max_tokens, repeat_penalty=1.0, grammar=g, ignore_eos=g is None)
    text, stats = engine.complete(tokens, s)
    return {"tps": stats.decode_tps, "tokens": stats.generated_tokens, "stop": str(stats.stop_reason), "text": text}


def measure_model(model: Path, args: argparse.Namespace, logs: Path) -> dict:
    g = grammar.from_schema(SCHEMA)
    proc = None
    try:
        if args.llama_server is not None:
            proc, port = start_server(args.llama_server, model, args.threads, logs / f"{model.stem}.log")
        with Engine(LoadOptions(model=model, ctx=CTX, threads=args.threads),
                    notify=lambda m: print(m, file=sys.stderr)) as engine:
            tokens = engine.tokenize(PROMPT)
            runs = {A: lambda n: engine_run(engine, tokens, n, g), C: lambda n: engine_run(engine, tokens, n, None)}
            if proc is not None:
                runs[B] = lambda n: server_run(port, tokens, n)
            order = [name for name in (A, B, C) if name in runs]
            for name in order:  # warm-up: first-call costs (grammar tables, caches) stay out of the rounds
                runs[name](16)
            rounds = []
            for r in range(args.rounds):
                got = {name: runs[name](args.max_tokens) for name in (order if r % 2 == 0 else order[::-1])}
                rounds.append(got)
                print(f"{model.name} round {r + 1}/{args.rounds}: " + "; ".join(
                    f"{name} {got[name]['tps']:.1f} tok/s ({got[name]['tokens']} tokens, {got[name]['stop']})"
                    for name in order), file=sys.stderr, flush=True)
            compiled = compile_cost(engine.vocab) if model == args.compile_model else None
    finally:
        processes.stop(proc)
    return summarize(model, rounds, compiled)


def summarize(model: Path, rounds: list[dict], compiled: list[dict] | None) -> dict:
    names = list(rounds[0])
    out: dict = {"model": model.name, "rounds": rounds, "compile": compiled}
    for name in names:
        out[name] = {"tps": statistics.median(r[name]["tps"] for r in rounds),
                     "tokens": [r[name]["tokens"] for r in rounds], "stop": sorted({r[name]["stop"] for r in rounds})}
    if B in names:
        out["a/b"] = ratio(rounds, A, B)
        out["same text"] = all(r[A]["text"] == r[B]["text"] for r in rounds)
    out["a/c"] = ratio(rounds, A, C)
    return out


def ratio(rounds: list[dict], top: str, bottom: str) -> float | None:
    """The median of the per-round ratios; rounds with a side that decoded at most one token (no rate) left out."""
    values = [r[top]["tps"] / r[bottom]["tps"] for r in rounds if r[top]["tps"] > 0 and r[bottom]["tps"] > 0]
    return statistics.median(values) if values else None


def compile_cost(vocab) -> list[dict]:
    """Medians of from_schema and of grammar_sampler (the GBNF parse against the vocabulary), in milliseconds."""
    import llama_cpp as lc

    rows = []
    for label, schema in (("12 strings (the decoding schema)", SCHEMA), ("12 mixed", mixed_schema(12)),
                          ("50 mixed", mixed_schema(50))):
        convert, parse = [], []
        for _ in range(COMPILE_REPEATS):
            t0 = time.perf_counter()
            g = grammar.from_schema(schema)
            t1 = time.perf_counter()
            made = grammar_sampler(vocab, g)
            t2 = time.perf_counter()
            lc.llama_sampler_free(made)
            convert.append(t1 - t0)
            parse.append(t2 - t1)
        rows.append({"schema": label, "schema_bytes": len(json.dumps(schema, ensure_ascii=False).encode()),
                     "gbnf_bytes": len(g.gbnf.encode()), "from_schema_ms": statistics.median(convert) * 1e3,
                     "sampler_ms": statistics.median(parse) * 1e3,
                     "total_ms": statistics.median(a + b for a, b in zip(convert, parse, strict=True)) * 1e3})
    return rows


def tables(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"{args.threads} threads, greedy, {args.max_tokens} tokens at most, {args.rounds} rounds (medians)", "",
             f"| model | {A} tok/s | {B} tok/s | {C} tok/s | a/b | a/c | tokens a / b / c (per round) | same text |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for res in results:
        cell = {n: format(res[n]["tps"], ".1f") if n in res else "—" for n in (A, B, C)}
        toks = " / ".join(",".join(str(t) for t in res[n]["tokens"]) if n in res else "—" for n in (A, B, C))
        ab, ac = (format(res[k], ".2f") if res.get(k) is not None else "—" for k in ("a/b", "a/c"))
        lines.append(f"| {res['model']} | {cell[A]} | {cell[B]} | {cell[C]} | {ab} | {ac} | {toks} | "
                     f"{res.get('same text', '—')} |")
    compiled = next((r["compile"] for r in results if r["compile"]), None)
    if compiled:
        lines += ["", f"Schema → grammar sampler, median of {COMPILE_REPEATS} (ms):", "",
                  "| schema | schema bytes | GBNF bytes | from_schema | grammar_sampler | total |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['schema']} | {c['schema_bytes']:,} | {c['gbnf_bytes']:,} | {c['from_schema_ms']:.2f} | "
                  f"{c['sampler_ms']:.2f} | {c['total_ms']:.2f} |" for c in compiled]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:5]))
    parser.add_argument("--threads", type=int, default=2, help="malhae's and llama-server's threads")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--shaped", type=Path, help=f"the 1.3b-shaped GGUF (default: {SHAPED}, when it exists)")
    parser.add_argument("--no-shaped", action="store_true", help="the demo model only")
    parser.add_argument("--llama-server", type=Path, default=processes.default_llama_server(),
                        help="upstream llama-server (default: build_llama_tools.py --server's)")
    parser.add_argument("--no-llama-server", action="store_true", help="measure malhae only (no a/b)")
    parser.add_argument("--json", type=Path, help="also write everything measured, per round, to this file")
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1 or args.max_tokens < 2:
        parser.error("--rounds and --threads take 1 or more, --max-tokens 2 or more")
    if args.no_llama_server:
        args.llama_server = None
    elif not args.llama_server.is_file():
        parser.error(f"no llama-server at {args.llama_server}: build it (python benchmarks/build_llama_tools.py "
                     "--server), give --llama-server PATH, or --no-llama-server")
    models = [DEMO]
    if args.shaped is not None and not args.shaped.is_file():
        parser.error(f"--shaped {args.shaped}: no such file (python benchmarks/decode_speed.py --shaped makes it)")
    shaped = None if args.no_shaped else args.shaped or SHAPED
    if shaped is not None and shaped.is_file():
        models.append(shaped)
    elif shaped is not None:
        print(f"note: no {shaped} (python benchmarks/decode_speed.py --shaped makes it); the demo only",
              file=sys.stderr)
    args.compile_model = DEMO

    def interrupted(signum, frame):  # SIGTERM and SIGHUP end the run like Ctrl-C: through the finally blocks
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    logs = Path(tempfile.mkdtemp(prefix="structured-output-"))
    try:
        results = [measure_model(m, args, logs) for m in models]
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (RuntimeError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(tables(results, args))
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "max_tokens": args.max_tokens,
                                         "rounds": args.rounds, "prompt": PROMPT, "schema": SCHEMA,
                                         "results": results}, indent=2, ensure_ascii=False))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
