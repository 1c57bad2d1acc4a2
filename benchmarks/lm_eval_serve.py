"""lm-evaluation-harness against `malhae serve` and against transformers, beside `malhae eval kobest` local and remote.

    python3 -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install 'lm-eval[api]' transformers  # own venv
    /tmp/lmeval-venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu  # for --hf
    python benchmarks/lm_eval_serve.py --lm-eval /tmp/lmeval-venv/bin/lm_eval [-m MODEL] [--task copa] [--shots 0]
        [--limit N] [--data DIR] [--hf | --no-hf] [--hf-model DIR] [--parallel 4] [--threads 1] [--out DIR]
        [--show N] [--json FILE]

What it shows: lm-eval's `local-completions` model scores a log-likelihood task on malhae's server with no Hugging
Face tokenizer (`tokenizer_backend=remote`: /tokenize, /detokenize, /tokenizer_info) and no network (HF_HUB_OFFLINE,
HF_DATASETS_OFFLINE, an empty HF_HOME), and gets what `malhae eval kobest` gets, locally and through the server; and
how far all of them are from lm-eval's own transformers model on the Hugging Face checkpoint of the same weights.
Four sources score the same test docs, per doc and per choice:

 (a) lm-eval `local-completions` against `malhae serve`;
 (b) lm-eval `hf` on the Hugging Face checkpoint (--hf-model, default models/demo/hf: the demo model's weights;
     `--model hf --model_args pretrained=DIR,dtype=float32 --device cpu`; lm-eval 0.4.13 refuses `device=` inside
     --model_args, its --device default is cuda:0 and both reach HFLM as one keyword). On by default when
     transformers and torch import in lm-eval's venv, --no-hf skips it, --hf insists;
 (c) `malhae eval kobest` locally on the GGUF (`--endpoint local`, whatever MALHAE_ENDPOINT or config.toml say);
 (d) `malhae eval kobest --endpoint http://127.0.0.1:PORT/v1` against the same running server (echo + logprobs on
     /v1/completions, app/eval/remote.py).

1. `malhae serve` starts on the model (default: as `malhae serve` picks it — the settings' default_model, else the
   bundled demo) on a free port (--port 0, read from its log); the script waits for /health 200 and stops the server
   once (a) and (d) are done, on an error or on Ctrl-C too. MALHAE_API_KEY and MALHAE_ENDPOINT are dropped from
   every child's environment: the server listens on loopback without a key, and each malhae run says where it scores.
2. (a) runs `--model local-completions --model_args model=ID,base_url=http://127.0.0.1:PORT/v1/completions,
   tokenizer_backend=remote,num_concurrent=4,max_retries=1,tokenized_requests=True,max_length=CTX` (CTX: the
   server's context per request) with `--log_samples`, on a task YAML written to a temporary folder (`dataset_path:
   json`, the local `<task>/train.jsonl` and `test.jsonl`, default models/data/kobest-sample) and `--include_path`;
   (b) the same task YAML, include path, offline environment and --log_samples, each into its own output folder.
   The prompts are malhae's own (app/eval/kobest/tasks.toml, read through app.eval.kobest.tasks): doc_to_text and
   doc_to_choice call the same format strings, target_delimiter is "" because the choices carry their leading space,
   fewshot_delimiter "\\n\\n". (lm-eval's bundled `kobest_copa` differs: its connector is " 그래서" after a space,
   i.e. two spaces before the connector; it also reads skt/kobest_v1 from the hub.)
3. (c) and (d) run `malhae eval kobest [MODEL] --tasks TASK --shots K --data DIR --json` on the same files, through
   app.cli.main with a wrapper on app.eval.kobest.evaluate.score(scorer, tokenize, reqs, progress) that records each
   doc's log-likelihoods — the same function scores local and remote runs — so that all four can be compared doc by
   doc (--no-per-doc runs plain `python -m malhae eval kobest`: scores only).

Docs are aligned by their index in the test file, choices by position: lm-eval logs it as doc_id; malhae scores
the docs in its seeded shuffle, which this script replays. (With --samples, lm-eval 0.4.13 runs the chosen docs in
file order but labels the k-th with the k-th index of the list as given, so the list goes in sorted.) Each pair's
docs are also checked to be the same text and choices: a misalignment shows as "not the same doc".

Printed: per source the docs, accuracy, macro F1 and wall time; per pair (a-c, d-c, a-d, a-b, c-b) how many docs
and predictions agree and the max and mean |Δ log-likelihood| over every (doc, choice); then, per doc and choice,
the four log-likelihoods (* marks each source's prediction). What to expect: a-c, d-c, a-d about 1e-6 (one GGUF,
one llama.cpp) where the server computes a prompt as the local scorer does — on the demo model and the sample, COPA
within 7e-8 and a-d exactly 0; but the server batches prompts (across slots, with an f16 K/V cache) otherwise than
the local scorer and than each other's requests, which moves some of BoolQ's choices by up to ~1e-3 and HellaSwag's
longer ones by up to ~1e-2 (as far as `--precise` moves the local ones); a-b and c-b about 0.01-0.02 per summed
log-likelihood, because transformers computes GPT-NeoX's GELU exactly and llama.cpp with the tanh approximation
(README.md, "Checked against transformers").

Where the framing is the same, only tokenization could differ: lm-eval ((a) and (b)) encodes context + continuation
whole and splits it at len(encode(context)), moving a context's trailing spaces into the continuation; malhae ((c)
and (d)) encodes the two apart (the polyglot harness's way). BoolQ's context ends in a space, so there (a) and (b)
score one token more than (c) and (d) — "  예" against " 예" — and a-c, a-d and c-b measure that, not the model;
the report counts such contexts. (b) also tokenizes with the checkpoint's tokenizer.json, the others with the
GGUF's vocabulary (the server's /tokenize for (a) and (d)).

Caveats that make them differ by design: with --shots K > 0 the few-shot examples are drawn differently (lm-eval:
its own sampler seeded 1234; malhae: the polyglot branch's rnd seeded 42 that also shuffled the docs), so the contexts
of (a)/(b) and (c)/(d) differ. --limit N keeps malhae's first N docs of its seeded shuffle; lm-eval is given the same
docs via --samples. The truncation windows are each one's own: (a) the server's context, (b) the checkpoint's
max_position_embeddings, (c) the local scorer's window, (d) the server's context less two tokens.
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

import processes  # benchmarks/processes.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "models" / "data" / "kobest-sample"
DEMO_GGUF = ROOT / "models" / "malhae-demo-ko-f16.gguf"  # the bundled demo model ...
DEMO_HF = ROOT / "models" / "demo" / "hf"  # ... and its Hugging Face checkpoint (the same weights)
SHUFFLE_SEED = 42  # malhae eval kobest (the polyglot harness): rnd.seed(42); rnd.shuffle(docs); docs[:limit]

# Printed by the project's python: the task's format strings as malhae loads them.
DUMP_TASK = """
import dataclasses, json, sys
from malhae.eval.kobest.tasks import select
print(json.dumps(dataclasses.asdict(select(sys.argv[1])[0]), ensure_ascii=False))
"""

# Printed by lm-eval's python: what it has of lm_eval and of lm-eval's `hf` model (transformers on torch).
PROBE = """
import importlib, importlib.metadata as m, json
out = {}
for name in ("lm_eval", "transformers", "torch"):
    try:
        out[name] = m.version(name) if name == "lm_eval" else importlib.import_module(name).__version__
    except Exception as e:  # ImportError, or a broken install
        out[name], out[name + "_error"] = None, f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""

# `malhae eval kobest` (local or --endpoint) through its CLI entry, each scored doc recorded to $LM_EVAL_SERVE_CAPTURE.
CAPTURE = """
import inspect, json, os, sys
import malhae.eval.kobest.evaluate as E
from malhae.cli import main
path, rows, score = os.environ.pop("LM_EVAL_SERVE_CAPTURE"), [], E.score
if list(inspect.signature(score).parameters)[:3] != ["scorer", "tokenize", "reqs"]:
    sys.exit(f"lm_eval_serve.py: app.eval.kobest.evaluate.score{inspect.signature(score)} is no longer "
             "score(scorer, tokenize, reqs, progress); update the script's CAPTURE wrapper")
def recording(scorer, tokenize, reqs, progress=None):  # evaluate.score's signature, local and --endpoint alike
    lls = score(scorer, tokenize, reqs, progress)
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


def lm_eval_python(cmd: list[str]) -> Path | None:
    """The python that cmd runs lm_eval on: cmd's own (python -m lm_eval), else the one next to the executable."""
    exe = Path(shutil.which(cmd[0]) or cmd[0])
    python = exe if len(cmd) > 1 else exe.parent / "python"
    return python if python.exists() else None


def lm_eval_versions(cmd: list[str]) -> dict[str, str | None]:
    """lm_eval's, transformers' and torch's versions in cmd's python (None: does not import; then the error under
    "<name>_error")."""
    python = lm_eval_python(cmd)
    if python is None:
        return {"lm_eval": None, "transformers": None, "torch": None, "transformers_error": "no python next to it"}
    probe = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True)
    try:
        return json.loads(probe.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"lm_eval": None, "transformers": None, "torch": None,
                "transformers_error": (probe.stderr.strip().splitlines() or ["the probe printed nothing"])[-1]}


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
        processes.stop(proc)
        raise



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
    """Per logged sample: its test-file index (doc_id: --samples goes in sorted), context, choices (continuations as
    scored), gold, log-likelihoods, prediction."""
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        args = s["arguments"]
        pairs = [(a["arg_0"], a["arg_1"]) for a in args.values()] if isinstance(args, dict) else [tuple(a)
                                                                                                  for a in args]
        lls = [float(r[0]) for r in s["filtered_resps"]]
        out.append({"doc": s["doc_id"], "context": pairs[0][0], "choices": [c for _, c in pairs],
                    "gold": int(s["target"]), "lls": lls, "pred": argmax(lls)})
    return out


def malhae_docs(rows: list[dict], order: list[int]) -> list[dict]:
    """The recorded docs of a `malhae eval kobest` run with their test-file indices: it scores them in the order of
    its seeded shuffle (order: the shuffled indices, cut at --limit)."""
    if len(rows) != len(order):
        raise RuntimeError(f"malhae eval kobest recorded {len(rows)} docs, its shuffle has {len(order)}: the doc "
                           "order this script replays is not malhae's")
    return [{"doc": i, **r, "pred": argmax(r["lls"])} for i, r in zip(order, rows, strict=True)]


def doc_key(context: str, choices: list[str]) -> tuple:
    """A doc's identity whatever few-shot examples precede it: its own text (after the last "\\n\\n") and choices."""
    return context.rsplit("\n\n", 1)[-1], tuple(choices)


def compare(first: list[dict] | None, second: list[dict] | None) -> dict | None:
    """Two sources' docs, aligned by test-file index and choice: how many are the same doc (text and choices), have
    the same context and prediction, and the max and mean |Δ log-likelihood| over every (doc, choice)."""
    if first is None or second is None:
        return None
    x, y = {d["doc"]: d for d in first}, {d["doc"]: d for d in second}
    rows, diffs, different = [], [], []
    for i in sorted(x.keys() & y.keys()):
        dx, dy = x[i], y[i]
        if doc_key(dx["context"], dx["choices"]) != doc_key(dy["context"], dy["choices"]):
            different.append(i)  # misaligned: the same index, another doc
            continue
        delta = [a - b for a, b in zip(dx["lls"], dy["lls"], strict=True)]
        diffs += [abs(v) for v in delta]
        rows.append({"doc": i, "delta": delta, "max_abs_diff": max(abs(v) for v in delta),
                     "preds": [dx["pred"], dy["pred"]], "same_context": dx["context"] == dy["context"],
                     "gold_agrees": dx["gold"] == dy["gold"]})
    return {"docs": len(rows), "only_first": sorted(x.keys() - y.keys()), "only_second": sorted(y.keys() - x.keys()),
            "different_docs": different, "agree": sum(r["preds"][0] == r["preds"][1] for r in rows),
            "same_context": sum(r["same_context"] for r in rows), "gold_agrees": sum(r["gold_agrees"] for r in rows),
            "choices": len(diffs), "max_abs_diff": max(diffs, default=None),
            "mean_abs_diff": sum(diffs) / len(diffs) if diffs else None, "per_doc": rows}


def scan_logs(logs: dict[str, Path], server_log: Path) -> list[str]:
    """Lines that say a request went wrong: lm-eval's failed-request warnings, the server's tracebacks and 4xx/5xx."""
    found = []
    for label, log in logs.items():
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            if re.search(r"API request failed|Retry attempt|Traceback|Error:", line):
                found.append(f"{label}: {line.strip()[:500]}")
    for line in server_log.read_text(errors="replace").splitlines():
        if re.search(r"Traceback|internal error|\" [45]\d\d ", line):
            found.append(f"server: {line.strip()[:500]}")
    return found


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def sci(x: float | None) -> str:
    return "—" if x is None else f"{x:.2e}"


SOURCES = {
    "a": "lm-eval local-completions → malhae serve",
    "b": "lm-eval hf (transformers, float32, cpu)",
    "c": "malhae eval kobest, local GGUF",
    "d": "malhae eval kobest --endpoint → serve",
}
PAIRS = [  # (first, second, what to expect)
    ("a", "c", "~1e-6: one GGUF; lm-eval via the server vs malhae local"),
    ("d", "c", "~1e-6: one GGUF, one procedure; via the server vs local"),
    ("a", "d", "~1e-6: one server; lm-eval's requests vs malhae's"),
    ("a", "b", "~0.01-0.02: exact GELU (transformers) vs tanh (llama.cpp)"),
    ("c", "b", "~0.01-0.02: exact GELU (transformers) vs tanh (llama.cpp)"),
]
CHILD_ENV_DROP = ("MALHAE_API_KEY", "MALHAE_ENDPOINT", "OPENAI_API_KEY")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CHILD_ENV_DROP}
    return env | extra


def run_lm_eval(command: list[str], log: Path, env: dict, cwd: Path) -> tuple[int, float]:
    print(f"running: {subprocess.list2cmdline(command)}", file=sys.stderr)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        rc = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                            cwd=cwd).returncode
    return rc, time.perf_counter() - t0


def lm_eval_failed(what: str, rc: int, wall: float, log: Path, server_log: Path | None) -> SystemExit:
    server = f"\nserver log ({server_log}):\n{tail(server_log, 20)}" if server_log else ""
    print(f"lm-eval ({what}) failed ({rc}) after {wall:.1f} s; its log ({log}):\n{tail(log, 40)}{server}",
          file=sys.stderr)
    return SystemExit(1)


def run_malhae(python: str, kobest: list[str], capture: Path, log: Path, per_doc: bool,
               label: str) -> tuple[dict, list[dict] | None, float]:
    """`malhae eval kobest ... --json`: its report, the recorded docs (per_doc) and the process' wall time."""
    cmd = [python, "-c", CAPTURE, *kobest] if per_doc else [python, "-m", "malhae", *kobest]
    print(f"running: {python} -m app {subprocess.list2cmdline(kobest)}" + (" (recording docs)" if per_doc else ""),
          file=sys.stderr)
    capture.unlink(missing_ok=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env=child_env(LM_EVAL_SERVE_CAPTURE=str(capture), COLUMNS="400"))
    wall = time.perf_counter() - t0
    log.write_text(done.stderr, encoding="utf-8")
    if done.returncode:
        raise SystemExit(f"error: {label} failed ({done.returncode}):\n{done.stderr.strip()[-3000:]}")
    rows = json.loads(capture.read_text(encoding="utf-8")) if per_doc else None
    return json.loads(done.stdout), rows, wall


def lm_source(label: str, results: dict, docs: list[dict], name: str, wall: float, command: list[str]) -> dict:
    golds, preds = [d["gold"] for d in docs], [d["pred"] for d in docs]
    acc = results["results"][name].get("acc,none")
    own = sum(g == p for g, p in zip(golds, preds, strict=True)) / len(docs) if docs else None
    return {"label": label, "n": len(docs), "acc": own if acc is None else acc, "acc_from_docs": own,
            "f1": macro_f1(golds, preds) if docs else None, "wall_s": round(wall, 3), "command": command,
            "total_evaluation_time_seconds": results.get("total_evaluation_time_seconds"), "docs": docs}


def malhae_source(label: str, report: dict, task: str, shots: int, docs: list[dict] | None, wall: float,
                  command: list[str]) -> dict:
    cell = next(c for c in report["results"] if c["task"] == task and c["shots"] == shots)
    if cell.get("skipped"):
        raise SystemExit(f"error: {label}: {cell['skipped']}")
    return {"label": label, "n": cell["n"], "acc": cell["acc"], "f1": cell["f1"], "acc_norm": cell.get("acc_norm"),
            "wall_s": round(wall, 3), "command": command, "model": report["model"], "cell": cell, "docs": docs}


def merged_docs(sources: dict[str, dict]) -> list[dict]:
    """Per test-file index: the doc's gold, choices and every source's log-likelihoods and prediction."""
    out: dict[int, dict] = {}
    for key, src in sources.items():
        for d in src.get("docs") or []:
            row = out.setdefault(d["doc"], {"doc": d["doc"], "gold": d["gold"], "choices": d["choices"],
                                            "context_ends_in_space": d["context"][-1:].isspace(), "lls": {},
                                            "preds": {}})
            row["lls"][key], row["preds"][key] = d["lls"], d["pred"]
    return [out[i] for i in sorted(out)]


def print_report(sources: dict[str, dict | None], pairs: dict[str, dict | None], docs: list[dict], show: int) -> None:
    print(f"{'source':<46}{'docs':>6}{'accuracy':>10}{'macro F1':>10}  wall time (process)")
    for key, label in SOURCES.items():
        src = sources.get(key)
        if src is None or src.get("skipped"):
            print(f"({key}) {label:<42}  skipped: {src['skipped'] if src else 'not run'}")
            continue
        print(f"({key}) {label:<42}{src['n']:>6}{fmt(src['acc']):>10}{fmt(src['f1']):>10}  {src['wall_s']:.1f} s")
    own = [f"({k}) {float(s['total_evaluation_time_seconds']):.1f} s" for k, s in sources.items()
           if s and s.get("total_evaluation_time_seconds") is not None]
    if own:
        print(f"lm-eval's own total_evaluation_time_seconds: {', '.join(own)}")
    print()
    print(f"{'pair':<6}{'docs':>5}{'same ctx':>10}{'agree':>8}{'max |Δ ll|':>12}{'mean |Δ ll|':>13}  expected")
    for (x, y, expected), (name, r) in zip(PAIRS, pairs.items(), strict=True):
        if r is None:
            why = [f"({k}) " + ("skipped" if (sources.get(k) or {}).get("skipped") else "has no per-doc scores")
                   for k in (x, y) if not (sources.get(k) or {}).get("docs")]
            print(f"{name:<6}    —  {', '.join(why)}")
            continue
        same, agree = f"{r['same_context']}/{r['docs']}", f"{r['agree']}/{r['docs']}"
        print(f"{name:<6}{r['docs']:>5}{same:>10}{agree:>8}{sci(r['max_abs_diff']):>12}{sci(r['mean_abs_diff']):>13}"
              f"  {expected}")
        odd = [f"{what} {r[k]}" for k, what in (("only_first", f"only in {x}:"), ("only_second", f"only in {y}:"),
                                                 ("different_docs", "not the same doc at index")) if r[k]]
        if r["gold_agrees"] != r["docs"]:
            odd.append(f"gold labels differ on {r['docs'] - r['gold_agrees']} docs")
        if odd:
            print(f"      {'; '.join(odd)}")
    if any(r and r["same_context"] < r["docs"] for r in pairs.values()):
        print("where 'same ctx' is short of 'docs' the prompts differ (--shots K > 0: lm-eval and malhae draw the "
              "examples\ndifferently): those Δ compare two prompts")
    spaced = sum(d["context_ends_in_space"] for d in docs)
    if spaced:
        print(f"{spaced} of {len(docs)} contexts end in whitespace: lm-eval ((a), (b)) moves it into the continuation "
              "and scores\none token more than malhae ((c), (d)) there; a-c, a-d and c-b measure that split, not the "
              "model")
    if not docs:
        return
    keys = [k for k in SOURCES if any(k in d["lls"] for d in docs)]
    shown = [d for i, d in enumerate(docs) if i < show or len({d["preds"][k] for k in keys if k in d["preds"]}) > 1]
    print()
    print(f"per doc and choice: log-likelihoods (* each source's prediction, g the gold choice); "
          f"{len(shown)} of {len(docs)} docs" + ("" if len(shown) == len(docs) else
                                                  f" (the first {show} and those where predictions differ)"))
    deltas = [(x, y) for x, y in (("a", "c"), ("d", "c"), ("a", "b")) if x in keys and y in keys]
    print(f"{'doc':>4}{'ch':>4} " + "".join(f"{f'({k})':>14}" for k in keys)
          + "".join(f"{f'{x}-{y}':>11}" for x, y in deltas))
    for d in shown:
        for j in range(len(d["choices"])):
            cells = []
            for k in keys:
                lls = d["lls"].get(k)
                cells.append(f"{'—':>14}" if lls is None else f"{lls[j]:>13.6f}{'*' if d['preds'][k] == j else ' '}")
            diffs = [f"{d['lls'][x][j] - d['lls'][y][j]:>11.2e}" if x in d["lls"] and y in d["lls"] else f"{'—':>11}"
                     for x, y in deltas]
            print(f"{d['doc'] if j == 0 else '':>4}{str(j) + ('g' if d['gold'] == j else ' '):>4} "
                  + "".join(cells) + "".join(diffs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:7]))
    parser.add_argument("--lm-eval", required=True,
                        help="the lm_eval executable of a separate venv (or its python, run as python -m lm_eval)")
    parser.add_argument("-m", "--model", help="a name from `malhae models` or a .gguf (default: as malhae picks)")
    parser.add_argument("--task", default="copa", help="KoBEST task: copa, boolq, sentineg, wic, hellaswag")
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples (>0: drawn differently, see above)")
    parser.add_argument("--limit", type=int, help="docs: malhae's first N of its seeded shuffle (default: all)")
    parser.add_argument("--data", type=Path, default=SAMPLE, help="folder with <task>/train.jsonl and test.jsonl")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=None,
                        help="also run lm-eval's hf model on --hf-model (default: when transformers and torch "
                             "import in lm-eval's python)")
    parser.add_argument("--hf-model", type=Path, default=DEMO_HF,
                        help="the Hugging Face checkpoint of the served model (default: the demo's, models/demo/hf)")
    parser.add_argument("--parallel", type=int, default=4, help="server slots (malhae serve --parallel)")
    parser.add_argument("--num-concurrent", type=int, default=4, help="lm-eval's concurrent requests")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the server and of malhae eval")
    parser.add_argument("--python", default=sys.executable, help="the python malhae runs on (default: this one)")
    parser.add_argument("--out", type=Path, help="keep the task, logs and lm-eval output here (default: a temp dir)")
    parser.add_argument("--load-timeout", type=float, default=600, help="seconds the server may take to load")
    parser.add_argument("--no-per-doc", action="store_true", help="run plain `python -m malhae eval kobest` (c, d)")
    parser.add_argument("--show", type=int, default=20,
                        help="per-choice rows for the first N docs and every doc where predictions differ")
    parser.add_argument("--json", type=Path, help="also write everything compared to this file")
    args = parser.parse_args()
    if args.shots < 0 or (args.limit is not None and args.limit < 1):
        parser.error("--shots takes 0 or more, --limit 1 or more")

    lm_cmd = lm_eval_command(args.lm_eval)
    if shutil.which(lm_cmd[0]) is None:
        parser.error(f"--lm-eval {args.lm_eval}: not an executable")
    versions = lm_eval_versions(lm_cmd)
    version = versions.get("lm_eval") or "unknown"
    hf_importable = bool(versions.get("transformers") and versions.get("torch"))
    hf_why = versions.get("transformers_error") or versions.get("torch_error") or ""
    if args.hf and not hf_importable:
        parser.error(f"--hf: transformers and torch do not import in lm-eval's python ({hf_why}); install them in "
                     "its venv (torch from https://download.pytorch.org/whl/cpu) or pass --no-hf")
    use_hf = hf_importable if args.hf is None else args.hf
    hf_model = args.hf_model.resolve()
    if use_hf and not (hf_model / "config.json").is_file():
        parser.error(f"--hf-model {args.hf_model}: no config.json there (a Hugging Face checkpoint folder)")
    data = args.data.resolve()
    train, test = split_file(data, args.task, "train"), split_file(data, args.task, "test")
    dump = subprocess.run([args.python, "-c", DUMP_TASK, args.task], capture_output=True, text=True, cwd=ROOT)
    if dump.returncode:
        raise SystemExit(f"error: reading malhae's {args.task} prompt failed:\n{dump.stderr.strip()}")
    spec = json.loads(dump.stdout)
    name = f"malhae_kobest_{spec['name']}"
    n_test = sum(1 for line in test.read_text(encoding="utf-8").splitlines() if line.strip())
    order = limited_indices(test, args.limit if args.limit is not None else n_test)  # malhae's docs, in its order
    indices = None if args.limit is None else order  # what lm-eval is given by --samples

    work = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="lm-eval-serve-"))
    tasks_dir, out_dir, hf_home = work / "tasks", work / "lm-eval-out", work / "hf-home"
    serve_out, hf_out = out_dir / "local-completions", out_dir / "hf"
    for d in (tasks_dir, serve_out, hf_out, hf_home):
        d.mkdir(parents=True, exist_ok=True)
    (tasks_dir / f"{name}.yaml").write_text(task_yaml(name, train, test), encoding="utf-8")
    (tasks_dir / "malhae_kobest_utils.py").write_text(UTILS.format(spec=spec), encoding="utf-8")
    server_log, lm_log, hf_log = work / "serve.log", work / "lm-eval.log", work / "lm-eval-hf.log"
    hf_note = (f"transformers {versions['transformers']}, torch {versions['torch']}" if hf_importable
               else f"no hf ({hf_why})")
    print(f"lm-eval {version} ({args.lm_eval}; {hf_note}); work folder: {work}", file=sys.stderr)
    if args.hf is None and not use_hf:
        print("  (b) skipped: lm-eval's python has no transformers/torch; --hf to insist", file=sys.stderr)

    def interrupted(signum, frame):  # SIGTERM/SIGHUP end the run as Ctrl-C does: through the finally below
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    lm_env = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(hf_home),
                       HF_DATASETS_CACHE=str(hf_home / "datasets"), TOKENIZERS_PARALLELISM="false")
    # sorted: lm-eval 0.4.13 logs doc_id = the list's k-th entry for the k-th chosen doc in file order
    samples_arg = [] if indices is None else ["--samples", json.dumps({name: sorted(indices)})]
    task_args = ["--tasks", name, "--include_path", str(tasks_dir), "--num_fewshot", str(args.shots), "--log_samples",
                 *samples_arg]
    kobest = ["eval", "kobest", "--tasks", args.task, "--shots", str(args.shots), "--data", str(data), "--json",
              *(["--limit", str(args.limit)] if args.limit is not None else [])]
    per_doc = not args.no_per_doc
    model_args = [] if args.model is None else ["-m", args.model]
    serve_cmd = [args.python, "-m", "malhae", "serve", *model_args, "--port", "0", "--parallel", str(args.parallel),
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
        base = f"http://127.0.0.1:{port}/v1"
        margs = (f"model={model_id},base_url={base}/completions,tokenizer_backend=remote,"
                 f"num_concurrent={args.num_concurrent},max_retries=1,tokenized_requests=True,max_length={n_ctx}")
        lm_run = [*lm_cmd, "--model", "local-completions", "--model_args", margs, *task_args, "--output_path",
                  str(serve_out)]
        rc, lm_wall = run_lm_eval(lm_run, lm_log, lm_env, work)  # (a)
        remote_kobest = [*kobest[:2], model_id, "--endpoint", base, *kobest[2:]]
        if rc == 0:  # (d), while the server is up
            remote_report, remote_rows, remote_wall = run_malhae(
                args.python, remote_kobest, work / "malhae-endpoint-docs.json", work / "malhae-endpoint.log",
                per_doc, "malhae eval kobest --endpoint")
    finally:
        processes.stop(proc)
    if rc:
        raise lm_eval_failed("local-completions", rc, lm_wall, lm_log, server_log)
    results, samples = read_lm_eval(serve_out, name)
    sources: dict[str, dict | None] = {"a": lm_source(SOURCES["a"], results, lm_eval_docs(samples), name,
                                                     lm_wall, lm_run)}

    local_kobest = [*kobest[:2], *([args.model] if args.model else []), "--endpoint", "local", *kobest[2:],
                    "--threads", str(args.threads)]
    report, rows, ours_wall = run_malhae(args.python, local_kobest, work / "malhae-docs.json",
                                         work / "malhae-local.log", per_doc, "malhae eval kobest")  # (c)
    sources["c"] = malhae_source(SOURCES["c"], report, args.task, args.shots,
                                 malhae_docs(rows, order) if per_doc else None, ours_wall,
                                 [args.python, "-m", "malhae", *local_kobest])
    sources["d"] = malhae_source(SOURCES["d"], remote_report, args.task, args.shots,
                                 malhae_docs(remote_rows, order) if per_doc else None, remote_wall,
                                 [args.python, "-m", "malhae", *remote_kobest])

    hf_run = None
    if use_hf:  # (b), after the server has gone: the two cores to itself
        hf_run = [*lm_cmd, "--model", "hf", "--model_args", f"pretrained={hf_model},dtype=float32", "--device", "cpu",
                  "--batch_size", "1", *task_args, "--output_path", str(hf_out)]
        rc, hf_wall = run_lm_eval(hf_run, hf_log, lm_env, work)
        if rc:
            raise lm_eval_failed("hf", rc, hf_wall, hf_log, None)
        hf_results, hf_samples = read_lm_eval(hf_out, name)
        sources["b"] = lm_source(SOURCES["b"], hf_results, lm_eval_docs(hf_samples), name, hf_wall, hf_run)
    else:
        sources["b"] = {"label": SOURCES["b"], "skipped": "--no-hf" if args.hf is False
                        else f"transformers/torch do not import in lm-eval's python ({hf_why})"}

    docs_of = {k: (s.get("docs") if s else None) for k, s in sources.items()}
    pairs = {f"{x}-{y}": compare(docs_of.get(x), docs_of.get(y)) for x, y, _ in PAIRS}
    docs = merged_docs({k: sources[k] for k in SOURCES if sources.get(k)})
    problems = scan_logs({"lm-eval": lm_log, "lm-eval hf": hf_log}, server_log)

    print()
    print(f"KoBEST {spec['title']} {args.shots}-shot, data {data}, model {model_id} (served: {served_file})"
          + (f", hf checkpoint {hf_model}" if use_hf else ""))
    if served_file and Path(served_file).resolve() != Path(report["model"]).resolve():
        print(f"WARNING: the server loaded {served_file}, malhae eval kobest {report['model']}")
    if use_hf and hf_model == DEMO_HF.resolve() and served_file and Path(served_file).resolve() != DEMO_GGUF.resolve():
        print(f"WARNING: (b) runs the demo's checkpoint, the server {served_file}: a-b and c-b compare two models "
              "(--hf-model DIR for this model's checkpoint)")
    print_report(sources, pairs, docs, args.show)
    if problems:
        print(f"{len(problems)} log line(s) about failed requests (logs in {work}):")
        for p in problems[:20]:
            print(f"  {p}")
    else:
        print("no failed requests in lm-eval's or the server's log")
    if args.json:
        args.json.write_text(json.dumps({
            "lm_eval_version": version, "versions": versions, "lm_eval_command": lm_run,
            "lm_eval_wall_s": round(lm_wall, 3), "lm_eval_acc": sources["a"]["acc"],
            "lm_eval_docs": sources["a"]["docs"],
            "lm_eval_hf_command": hf_run, "malhae": report, "malhae_wall_s": round(ours_wall, 3),
            "malhae_endpoint": remote_report, "malhae_endpoint_wall_s": round(remote_wall, 3),
            "sources": {k: sources.get(k) for k in SOURCES}, "pairs": pairs, "per_doc": pairs["a-c"], "docs": docs,
            "problems": problems,
            "model_id": model_id, "served_file": served_file, "hf_model": str(hf_model) if use_hf else None,
            "work": str(work)}, ensure_ascii=False, indent=1), encoding="utf-8")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:  # the server would not start, lm-eval wrote no results: one message, no traceback
        sys.exit(f"error: {e}")
