"""`malhae eval kobest`: the polyglot branch's prompts, few-shot sampling and macro F1, and scores equal transformers'.

Expected prompts are written out by hand from lm-evaluation-harness's polyglot branch (lm_eval/tasks/kobest.py at
d21107eb, lm_eval/base.py fewshot_context: examples joined by "\\n\\n", then "\\n\\n", then the doc; no description),
never produced by the code under test. Expected F1 values are worked out by hand with sklearn's macro semantics.

Parity with transformers, measured on the demo model (models/demo/hf, the same weights as the GGUF):
- llama.cpp's GPT-NeoX FFN computes GELU with the tanh approximation through an f16 lookup table (ggml_vec_gelu_f32
  with GGML_GELU_FP16), transformers computes the exact erf GELU. On the demo model that alone moves a summed
  log-likelihood by ~1e-2, so the 1e-3 comparison is made against transformers with ggml's GELU put in its MLPs:
  F32 GGUF, precise context, max |Δ loglik| 3.9e-4 on the 10 requests (24 choices) below;
- against plain transformers (exact GELU): F32 GGUF 9.1e-3, the committed F16 GGUF in the default context 9.1e-3
  (0.023 and 0.021 on 3-shot prompts of up to ~1000 tokens); the test asserts < 0.05 and the same answer on every
  request.
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from malhae.cli import main
from malhae.errors import UserError
from malhae.eval.kobest import data, metrics
from malhae.eval.kobest import evaluate as ev
from malhae.eval.kobest.tasks import select

ROOT = Path(__file__).resolve().parent.parent
HF = ROOT / "models" / "demo" / "hf"
GGUF = ROOT / "models" / "malhae-demo-ko-f16.gguf"
SAMPLE = ROOT / "models" / "data" / "kobest-sample"
TASKS = {t.name: t for t in select(None)}

HANGANG = {"paragraph": "한강은 대한민국의 수도 서울을 가로질러 흐르는 강이다.",
           "question": "한강은 서울을 지나 흐르는가?", "label": 1}
KIMCHI = {"paragraph": "김치는 채소를 절여 발효시킨 음식이다.", "question": "김치는 발효시키지 않는가?", "label": 0}
JEJU = {"paragraph": "제주도에는 한라산이 있다.", "question": "한라산은 제주도에 있는가?", "label": 1}


# --- prompts, written out by hand from the harness ------------------------------------------------------------


def test_boolq_prompt_and_choices():
    t = TASKS["boolq"]
    assert t.text(JEJU) == "제주도에는 한라산이 있다. 질문: 한라산은 제주도에 있는가? 답변: "
    assert t.choices(JEJU) == [" 아니오", " 예"]
    assert t.target(KIMCHI) == " 아니오"


def test_few_shot_context_boolq():
    got = TASKS["boolq"].context(JEJU, [HANGANG, KIMCHI])
    assert got == ("한강은 대한민국의 수도 서울을 가로질러 흐르는 강이다. "
                   "질문: 한강은 서울을 지나 흐르는가? 답변:  예\n\n"
                   "김치는 채소를 절여 발효시킨 음식이다. 질문: 김치는 발효시키지 않는가? 답변:  아니오\n\n"
                   "제주도에는 한라산이 있다. 질문: 한라산은 제주도에 있는가? 답변: ")
    assert TASKS["boolq"].context(JEJU, []) == "제주도에는 한라산이 있다. 질문: 한라산은 제주도에 있는가? 답변: "


def test_copa_prompt_connector_and_choices():
    t = TASKS["copa"]
    effect = {"premise": "물을 끓였다.", "question": "결과", "alternative_1": "물이 얼었다.",
              "alternative_2": "물에서 김이 났다.", "label": 1}
    cause = {"premise": "얼음이 녹았다.", "question": " 원인 ", "alternative_1": "날씨가 더웠다.",
             "alternative_2": "눈이 내렸다.", "label": 0}
    assert t.text(effect) == "물을 끓였다. 그래서"
    assert t.text(cause) == "얼음이 녹았다. 왜냐하면"  # the harness strips the question field
    assert t.choices(effect) == [" 물이 얼었다.", " 물에서 김이 났다."]
    assert t.context(effect, [cause]) == "얼음이 녹았다. 왜냐하면 날씨가 더웠다.\n\n물을 끓였다. 그래서"


def test_hellaswag_prompt_and_choices():
    t = TASKS["hellaswag"]
    doc = {"context": "물이 끓기 시작하자", "ending_1": "면을 넣었다.", "ending_2": "잠을 잤다.",
           "ending_3": "밖에 나갔다.", "ending_4": "불을 껐다.", "label": 0}
    assert t.text(doc) == "문장: 물이 끓기 시작하자"
    assert t.choices(doc) == [" 면을 넣었다.", " 잠을 잤다.", " 밖에 나갔다.", " 불을 껐다."]
    assert t.context(doc, [doc]) == "문장: 물이 끓기 시작하자 면을 넣었다.\n\n문장: 물이 끓기 시작하자"


def test_sentineg_and_wic_prompts():
    s = {"sentence": "이 영화는 정말 재미있었다.", "label": 1}
    assert TASKS["sentineg"].text(s) == "문장: 이 영화는 정말 재미있었다. 긍부정:"
    assert TASKS["sentineg"].choices(s) == [" 부정", " 긍정"]
    assert TASKS["sentineg"].context(s, [s]) == ("문장: 이 영화는 정말 재미있었다. 긍부정: 긍정\n\n"
                                                 "문장: 이 영화는 정말 재미있었다. 긍부정:")
    w = {"word": "배", "context_1": "배가 고프다.", "context_2": "배를 탔다.", "label": 0}
    assert TASKS["wic"].text(w) == "문장1: 배가 고프다. 문장2: 배를 탔다. 두 문장에서 배가 같은 뜻으로 쓰였나?"
    assert TASKS["wic"].choices(w) == [" 아니오", " 예"]


def test_task_selection():
    assert [t.name for t in select(None)] == ["copa", "hellaswag", "boolq", "sentineg", "wic"]
    assert [t.name for t in select("WiC, copa,wic")] == ["wic", "copa"]
    with pytest.raises(UserError, match="unknown KoBEST task nope"):
        select("copa,nope")


# --- metrics, by hand -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("golds, preds, want", [
    ([0, 0, 1, 1], [0, 1, 1, 1], (2 / 3 + 4 / 5) / 2),  # class 0: tp1 fn1 → 2/3; class 1: tp2 fp1 → 4/5
    ([0, 1, 0, 1], [1, 1, 1, 1], (0 + 4 / 6) / 2),  # always "yes": the absent prediction's class scores 0
    ([0, 0], [0, 1], (2 / 3 + 0) / 2),  # a class only predicted, never gold, still counts
    ([0, 1, 2, 3], [0, 1, 2, 2], (1 + 1 + 2 / 3 + 0) / 4),  # four classes (HellaSwag)
    ([1, 1, 1], [1, 1, 1], 1.0),  # one class present: its F1 only
])
def test_macro_f1_by_hand(golds, preds, want):
    assert metrics.macro_f1(golds, preds) == pytest.approx(want, abs=1e-12)


def test_accuracy_and_edges():
    assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert math.isnan(metrics.macro_f1([], []))
    with pytest.raises(ValueError):
        metrics.macro_f1([0, 1], [0])


# --- doc order and few-shot sampling ----------------------------------------------------------------------------


def _harness_contexts(task, test, train, k, limit=None):
    """evaluator.evaluate + base.Task.fewshot_context of the polyglot branch, written out."""
    docs = list(test)
    rnd = random.Random()
    rnd.seed(42)
    rnd.shuffle(docs)
    out = []
    for doc in docs[:limit]:
        shots = rnd.sample(train, k) if k else []
        out.append("".join(task.text(d) + task.target(d) + "\n\n" for d in shots) + task.text(doc))
    return out


@pytest.mark.parametrize("name", ["boolq", "hellaswag"])
def test_few_shot_sampling_is_the_harness_procedure(name):
    task = TASKS[name]
    src = data.source(None, False)
    test, train = data.load(src, task, "test"), data.load(src, task, "train")
    for k in (0, 1, 5):
        got = [r.context for r in ev.requests(task, test, train, k)]
        assert got == _harness_contexts(task, test, train, k)
        assert got == [r.context for r in ev.requests(task, test, train, k)]  # deterministic
    # --limit keeps the first N docs of the full run, with the same examples
    full = ev.requests(task, test, train, 5)
    assert ev.requests(task, test, train, 5, limit=3) == full[:3]
    # and the examples differ between docs (the rng advances)
    assert len({r.context.rsplit("\n\n", 1)[0] for r in full}) > 1
    golds = [r.gold for r in full]
    assert sorted(golds) == sorted(d["label"] for d in test)


def test_too_many_shots_is_a_user_error():
    task = TASKS["wic"]
    src = data.source(None, False)
    with pytest.raises(UserError, match="50-shot WiC needs 50 training examples; the data has 12"):
        ev.requests(task, data.load(src, task, "test"), data.load(src, task, "train"), 50)


# --- data -------------------------------------------------------------------------------------------------------


def test_sample_has_every_task_and_split():
    src = data.source(None, False)
    assert src.kind == "sample" and "not KoBEST" in src.label
    for task in TASKS.values():
        for split in ("train", "validation", "test"):
            docs = data.load(src, task, split)
            assert docs and all(0 <= d["label"] < task.n_labels for d in docs)
        assert len(data.load(src, task, "train")) >= 10  # 10-shot works on the sample


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_data_errors_name_file_and_line(tmp_path):
    task = TASKS["sentineg"]
    with pytest.raises(UserError, match="not a folder"):
        data.source(tmp_path / "missing", False)
    src = data.source(tmp_path, False)
    with pytest.raises(UserError, match=r"no test file for sentineg .*sentineg/test\.jsonl"):
        data.load(src, task, "test")
    f = tmp_path / "sentineg" / "test.jsonl"
    cases = [
        ('{"sentence": "좋다", "label": 1}\n{"sentence": "나쁘다", "label": 0', "test.jsonl:2: the row is not"),
        ('{"sentence": "좋다", "label": 1}\n\n{"label": 0}', "test.jsonl:3: sentineg needs a text field 'sentence'"),
        ('{"sentence": "좋다", "label": 2}', "test.jsonl:1: 'label' must be an integer 0-1"),
        ('{"sentence": "좋다", "label": "yes"}', "test.jsonl:1: 'label' must be an integer"),
        ('["not", "an", "object"]', "item 1: expected an object"),
    ]
    for text, message in cases:
        _write(f, [text])
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            data.load(src, task, "test")
    _write(tmp_path / "copa" / "test.jsonl",
           ['{"premise": "a", "question": "이유", "alternative_1": "b", "alternative_2": "c", "label": 0}'])
    with pytest.raises(UserError, match="'question' must be one of 원인, 결과"):
        data.load(src, TASKS["copa"], "test")


def test_csv_tsv_and_json_array_read_like_jsonl(tmp_path):
    task = TASKS["boolq"]
    rows = [json.loads(line) for line in (SAMPLE / "boolq" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    for name, delim in (("csv", ","), ("tsv", "\t")):
        path = tmp_path / name / "boolq" / f"test.{name}"
        path.parent.mkdir(parents=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["paragraph", "question", "label"], delimiter=delim)
            w.writeheader()
            w.writerows(rows)
        assert data.load(data.source(tmp_path / name, False), task, "test") == rows
    _write(tmp_path / "arr" / "boolq" / "test.json", [json.dumps(rows, ensure_ascii=False)])
    assert data.load(data.source(tmp_path / "arr", False), task, "test") == rows


def test_parquet_needs_pyarrow(tmp_path):
    path = tmp_path / "wic" / "test" / "0000.parquet"  # the hub's parquet conversion layout
    rows = [{"word": "배", "context_1": "배가 고프다.", "context_2": "배를 탔다.", "label": 0}]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        _write(path, ["not really parquet"])
        with pytest.raises(UserError, match="needs pyarrow"):
            data.load(data.source(tmp_path, False), TASKS["wic"], "test")
        return
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert data.load(data.source(tmp_path, False), TASKS["wic"], "test") == rows


def test_hub_without_datasets_says_what_to_do():
    pytest.importorskip("malhae.eval.kobest.data")
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed; the hub path would need a network")
    except ImportError:
        pass
    with pytest.raises(UserError, match="pass --data DIR"):
        data.load(data.source(None, True), TASKS["copa"], "test")


# --- parity with transformers on the demo model -----------------------------------------------------------------


def _ggml_gelu_mlps(model):
    """Put llama.cpp's CPU GELU into transformers' GPT-NeoX MLPs: tanh approximation, input and output rounded to
    f16 (ggml_vec_gelu_f32 looks up ggml_table_gelu_f16), identity above 10 and zero below -10."""
    import torch

    class GgmlGelu(torch.nn.Module):
        def forward(self, x):
            h = x.half().float()
            y = (0.5 * h * (1 + torch.tanh(0.7978845608028654 * (h + 0.044715 * h ** 3)))).half().float()
            return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))

    for layer in model.gpt_neox.layers:
        layer.mlp.act = GgmlGelu()
    return model


@pytest.fixture(scope="module")
def parity_requests():
    """Two docs per task, 2-shot, from the sample: contexts, choices, and transformers' token ids for both."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(HF)
    src = data.source(None, False)
    out = []
    for task in TASKS.values():
        for r in ev.requests(task, data.load(src, task, "test"), data.load(src, task, "train"), 2, limit=2):
            ctx = tok.encode(r.context, add_special_tokens=False)  # HFLM.tok_encode
            out.append((task.name, r, ctx, [tok.encode(c, add_special_tokens=False) for c in r.choices]))
    return out


def _hf_logliks(model, requests, max_length):
    import torch

    out = []
    with torch.no_grad():
        for _, _, ctx, conts in requests:
            # base._loglikelihood_tokens, written out: the choices right-padded into one batch (causal attention,
            # so padding after a sequence does not change its logits)
            inps = [(ctx + cont)[-(max_length + 1):][:-1] for cont in conts]
            width = max(len(x) for x in inps)
            batch = torch.tensor([x + [0] * (width - len(x)) for x in inps])
            logp = torch.log_softmax(model(batch).logits.double(), dim=-1)
            lls = []
            for row, inp, cont in zip(logp, inps, conts, strict=True):
                rows = row[len(inp) - len(cont):len(inp)]
                lls.append(float(rows[torch.arange(len(cont)), torch.tensor(cont)].sum()))
            out.append(lls)
    return out


def _gguf_logliks(path, requests, precise):
    from malhae.eval.loglik import Scorer
    from malhae.runtime.llama import Model

    with Model(path) as model, Scorer(model, threads=1, precise=precise) as scorer:
        out = []
        for _, r, ctx, conts in requests:
            assert model.tokenize(r.context) == ctx  # the GGUF tokenizes like transformers
            assert [model.tokenize(c) for c in r.choices] == conts
            out.append([c.loglik for c in scorer.score(ctx, conts)])
        return out, scorer.max_length


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    from malhae.convert.pipeline import convert

    return convert(HF, "f32", tmp_path_factory.mktemp("kobest") / "demo-f32.gguf").path


def test_loglik_equals_transformers(parity_requests, f32_gguf):
    import torch
    from transformers import GPTNeoXForCausalLM

    got, max_length = _gguf_logliks(f32_gguf, parity_requests, precise=True)
    hf = GPTNeoXForCausalLM.from_pretrained(HF, dtype=torch.float32).eval()
    assert max_length == hf.config.max_position_embeddings
    exact = _hf_logliks(hf, parity_requests, max_length)
    ggml = _hf_logliks(_ggml_gelu_mlps(hf), parity_requests, max_length)
    assert {name for name, *_ in parity_requests} == set(TASKS)
    assert sum(len(x) for x in got) >= 24
    dev = max(abs(a - b) for g, h in zip(got, ggml, strict=True) for a, b in zip(g, h, strict=True))
    assert dev < 1e-3, f"F32 GGUF vs transformers with llama.cpp's GELU: max |Δ loglik| {dev:.2e}"
    dev_exact = max(abs(a - b) for g, h in zip(got, exact, strict=True) for a, b in zip(g, h, strict=True))
    assert dev_exact < 0.05, f"F32 GGUF vs transformers (exact GELU): max |Δ loglik| {dev_exact:.2e}"
    for g, h1, h2 in zip(got, ggml, exact, strict=True):
        assert int(np.argmax(g)) == int(np.argmax(h1)) == int(np.argmax(h2))
    # the committed F16 GGUF (default context, as `malhae eval kobest` runs it): looser, same answers
    f16, _ = _gguf_logliks(GGUF, parity_requests, precise=False)
    dev_f16 = max(abs(a - b) for g, h in zip(f16, exact, strict=True) for a, b in zip(g, h, strict=True))
    assert dev_f16 < 0.05, f"F16 GGUF vs transformers: max |Δ loglik| {dev_f16:.2e}"
    assert [int(np.argmax(g)) for g in f16] == [int(np.argmax(h)) for h in exact]


# --- the command ------------------------------------------------------------------------------------------------


def _run_json(capsys, *args: str) -> dict:
    assert main(["eval", "kobest", str(GGUF), "--threads", "1", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_json_and_skipped_cells(capsys):
    out = _run_json(capsys, "--tasks", "sentineg,copa", "--shots", "0,2,20", "--limit", "3")
    assert out["data"] == "bundled sample, not KoBEST" and out["metric"] == "macro_f1"
    cells = {(c["task"], c["shots"]): c for c in out["results"]}
    assert set(cells) == {(t, k) for t in ("sentineg", "copa") for k in (0, 2, 20)}
    for t in ("sentineg", "copa"):
        for k in (0, 2):
            assert cells[t, k]["n"] == 3 and 0 <= cells[t, k]["f1"] <= 1 and not cells[t, k]["skipped"]
        assert cells[t, 20]["f1"] is None and "needs 20 training examples" in cells[t, 20]["skipped"]


def test_cli_same_scores_from_csv_data(capsys, tmp_path):
    """The same docs from a --data folder of CSV files give the same numbers as the bundled JSONL sample."""
    for split in ("train", "test"):
        rows = [json.loads(x) for x in (SAMPLE / "wic" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        path = tmp_path / "wic" / f"{split}.csv"
        path.parent.mkdir(exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    a = _run_json(capsys, "--tasks", "wic", "--shots", "0,1", "--limit", "4")
    b = _run_json(capsys, "--tasks", "wic", "--shots", "0,1", "--limit", "4", "--data", str(tmp_path))
    assert b["data"] == str(tmp_path)
    strip = [{k: v for k, v in c.items() if k != "seconds"} for c in a["results"]]
    assert strip == [{k: v for k, v in c.items() if k != "seconds"} for c in b["results"]]


@pytest.mark.parametrize("args, message", [
    (["--tasks", "nope"], "unknown KoBEST task nope"),
    (["--shots", "zero"], "--shots 'zero'"),
    (["--data", "/nonexistent/kobest"], "is not a folder"),
    (["--limit", "0"], "--limit 0"),
    (["--data", ".", "--hub"], "either --data DIR or --hub"),
    (["--shots", "100000"], "from 0 to 100"),  # once exited 0 with every cell skipped
])
def test_cli_user_errors_are_one_line(capsys, args, message):
    assert main(["eval", "kobest", str(GGUF), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("malhae: error:")


def test_shots_beyond_every_training_split_are_refused_before_the_model_loads(capsys):
    """The bundled sample has 12 training examples per task: 60 shots can score nothing."""
    assert main(["eval", "kobest", str(GGUF), "--shots", "60,80"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("malhae: error:")]
    assert len(errors) == 1 and "at most 12 training examples" in errors[0] and "no cell can be scored" in errors[0]


def test_hellaswag_acc_norm_divides_by_the_endings_length_by_hand():
    task = select("hellaswag")[0]
    doc = {"context": "문맥", "ending_1": "가", "ending_2": "나다라마바사아자차카", "ending_3": "타파",
           "ending_4": "하하하", "label": 1}
    assert task.norm_lengths(doc) == [1, 10, 2, 3]  # characters of the endings, without the leading space
    req = ev.Request("문장: 문맥", task.choices(doc), 1, task.norm_lengths(doc))
    # raw: -2.0 (가) wins; per character: -2/1, -5/10, -4/2, -9/3 → -0.5 (the gold) wins
    got = ev.cell(task, 0, [req], [[-2.0, -5.0, -4.0, -9.0]], 0.0)
    assert (got.acc, got.acc_norm) == (0.0, 1.0)
    copa = ev.cell(select("copa")[0], 0, [ev.Request("x", [" a", " b"], 0)], [[-1.0, -2.0]], 0.0)
    assert copa.acc == 1.0 and copa.acc_norm is None  # only HellaSwag has acc_norm in the harness
