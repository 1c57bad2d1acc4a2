"""Running KoBEST on a GGUF: which docs, in what order, with which few-shot examples, scored how.

Everything that decides a number follows the polyglot branch of lm-evaluation-harness (see app/kobest/__init__.py):
- the test split is evaluated (every KoBEST task has one); the training split supplies the few-shot examples;
- the docs are shuffled by `rnd = random.Random(); rnd.seed(42); rnd.shuffle(docs)` and `--limit N` keeps the first
  N of that order — and the SAME rnd then draws each doc's examples, `rnd.sample(train, k)`, doc after doc. So the
  examples a doc gets depend on the file order and on every doc before it; reproducing the procedure exactly is what
  makes the same data give the same prompts as the harness;
- context and each choice are tokenized separately, without special tokens (HFLM.tok_encode), and scored by the
  summed log-likelihood of the choice's tokens (app.eval.loglik); the prediction is the first argmax;
- per task and shot count: macro F1 (the seed's table) and accuracy; for HellaSwag also acc_norm, the accuracy when
  each log-likelihood is divided by its ending's length in characters, as the harness reports it.
One step the harness does not take: every doc's text is composed to NFC (app.nfc, `composed`), which changes nothing
in the published data (NFC) and keeps a copy saved decomposed from being scored on jamo.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from malhae import nfc
from malhae.errors import UserError
from malhae.eval.kobest import data, metrics
from malhae.eval.kobest.tasks import Doc, Task
from malhae.runtime.settings import LoadOptions

SHUFFLE_SEED = 42  # evaluator.evaluate: rnd.seed(42) before rnd.shuffle(task_docs)
Progress = Callable[[str, int, int, int], None]  # (task title, shots, docs done, docs total)


@dataclass(frozen=True)
class Request:
    context: str
    choices: list[str]
    gold: int
    norm_lengths: list[int] | None = None  # acc_norm's divisors, where the task has them


@dataclass
class Cell:
    task: str
    shots: int
    n: int = 0
    f1: float | None = None
    acc: float | None = None
    acc_norm: float | None = None  # HellaSwag only
    seconds: float = 0.0
    skipped: str = ""  # why the cell has no score


@dataclass
class Report:
    model: str
    data: str
    max_length: int
    cells: list[Cell] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)  # the LoRA adapters applied (--lora), as written there

    def as_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "max_length": self.max_length, "metric": "macro_f1",
                "results": [asdict(c) for c in self.cells]} | ({"lora": self.adapters} if self.adapters else {})


def doc_order(test: list[Doc], limit: int | None) -> tuple[list[Doc], random.Random]:
    """The harness's doc order and the rng left after shuffling, which goes on to sample few-shot examples."""
    docs = list(test)
    rnd = random.Random()
    rnd.seed(SHUFFLE_SEED)
    rnd.shuffle(docs)
    return (docs if limit is None else docs[:limit]), rnd


def requests(task: Task, test: list[Doc], train: list[Doc], shots: int, limit: int | None = None) -> list[Request]:
    if shots > len(train):
        raise UserError(f"{shots}-shot {task.title} needs {shots} training examples; the data has {len(train)}")
    docs, rnd = doc_order(test, limit)
    out = []
    for doc in docs:
        examples = rnd.sample(train, shots) if shots else []  # base.Task.fewshot_examples
        out.append(Request(task.context(doc, examples), task.choices(doc), doc["label"], task.norm_lengths(doc)))
    return out


def score(scorer, tokenize: Callable[[str], list[int]], reqs: list[Request],
          progress: Callable[[int], None] | None = None) -> list[list[float]]:
    """Per request, the log-likelihood of each choice (context and choices tokenized apart, without special tokens
    added, as the harness does)."""
    def one(r: Request) -> list[float]:
        context = tokenize(r.context)
        choices = [tokenize(c) for c in r.choices]
        return [c.loglik for c in scorer.score(context, choices)]

    out = []
    # a server's scorer keeps several docs in flight (its `map`); the local one scores them one after another
    for i, lls in enumerate(getattr(scorer, "map", map)(one, reqs)):
        out.append(lls)
        if progress:
            progress(i + 1)
    return out


def cell(task: Task, shots: int, reqs: list[Request], lls: list[list[float]], seconds: float) -> Cell:
    golds = [r.gold for r in reqs]
    preds = [int(np.argmax(x)) for x in lls]
    acc_norm = None
    if reqs and all(r.norm_lengths for r in reqs):
        normed = [int(np.argmax(np.asarray(x) / np.asarray(r.norm_lengths, dtype=float))) for x, r in zip(lls, reqs,
                                                                                                       strict=True)]
        acc_norm = metrics.accuracy(golds, normed)
    return Cell(task.name, shots, len(reqs), metrics.macro_f1(golds, preds), metrics.accuracy(golds, preds),
                acc_norm, round(seconds, 3))


MAX_SHOTS = 100  # the model card goes to 50; a 100-shot prompt already exceeds the family's 2,048-token context


def check_options(limit: int | None, shots: list[int]) -> None:
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: give at least 1 doc per task")
    if not shots or any(not 0 <= k <= MAX_SHOTS for k in shots):
        raise UserError(f"--shots takes numbers of examples from 0 to {MAX_SHOTS} (0,5,10,50 as in the model card)")


def check_shots_fit(splits: dict[str, tuple[list, list]], shots: list[int]) -> None:
    """Refuse before loading the model when no cell could be scored (every k larger than every training split):
    a run that exits 0 with every cell skipped reads like a result."""
    if all(k > len(train) for _test, train in splits.values() for k in shots):
        most = max(len(train) for _test, train in splits.values())
        raise UserError(f"--shots {','.join(map(str, shots))}: the data has at most {most} training examples per "
                        f"task, so no cell can be scored; use fewer shots (e.g. --shots 0,{min(5, most)})")


def evaluate(options: LoadOptions, src: data.Source, tasks: list[Task], shots: list[int], *,
             limit: int | None = None, precise: bool = False, progress: Progress | None = None,
             notify: Callable[[str], None] | None = None) -> Report:
    """KoBEST on options.model, loaded as `options` say (layers, devices, threads; the scorer sizes its own
    context: the model's trained window)."""
    from malhae.eval.loglik import Scorer
    from malhae.runtime import hardware, lora, offload
    from malhae.runtime.engine import check_model_file
    from malhae.runtime.llama import Model

    splits = _splits(src, tasks, shots, limit, notify)
    info = check_model_file(options.model)  # the data is checked first, then the model
    lora.check(options.lora, info)  # and its adapters, before it loads
    shape = Scorer.shape(info, max(len(t.choice_formats) for t in tasks))
    plan = offload.choose(info, shape.options(options), notify=notify)
    with Model.planned(options, plan) as model, \
            Scorer(model, threads=options.threads or hardware.physical_cores(), precise=precise,
                   max_choices=shape.max_choices, lora=options.lora) as scorer:
        report = Report(str(options.model), src.label, scorer.max_length, adapters=list(map(str, options.lora)))
        _cells(report, scorer, model.tokenize, splits, tasks, shots, limit, progress)
    return report


def evaluate_remote(backend, src: data.Source, tasks: list[Task], shots: list[int], *, limit: int | None = None,
                    progress: Progress | None = None, concurrency: int = 4,
                    notify: Callable[[str], None] | None = None) -> Report:
    """The same procedure with a server's model (RemoteBackend): tokens from its /tokenize, log-likelihoods from
    its echoed prompt log-probabilities (app.eval.remote)."""
    from malhae.eval.remote import RemoteScorer

    splits = _splits(src, tasks, shots, limit, notify)
    scorer = RemoteScorer(backend, concurrency=concurrency)
    report = Report(f"{backend.name} at {backend.endpoint.url}", src.label, scorer.max_length)
    _cells(report, scorer, scorer.tokenize, splits, tasks, shots, limit, progress)
    return report


def _splits(src: data.Source, tasks: list[Task], shots: list[int], limit: int | None,
            notify: Callable[[str], None] | None = None) -> dict:
    check_options(limit, shots)

    def load(task: Task, split: str) -> list[Doc]:
        return composed(data.load(src, task, split), f"{src.label}: {task.name} {split}", notify)

    splits = {t.name: (load(t, "test"), load(t, "train") if any(shots) else []) for t in tasks}
    check_shots_fit(splits, shots)
    return splits


def composed(docs: list[Doc], where: str, notify: Callable[[str], None] | None = None) -> list[Doc]:
    """The docs with every text in NFC (app.nfc). The published KoBEST is NFC, so no published score changes (the
    harness, which does not normalize, reads the same text); a copy saved decomposed (NFD, as macOS may save it) would
    otherwise be scored on jamo the model never saw, a number about the file's form, not the model. Said once per
    split, with how many docs it changed."""
    out, changed = [], 0
    for doc in docs:
        new = {k: nfc.compose(v) if isinstance(v, str) else v for k, v in doc.items()}
        changed += any(new[k] is not v for k, v in doc.items())
        out.append(new)
    if changed and notify is not None:
        notify(f"{where}: {changed:,} of {len(docs):,} docs are {nfc.WHAT}; they are scored composed (NFC), as "
               "the published KoBEST is written (lm-evaluation-harness would score them as given)")
    return out


def _cells(report: Report, scorer, tokenize, splits: dict, tasks: list[Task], shots: list[int], limit: int | None,
           progress: Progress | None) -> None:
    for task in tasks:
        test, train = splits[task.name]
        for k in shots:
            if k > len(train) and k:
                report.cells.append(Cell(task.name, k, skipped=f"{k}-shot needs {k} training examples; "
                                                              f"the data has {len(train)}"))
                continue
            reqs = requests(task, test, train, k, limit)
            start = time.perf_counter()
            tick = (lambda done, t=task, k=k, n=len(reqs): progress(t.title, k, done, n)) if progress else None
            lls = score(scorer, tokenize, reqs, tick)
            report.cells.append(cell(task, k, reqs, lls, time.perf_counter() - start))
