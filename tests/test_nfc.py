"""Decomposed Hangul (NFD, as macOS file names and some PDFs give it) is composed (NFC) before the model reads it.

On the demo model `대한민국의 주권은 국민에게 있고, …` is 10 tokens in NFC and 222 in NFD, and an NFD prompt got a
nonsense answer. Every input point is checked the way a user meets it: `ask`/`complete` (argument, pipe, --file),
`chat` (piped messages, /read, /system), the server (OpenAI and Ollama), KoBEST data; and perplexity, which measures
its text as given and only warns. Each conversion is said once per document, never per line or per request.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from helpers import serving

from malhae import nfc
from malhae.cli.main import main
from malhae.eval.perplexity import perplexity
from malhae.runtime.llama import Model
from malhae.runtime.windows import Layout

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "malhae-demo-ko-f16.gguf"
SAMPLE = ROOT / "models" / "data" / "kobest-sample"
NOTICE = "not in Unicode's composed form (NFC)"
QUESTION = "대한민국의 주권은 누구에게 있나요?"
ARTICLE = "대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다."


def nfd(text: str) -> str:
    decomposed = unicodedata.normalize("NFD", text)
    assert decomposed != text
    return decomposed


def tokens(text: str) -> int:
    """The demo tokenizer's count, as given (llama.cpp normalizes nothing)."""
    with Model(DEMO) as model:
        return len(model.tokenize(text, add_special=False))


def malhae(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, cwd=ROOT, timeout=120, **feed)


def notices(err: str) -> list[str]:
    return [line for line in err.splitlines() if NOTICE in line]


def test_composed_text_is_returned_as_it_is_and_decomposed_text_counts_as_composed():
    """The fast path: an NFC text is not copied, and nobody is told anything. Why it matters, measured: the
    10-token sentence of the issue is 222 tokens decomposed, and 10 again once composed."""
    said: list[str] = []
    assert nfc.compose(ARTICLE, "x", said.append) is ARTICLE and not said
    assert tokens(ARTICLE) == 10 and tokens(nfd(ARTICLE)) == 222
    assert tokens(nfc.compose(nfd(ARTICLE), "x", said.append)) == 10 and len(said) == 1


def test_ask_with_an_nfd_question_answers_as_with_the_nfc_one():
    args = ("-m", str(DEMO), "-n", "12", "--temperature", "0", "--threads", "2", "--json")
    composed, decomposed = malhae("ask", QUESTION, *args), malhae("ask", nfd(QUESTION), *args)
    assert composed.returncode == 0 and decomposed.returncode == 0, decomposed.stderr.decode()
    want, got = json.loads(composed.stdout), json.loads(decomposed.stdout)
    assert got["text"] == want["text"] and want["text"].strip()
    # the model read the NFC tokens: the whole framed prompt is fewer tokens than the NFD question alone
    assert got["stats"]["prompt_tokens"] == want["stats"]["prompt_tokens"] < tokens(nfd(QUESTION))
    assert not notices(composed.stderr.decode())
    said = notices(decomposed.stderr.decode())
    assert len(said) == 1 and said[0].startswith("malhae: the question is")


def test_piped_text_and_files_in_nfd_are_composed_and_each_said_once(tmp_path):
    """`cat 조항.txt | malhae ask --file 부칙.txt "질문"` with every part decomposed: the same prompt and answer as
    composed, and one notice per document, naming it."""
    composed_file, decomposed_file = tmp_path / "부칙.txt", tmp_path / "부칙-nfd.txt"
    composed_file.write_text("이 헌법은 공포한 날부터 시행한다.\n", encoding="utf-8")
    decomposed_file.write_text(nfd("이 헌법은 공포한 날부터 시행한다.\n"), encoding="utf-8")
    args = ("-m", str(DEMO), "-n", "8", "--temperature", "0", "--threads", "2", "--json")
    composed = malhae("ask", QUESTION, "--file", str(composed_file), *args, stdin=ARTICLE.encode())
    decomposed = malhae("ask", nfd(QUESTION), "--file", str(decomposed_file), *args, stdin=nfd(ARTICLE).encode())
    assert decomposed.returncode == 0, decomposed.stderr.decode()
    want, got = json.loads(composed.stdout), json.loads(decomposed.stdout)
    assert got["text"] == want["text"] and got["stats"]["prompt_tokens"] == want["stats"]["prompt_tokens"]
    said = notices(decomposed.stderr.decode())
    assert len(said) == 3, said
    assert [s.split(" is ")[0] for s in said] == ["malhae: the question", "malhae: standard input",
                                                  f"malhae: {decomposed_file}"]
    # `complete` with the whole prompt piped: the same count of tokens as the composed text
    counted = [json.loads(malhae("complete", "-m", str(DEMO), "-n", "1", "--json", stdin=text.encode()).stdout)
               for text in (ARTICLE, nfd(ARTICLE))]
    assert counted[0]["stats"]["prompt_tokens"] == counted[1]["stats"]["prompt_tokens"] < tokens(nfd(ARTICLE))


def test_chat_composes_messages_read_files_and_system_text(tmp_path):
    """A piped chat: two decomposed messages answered as composed ones, said once for the session; a decomposed
    /read document said once, by name."""
    doc = tmp_path / "조항.txt"
    doc.write_text(nfd(ARTICLE), encoding="utf-8")
    plain = tmp_path / "조항-nfc.txt"
    plain.write_text(ARTICLE, encoding="utf-8")

    def session(lines: list[str]) -> subprocess.CompletedProcess:
        proc = malhae("chat", "-m", str(DEMO), "-n", "8", "--temperature", "0", "--threads", "2",
                      stdin="\n".join(lines).encode())
        assert proc.returncode == 0, proc.stderr.decode()
        return proc

    composed = session(["/system 한국어로 답하세요.", f"/read {plain}", QUESTION, "헌법 제1조는?"])
    decomposed = session([nfd("/system 한국어로 답하세요."), f"/read {doc}", nfd(QUESTION), nfd("헌법 제1조는?")])
    assert decomposed.stdout == composed.stdout and composed.stdout.strip()
    said = notices(decomposed.stderr.decode())
    assert len(said) == 2, said
    assert said[0].startswith("malhae: the system text is")  # the session's one notice on typed or piped text
    assert said[1].startswith(f"malhae: {doc} is")
    assert not notices(composed.stderr.decode())
    used = [re.findall(r"context (\d+)/", proc.stderr.decode()) for proc in (composed, decomposed)]
    assert used[0] == used[1] and len(used[0]) == 2  # the same context used by each answer: the same tokens


def test_server_composes_prompts_and_messages_and_logs_it_once():
    notes: list[str] = []
    with serving(DEMO, parallel=2, notify=notes.append) as server:
        import http.client

        def post(path: str, body: dict) -> dict:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
            conn.close()
            assert resp.status == 200, data
            return data

        def chat(text: str) -> dict:
            return post("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 8,
                                                 "temperature": 0})

        want, got, again = chat(QUESTION), chat(nfd(QUESTION)), chat(nfd(QUESTION))
        for answer in (got, again):
            assert answer["choices"][0]["message"] == want["choices"][0]["message"]
            assert answer["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"] < tokens(nfd(QUESTION))

        def generate(text: str) -> dict:
            return post("/api/generate", {"prompt": text, "stream": False, "options": {"temperature": 0,
                                                                                       "num_predict": 8}})

        want, got = generate(QUESTION), generate(nfd(QUESTION))
        assert got["response"] == want["response"] and got["prompt_eval_count"] == want["prompt_eval_count"]

        def complete(text: str, **extra) -> dict:
            return post("/v1/completions", {"prompt": text, "max_tokens": 4, "temperature": 0, **extra})

        assert complete(nfd(ARTICLE))["usage"]["prompt_tokens"] == complete(ARTICLE)["usage"]["prompt_tokens"]
        # with echo (how lm-evaluation-harness scores a text) the prompt is the client's, as sent: not composed
        echoed = complete(nfd(ARTICLE), echo=True, logprobs=0, max_tokens=1)
        assert echoed["choices"][0]["text"].startswith(nfd(ARTICLE))
        assert echoed["usage"]["prompt_tokens"] >= tokens(nfd(ARTICLE))
    said = [n for n in notes if NOTICE in n]
    assert len(said) == 1 and said[0].startswith("a request's text"), notes  # the log's one line, not per request


@pytest.mark.parametrize("task", ["boolq", "copa"])
def test_kobest_data_in_nfd_is_scored_as_the_composed_data(tmp_path, capsys, task):
    """A KoBEST folder saved decomposed scores what the composed one scores, and each split says so once. COPA too,
    whose `question` (원인/결과) is checked as it is read: decomposed, it reads as composed there as well."""
    composed, decomposed = tmp_path / "nfc", tmp_path / "nfd"
    shutil.copytree(SAMPLE / task, composed / task)
    for path in (SAMPLE / task).glob("*.jsonl"):
        (decomposed / task).mkdir(parents=True, exist_ok=True)
        (decomposed / task / path.name).write_text(nfd(path.read_text(encoding="utf-8")), encoding="utf-8")

    def run(data: Path) -> tuple[list, str]:
        assert main(["eval", "kobest", str(DEMO), "--threads", "2", "--json", "--data", str(data), "--tasks", task,
                     "--shots", "1", "--limit", "3"]) == 0
        captured = capsys.readouterr()
        results = [{k: c[k] for k in ("task", "shots", "n", "f1", "acc")} for c in json.loads(captured.out)["results"]]
        return results, captured.err

    want, quiet = run(composed)
    got, err = run(decomposed)
    assert got == want and not notices(quiet)
    said = notices(err)
    assert len(said) == 2, said  # the test split and the train split, once each
    assert {s.split(":")[2].strip() for s in said} == {f"{task} test", f"{task} train"}


def test_perplexity_measures_an_nfd_text_as_given_and_warns_once(tmp_path, capsys):
    """Normalizing would change what is measured (and break parity with llama-perplexity): the number is the
    decomposed text's, and the warning says how to measure the composed one."""
    text = nfd((ROOT / "models" / "data" / "ko-public-domain" / "constitution.txt").read_text(encoding="utf-8")[:150])
    path = tmp_path / "nfd.txt"
    path.write_text(text, encoding="utf-8")
    assert main(["eval", "ppl", str(DEMO), "--text", str(path), "--ctx", "128", "--threads", "2", "--json"]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    want, scored = perplexity(DEMO, text.removesuffix("\n"), Layout.of(128))
    assert got["ppl"] == pytest.approx(want, rel=1e-9) and got["tokens_scored"] == scored
    said = notices(captured.err)
    assert len(said) == 1 and f"--text {path}" in said[0] and "measured on the text as given" in said[0]
