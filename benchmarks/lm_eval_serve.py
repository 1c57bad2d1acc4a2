"""lm-evaluation-harness against `malhae serve`: a KoBEST task scored over the OpenAI API, beside `malhae eval kobest`.

    python3 -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install 'lm-eval[api]'  # once, own venv
    python benchmarks/lm_eval_serve.py --lm-eval /tmp/lmeval-venv/bin/lm_eval [-m MODEL] [--task copa] [--shots 0]
        [--limit N] [--data DIR] [--parallel 4] [--threads 1] [--out DIR] [--json FILE]

What it shows: lm-eval's `local-completions` model scores a log-likelihood task on malhae's server with no Hugging
Face tokenizer (`tokenizer_backend=remote`: /tokenize, /detokenize, /tokenizer_info) and no network (HF_HUB_OFFLINE,
HF_DATASETS_OFFLINE, an empty HF_HOME), and gets what `malhae eval kobest` gets.

1. `malhae serve` starts on the model (default: as `malhae serve` picks it — the settings' default_model, else the
   bundled demo) on a free port (--port 0, read from its log); the script waits for /health 200 and stops the server
   at the end, on an error or on Ctrl-C too.
2. lm-eval runs `--model local-completions --model_args model=ID,base_url=http://127.0.0.1:PORT/v1/completions,
   tokenizer_backend=remote,num_concurrent=4,max_retries=1,tokenized_requests=True,max_length=CTX` (CTX: the
   server's context per request) with `--log_samples`, on a task YAML written to a temporary folder (`dataset_path:
   json`, the local `<task>/train.jsonl` and `test.jsonl`, default models/data/kobest-sample) and `--include_path`.
   Its prompts are malhae's own (app/eval/kobest/tasks.toml, read through app.eval.kobest.tasks): doc_to_text and
   doc_to_choice call the same format strings, target_delimiter is "" because the choices carry their leading space,
   fewshot_delimiter "\\n\\n". (lm-eval's bundled `kobest_copa` differs: its connector is " 그래서" after a space,
   i.e. two spaces before the connector; it also reads skt/kobest_v1 from the hub.)
3. `malhae eval kobest MODEL --tasks TASK --shots K --data DIR --json` runs on the same files (through
   app.cli.main with a wrapper on app.eval.kobest.evaluate.score that records each doc's log-likelihoods, so that
   the two can be compared doc by doc; --no-per-doc runs plain `python -m app eval kobest`).

Printed: both accuracies and macro F1 side by side, lm-eval's wall time, and per doc whether the contexts, the
choices and the predictions agree and how far the log-likelihoods are apart. Where the framing is the same, only
tokenization could differ: lm-eval encodes context + continuation whole and splits it at len(encode(context)),
moving a context's trailing spaces into the continuation; malhae encodes the two apart (the polyglot harness's way).

Caveats that make the two differ by design: with --shots K > 0 the few-shot examples are drawn differently (lm-eval:
its own sampler seeded 1234; malhae: the polyglot branch's rnd seeded 42 that also shuffled the docs), so the contexts
differ. --limit N keeps malhae's first N docs of its seeded shuffle; lm-eval is given the same docs via --samples.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "models" / "data" / "kobest-sample"
SHUFFLE_SEED = 42  # malhae eval kobest (the polyglot harness): rnd.seed(42); rnd.shuffle(docs); docs[:limit]

# Printed by the project's python: the task's format strings as malhae loads them.
DUMP_TASK = """
import dataclasses, json, sys
from app.eval.kobest.tasks import select
print(json.dumps(dataclasses.asdict(select(sys.argv[1])[0]), ensure_ascii=False))
"""

# `malhae eval kobest` through its CLI entry, with each scored doc recorded to the file in $LM_EVAL_SERVE_CAPTURE.
CAPTURE = """
import json, os, sys
import app.eval.kobest.evaluate as E
from app.cli import main
path, rows, score = os.environ.pop("LM_EVAL_SERVE_CAPTURE"), [], E.score
def recording(scorer, model, reqs, progress=None):
    lls = score(scorer, model, reqs, progress)
    rows.extend({"context": r.context, "choices": r.choices, "gold": r.gold, "lls": x} for r, x in zip(reqs, lls))
    return lls
E.score = recording
sys.argv = ["malhae", *sys.argv[1:]]
try:
    rc = main()
finally:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False)
sys.exit(rc)
"""

UTILS = '''"""Written by benchmarks/lm_eval_serve.py: malhae's prompt of one KoBEST task (tasks.toml)."""

SPEC = {spec!r}


def _values(doc):
    values = {{f: doc[f] for f in SPEC["fields"]}}
    if SPEC["connector_field"]:
        values["connector"] = dict(SPEC["connector_map"])[doc[SPEC["connector_field"]].strip()]
    return values


def doc_to_text(doc):
    return SPEC["text_format"].format(**_values(doc))


def doc_to_choice(doc):
    values = _values(doc)
    return [c.format(**values) for c in SPEC["choice_formats"]]
'''


def q(s: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is a subset of it)."""
    return json.dumps(s, ensure_ascii=False)


def task_yaml(name: str, train: Path, test: Path) -> str:
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    train: {q(str(train))}",
        f"    test: {q(str(test))}",
        "training_split: train",
        "fewshot_split: train",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: !function malhae_kobest_utils.doc_to_text",
        "doc_to_choice: !function malhae_kobest_utils.doc_to_choice",
        "doc_to_target: label",
        'target_delimiter: ""',
        'fewshot_delimiter: "\\n\\n"',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def lm_eval_command(path: str) -> list[str]:
    """An `lm_eval` executable, or a python that has lm_eval installed (run as `python -m lm_eval`)."""
    return [path, "-m", "lm_eval"] if Path(path).name.startswith("python") else [path]


def lm_eval_version(cmd: list[str]) -> str:
    """The version of the lm_eval package that cmd runs (asked of the python next to it)."""
    exe = Path(cmd[0])
    python = exe if len(cmd) > 1 else exe.parent / "python"
    if not python.exists():
        return "unknown"
    probe = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('lm_eval'))"],
                           capture_output=True, text=True)
    return probe.stdout.strip() or "unknown"


def tail(path: Path, n: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def get_json(port: int, path: str) -> tuple[int, dict | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        try:
            return resp.status, json.loads(body)
        except ValueError:
            return resp.status, None
    finally:
        conn.close()


def start_server(cmd: list[str], log: Path, timeout: float) -> tuple[subprocess.Popen, int]:
    """Start `malhae serve --port 0`, read its port from the log, return once /health answers 200."""
    env = os.environ | {"COLUMNS": "400", "PYTHONUNBUFFERED": "1"}  # malhae's rich messages on one line each
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    t0, port = time.perf_counter(), None
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"malhae serve exited ({proc.returncode}) while loading:\n{tail(log)}")
            if port is None:
                m = re.search(r"serving on http://[^\s:]+:(\d+)", log.read_text(errors="replace"))
                port = int(m.group(1)) if m else None
            if port is not None:
                try:
                    if get_json(port, "/health")[0] == 200:
                        return proc, port
                except OSError:
                    pass
            time.sleep(0.25)
        raise RuntimeError(f"malhae serve did not become healthy in {timeout:.0f} s:\n{tail(log)}")
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def split_file(data: Path, task: str, split: str) -> Path:
    for ext in (".jsonl", ".json"):
        if (data / task / f"{split}{ext}").is_file():
            return (data / task / f"{split}{ext}").resolve()
    raise SystemExit(f"error: no {data / task / (split + '.jsonl')} (lm-eval's json loader reads .jsonl/.json)")


def limited_indices(test: Path, limit: int) -> list[int]:
    """The test docs (file indices) `malhae eval kobest --limit N` scores: the first N after its seeded shuffle."""
    n = sum(1 for line in test.read_text(encoding="utf-8").splitlines() if line.strip())
    order = list(range(n))
    rnd = random.Random()
    rnd.seed(SHUFFLE_SEED)
    rnd.shuffle(order)  # a shuffle's permutation depends only on the length: the same as shuffling the docs
    return order[:limit]


def macro_f1(golds: list[int], preds: list[int]) -> float:
    """As app/eval/kobest/metrics.py (sklearn's average="macro" over the union of labels, 0/0 as 0)."""
    scores = []
    for label in sorted(set(golds) | set(preds)):
        tp = sum(g == label and p == label for g, p in zip(golds, preds, strict=True))
        fp = sum(g != label and p == label for g, p in zip(golds, preds, strict=True))
        fn = sum(g == label and p != label for g, p in zip(golds, preds, strict=True))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return sum(scores) / len(scores) if scores else float("nan")


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first of equal maxima, as np.argmax


def read_lm_eval(out: Path, task: str) -> tuple[dict, list[dict]]:
    results = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    samples = sorted(out.rglob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not results or not samples:
        raise RuntimeError(f"lm-eval wrote no results_*.json / samples_{task}_*.jsonl under {out}")
    rows = [json.loads(line) for line in samples[-1].read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(results[-1].read_text(encoding="utf-8")), rows


def lm_eval_docs(samples: list[dict]) -> list[dict]:
    """Per logged sample: context, choices (continuations as scored), gold, log-likelihoods, prediction."""
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        args = s["arguments"]
        pairs = [(a["arg_0"], a["arg_1"]) for a in args.values()] if isinstance(args, dict) else [tuple(a)
                                                                                                  for a in args]
        lls = [float(r[0]) for r in s["filtered_resps"]]
        out.append({"doc_id": s["doc_id"], "context": pairs[0][0], "choices": [c for _, c in pairs],
                    "gold": int(s["target"]), "lls": lls, "pred": argmax(lls)})
    return out


def doc_key(context: str, choices: list[str]) -> tuple:
    """A doc's identity whatever few-shot examples precede it: its own text (after the last "\\n\\n") and choices."""
    return context.rsplit("\n\n", 1)[-1], tuple(choices)


def compare(lm_docs: list[dict], ours: list[dict]) -> dict:
    by_key = {doc_key(r["context"], r["choices"]): r for r in ours}
    rows, unmatched = [], []
    for d in lm_docs:
        r = by_key.get(doc_key(d["context"], d["choices"]))
        if r is None:
            unmatched.append(d["doc_id"])
            continue
        pred = argmax(r["lls"])
        rows.append({"doc_id": d["doc_id"], "gold": d["gold"], "lm_eval_pred": d["pred"], "malhae_pred": pred,
                     "same_context": d["context"] == r["context"], "gold_agrees": d["gold"] == r["gold"],
                     "lm_eval_lls": d["lls"], "malhae_lls": r["lls"],
                     "max_abs_diff": max(abs(a - b) for a, b in zip(d["lls"], r["lls"], strict=True))})
    return {"docs": rows, "unmatched_lm_eval_docs": unmatched, "malhae_docs": len(ours),
            "agree": sum(r["lm_eval_pred"] == r["malhae_pred"] for r in rows),
            "same_context": sum(r["same_context"] for r in rows),
            "max_abs_diff": max((r["max_abs_diff"] for r in rows), default=None)}


def scan_logs(lm_log: Path, server_log: Path) -> list[str]:
    """Lines that say a request went wrong: lm-eval's failed-request warnings, the server's tracebacks and 4xx/5xx."""
    found = []
    for line in lm_log.read_text(errors="replace").splitlines():
        if re.search(r"API request failed|Retry attempt|Traceback|Error:", line):
            found.append(f"lm-eval: {line.strip()[:500]}")
    for line in server_log.read_text(errors="replace").splitlines():
        if re.search(r"Traceback|internal error|\" [45]\d\d ", line):
            found.append(f"server: {line.strip()[:500]}")
    return found


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:5]))
    parser.add_argument("--lm-eval", required=True,
                        help="the lm_eval executable of a separate venv (or its python, run as python -m lm_eval)")
    parser.add_argument("-m", "--model", help="a name from `malhae models` or a .gguf (default: as malhae picks)")
    parser.add_argument("--task", default="copa", help="KoBEST task: copa, boolq, sentineg, wic, hellaswag")
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples (>0: drawn differently, see above)")
    parser.add_argument("--limit", type=int, help="docs: malhae's first N of its seeded shuffle (default: all)")
    parser.add_argument("--data", type=Path, default=SAMPLE, help="folder with <task>/train.jsonl and test.jsonl")
    parser.add_argument("--parallel", type=int, default=4, help="server slots (malhae serve --parallel)")
    parser.add_argument("--num-concurrent", type=int, default=4, help="lm-eval's concurrent requests")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the server and of malhae eval")
    parser.add_argument("--python", default=sys.executable, help="the python malhae runs on (default: this one)")
    parser.add_argument("--out", type=Path, help="keep the task, logs and lm-eval output here (default: a temp dir)")
    parser.add_argument("--load-timeout", type=float, default=600, help="seconds the server may take to load")
    parser.add_argument("--no-per-doc", action="store_true", help="run plain `python -m app eval kobest`")
    parser.add_argument("--json", type=Path, help="also write everything compared to this file")
    args = parser.parse_args()
    if args.shots < 0 or (args.limit is not None and args.limit < 1):
        parser.error("--shots takes 0 or more, --limit 1 or more")

    lm_cmd = lm_eval_command(args.lm_eval)
    if shutil.which(lm_cmd[0]) is None:
        parser.error(f"--lm-eval {args.lm_eval}: not an executable")
    version = lm_eval_version(lm_cmd)
    data = args.data.resolve()
    train, test = split_file(data, args.task, "train"), split_file(data, args.task, "test")
    dump = subprocess.run([args.python, "-c", DUMP_TASK, args.task], capture_output=True, text=True, cwd=ROOT)
    if dump.returncode:
        raise SystemExit(f"error: reading malhae's {args.task} prompt failed:\n{dump.stderr.strip()}")
    spec = json.loads(dump.stdout)
    name = f"malhae_kobest_{spec['name']}"

    work = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="lm-eval-serve-"))
    tasks_dir, out_dir, hf_home = work / "tasks", work / "lm-eval-out", work / "hf-home"
    for d in (tasks_dir, out_dir, hf_home):
        d.mkdir(parents=True, exist_ok=True)
    (tasks_dir / f"{name}.yaml").write_text(task_yaml(name, train, test), encoding="utf-8")
    (tasks_dir / "malhae_kobest_utils.py").write_text(UTILS.format(spec=spec), encoding="utf-8")
    server_log, lm_log = work / "serve.log", work / "lm-eval.log"
    print(f"lm-eval {version} ({args.lm_eval}); work folder: {work}", file=sys.stderr)

    def interrupted(signum, frame):  # SIGTERM/SIGHUP end the run as Ctrl-C does: through the finally below
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    model_args = [] if args.model is None else ["-m", args.model]
    serve_cmd = [args.python, "-m", "app", "serve", *model_args, "--port", "0", "--parallel", str(args.parallel),
                 "--threads", str(args.threads)]
    proc = None
    try:
        print(f"starting: {' '.join(serve_cmd)}", file=sys.stderr)
        t0 = time.perf_counter()
        proc, port = start_server(serve_cmd, server_log, args.load_timeout)
        card = get_json(port, "/v1/models")[1]["data"][0]
        model_id, n_ctx = card["id"], card.get("max_model_len") or card.get("context_length")
        served_file = card.get("meta", {}).get("file")
        print(f"  healthy after {time.perf_counter() - t0:.1f} s on port {port}: {model_id}, {n_ctx} tokens",
              file=sys.stderr)
        base = f"http://127.0.0.1:{port}/v1/completions"
        margs = (f"model={model_id},base_url={base},tokenizer_backend=remote,num_concurrent={args.num_concurrent},"
                 f"max_retries=1,tokenized_requests=True,max_length={n_ctx}")
        lm_run = [*lm_cmd, "--model", "local-completions", "--model_args", margs, "--tasks", name,
                  "--include_path", str(tasks_dir), "--num_fewshot", str(args.shots), "--output_path", str(out_dir),
                  "--log_samples"]
        if args.limit is not None:
            lm_run += ["--samples", json.dumps({name: limited_indices(test, args.limit)})]
        env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                            "HF_HOME": str(hf_home), "HF_DATASETS_CACHE": str(hf_home / "datasets"),
                            "TOKENIZERS_PARALLELISM": "false"}
        env.pop("OPENAI_API_KEY", None)
        print(f"running: {subprocess.list2cmdline(lm_run)}", file=sys.stderr)
        t0 = time.perf_counter()
        with open(lm_log, "wb") as f:
            rc = subprocess.run(lm_run, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=work).returncode
        lm_wall = time.perf_counter() - t0
    finally:
        stop_server(proc)
    problems = scan_logs(lm_log, server_log)
    if rc:
        print(f"lm-eval failed ({rc}) after {lm_wall:.1f} s; its log ({lm_log}):\n{tail(lm_log, 40)}\n"
              f"server log ({server_log}):\n{tail(server_log, 20)}", file=sys.stderr)
        raise SystemExit(1)
    results, samples = read_lm_eval(out_dir, name)
    lm_docs = lm_eval_docs(samples)
    lm_golds, lm_preds = [d["gold"] for d in lm_docs], [d["pred"] for d in lm_docs]
    lm_acc = results["results"][name].get("acc,none")

    kobest = ["eval", "kobest", *([args.model] if args.model else []), "--tasks", args.task, "--shots",
              str(args.shots), "--data", str(data), "--threads", str(args.threads), "--json",
              *(["--limit", str(args.limit)] if args.limit is not None else [])]
    capture = work / "malhae-docs.json"
    ours_cmd = [args.python, "-m", "app", *kobest] if args.no_per_doc else [args.python, "-c", CAPTURE, *kobest]
    print(f"running: {args.python} -m app {' '.join(kobest)}" + ("" if args.no_per_doc else " (recording docs)"),
          file=sys.stderr)
    t0 = time.perf_counter()
    ours = subprocess.run(ours_cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ | {
        "LM_EVAL_SERVE_CAPTURE": str(capture), "COLUMNS": "400"})
    ours_wall = time.perf_counter() - t0
    if ours.returncode:
        raise SystemExit(f"error: malhae eval kobest failed ({ours.returncode}):\n{ours.stderr.strip()[-3000:]}")
    report = json.loads(ours.stdout)
    cell = next(c for c in report["results"] if c["task"] == args.task and c["shots"] == args.shots)
    per_doc = None if args.no_per_doc else compare(lm_docs, json.loads(capture.read_text(encoding="utf-8")))

    print()
    print(f"KoBEST {spec['title']} {args.shots}-shot, data {data}, model {model_id}")
    if served_file and Path(served_file).resolve() != Path(report["model"]).resolve():
        print(f"WARNING: the server loaded {served_file}, malhae eval kobest {report['model']}")
    print(f"{'':<12}{'lm-eval via malhae serve':>26}{'malhae eval kobest':>22}")
    print(f"{'docs':<12}{len(lm_docs):>26}{cell['n']:>22}")
    print(f"{'accuracy':<12}{fmt(lm_acc):>26}{fmt(cell['acc']):>22}")
    print(f"{'macro F1':<12}{fmt(macro_f1(lm_golds, lm_preds) if lm_docs else None):>26}{fmt(cell['f1']):>22}")
    print(f"{'wall time':<12}{f'{lm_wall:.1f} s (lm-eval process)':>26}{f'{ours_wall:.1f} s (process)':>22}")
    if "total_evaluation_time_seconds" in results:
        print(f"lm-eval's own total_evaluation_time_seconds: {float(results['total_evaluation_time_seconds']):.1f} s")
    if per_doc:
        n = len(per_doc["docs"])
        print(f"per doc: {per_doc['agree']}/{n} predictions agree, {per_doc['same_context']}/{n} contexts identical, "
              f"max |Δ log-likelihood| {per_doc['max_abs_diff']:.2e}"
              + (f"; unmatched lm-eval docs {per_doc['unmatched_lm_eval_docs']}" if per_doc["unmatched_lm_eval_docs"]
                 else ""))
        for r in per_doc["docs"]:
            if r["lm_eval_pred"] != r["malhae_pred"] or not r["gold_agrees"]:
                print(f"  doc {r['doc_id']}: gold {r['gold']}, lm-eval {r['lm_eval_pred']} {r['lm_eval_lls']}, "
                      f"malhae {r['malhae_pred']} {r['malhae_lls']}")
    if problems:
        print(f"{len(problems)} log line(s) about failed requests (logs in {work}):")
        for p in problems[:20]:
            print(f"  {p}")
    else:
        print("no failed requests in lm-eval's or the server's log")
    if args.json:
        args.json.write_text(json.dumps({
            "lm_eval_version": version, "lm_eval_command": lm_run, "lm_eval_wall_s": round(lm_wall, 3),
            "lm_eval_acc": lm_acc, "lm_eval_docs": lm_docs, "malhae": report, "malhae_wall_s": round(ours_wall, 3),
            "per_doc": per_doc, "problems": problems, "work": str(work)}, ensure_ascii=False, indent=1),
            encoding="utf-8")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:  # the server would not start, lm-eval wrote no results: one message, no traceback
        sys.exit(f"error: {e}")
