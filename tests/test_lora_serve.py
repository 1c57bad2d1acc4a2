"""`malhae serve --lora` over real HTTP on 127.0.0.1: llama-server's GET/POST /lora-adapters and a request's own
`lora`, each answer checked against the engine run directly with that adapter set (no server), and the scheduler's
turns between sets (both streams make progress; a cache is reused only under its own set). Real llama.cpp, a small
polyglot-shaped base and PEFT adapters converted once per module."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

import factory  # noqa: E402
from helpers import serving  # noqa: E402
from test_serve import request as serve_request  # noqa: E402

from malhae.runtime.engine import Engine  # noqa: E402
from malhae.runtime.settings import LoadOptions, Lora, Sampling  # noqa: E402

CTX = 1024
PROMPT = "대한민국의 주권은"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base F32 GGUF, adapter 0 on the attention, adapter 1 on the MLP): random, strong enough that greedy texts
    differ; the base never samples its end token, so every answer runs to max_tokens."""
    from transformers import AutoModelForCausalLM

    from malhae.convert import lora, lora_gguf, pipeline

    root = tmp_path_factory.mktemp("lora-serve")
    src = factory.build(root / "ckpt", factory.Spec("lora-serve", weights="safetensors", never_eos=True, ctx=CTX))
    base = pipeline.convert(src, "f32", root / "base.gguf").path
    adapters = []
    for i, targets in enumerate((["query_key_value"], ["dense_h_to_4h", "dense_4h_to_h"])):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        peft.get_peft_model(model, config).save_pretrained(root / f"ad{i}")
        adapters.append(lora_gguf.write(lora.read(root / f"ad{i}"), lora_gguf.Base.from_gguf(base),
                                        root / f"ad{i}.gguf", type_name="f32").path)
    return base, adapters[0], adapters[1]


@pytest.fixture(scope="module")
def server(pair):
    base, ad0, ad1 = pair
    with serving(base, parallel=2, n_ctx=CTX, lora=(Lora(ad0), Lora(ad1, 0.5))) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected(pair):
    """The greedy answer to PROMPT with an adapter set, computed by the engine itself (memoised)."""
    base, *adapters = pair
    known: dict[tuple, str] = {}

    def get(scales: tuple[float, float], max_tokens: int = 16) -> str:
        key = (scales, max_tokens)
        if key not in known:
            loras = tuple(Lora(a, s) for a, s in zip(adapters, scales, strict=True) if s)
            with Engine(LoadOptions(model=base, threads=2, ctx=CTX, lora=loras)) as engine:
                known[key] = engine.complete(PROMPT, Sampling(temperature=0, repeat_penalty=1.0,
                                                              max_tokens=max_tokens))[0]
        return known[key]

    return get


def request(server, method: str, path: str, body: object = None, *, raw: bytes | None = None,
            headers: dict | None = None):
    """(status, parsed JSON) of one plain HTTP request (test_serve's, without the headers)."""
    status, _, data = serve_request(server, method, path, body, headers, raw)
    return status, data


def complete(server, lora: list | None = None, max_tokens: int = 16) -> dict:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    if lora is not None:
        body["lora"] = lora
    status, out = request(server, "POST", "/v1/completions", body)
    assert status == 200, out
    return out


def text(out: dict) -> str:
    return out["choices"][0]["text"]


def scales(server) -> list[float]:
    status, out = request(server, "GET", "/lora-adapters")
    assert status == 200
    return [a["scale"] for a in out]


@pytest.fixture
def restored(server):
    """The server's scales as at start after the test, whatever it POSTed."""
    yield
    assert request(server, "POST", "/lora-adapters", [{"id": 0, "scale": 1}, {"id": 1, "scale": 0.5}])[0] == 200


def test_get_lists_the_adapters_as_given(server, pair):
    status, out = request(server, "GET", "/lora-adapters")
    assert status == 200
    assert out == [{"id": 0, "path": pair[1].name, "name": pair[1].stem, "scale": 1.0},
                   {"id": 1, "path": pair[2].name, "name": pair[2].stem, "scale": 0.5}]  # file names, no directory


def test_post_rescales_what_requests_without_lora_run_with(server, expected, restored):
    assert text(complete(server)) == expected((1.0, 0.5))
    status, out = request(server, "POST", "/lora-adapters", [{"id": 0, "scale": 0.25}])
    assert (status, out) == (200, {"success": True})
    assert scales(server) == [0.25, 0.0]  # an adapter not named is off, as llama-server does
    assert text(complete(server)) == expected((0.25, 0.0))
    status, out = request(server, "POST", "/api/generate", {"prompt": PROMPT, "raw": True, "stream": False,
                                                            "options": {"temperature": 0, "num_predict": 16}})
    assert status == 200 and out["response"] == expected((0.25, 0.0))  # Ollama's endpoints too
    assert request(server, "POST", "/lora-adapters", [])[0] == 200  # all off: the base
    assert text(complete(server)) == expected((0.0, 0.0))


def test_a_requests_own_lora_picks_its_set(server, expected):
    base, adapted = expected((0.0, 0.0)), expected((1.0, 0.0))
    assert base != adapted  # else this test proves nothing
    assert text(complete(server, [{"id": 0, "scale": 0}])) == base
    assert text(complete(server, [{"id": 0, "scale": 1}])) == adapted  # id 1 not named: off
    assert text(complete(server, [{"id": 1, "scale": 1.0}])) == expected((0.0, 1.0))
    assert text(complete(server, [])) == base
    assert scales(server) == [1.0, 0.5]  # a request's set is its own
    status, out = request(server, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "안녕"}], "max_tokens": 4, "temperature": 0,
        "lora": [{"id": 0, "scale": 0.5}]})
    assert status == 200, out


def test_a_cache_is_reused_only_under_its_own_set(pair, expected):
    """One slot: the same prompt again with the same set reuses its cache; with another set it is evaluated afresh
    (its K/V were computed with other adapters) and gives that set's answer."""
    base, ad0, _ = pair
    with serving(base, parallel=1, n_ctx=CTX, lora=(Lora(ad0),)) as srv:
        first = complete(srv, [{"id": 0, "scale": 1}])
        again = complete(srv, [{"id": 0, "scale": 1}])
        other = complete(srv, [{"id": 0, "scale": 0}])
        back = complete(srv, [{"id": 0, "scale": 1}])
    cached = lambda out: out["usage"]["prompt_tokens_details"]["cached_tokens"]  # noqa: E731
    assert text(first) == text(again) == text(back) == expected((1.0, 0.0))
    assert cached(again) > 0
    assert text(other) == expected((0.0, 0.0))
    assert cached(other) == 0 and cached(back) == 0


def _stream(server, lora: list, max_tokens: int, name: str, log: list, lock: threading.Lock, out: dict) -> None:
    """One streamed completion; each text chunk and the end go into `log` as (name, kind) in arrival order."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True, "lora": lora}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    pieces = []
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        choice = json.loads(line[6:])["choices"][0]
        with lock:
            if choice["finish_reason"] is not None:
                log.append((name, "done"))
            elif choice["text"]:
                log.append((name, "token"))
                pieces.append(choice["text"])
    conn.close()
    out[name] = "".join(pieces)


def test_two_sets_take_turns_and_both_streams_progress(server, expected):
    """Streams with different sets cannot share a decode: they alternate, one step each. B starts once A is
    streaming; before either ends, both have had many tokens (a scheduler that let one set run to its end first would
    give B none), and each answer is what it is alone."""
    n = 400
    log: list[tuple[str, str]] = []
    lock = threading.Lock()
    out: dict[str, str] = {}
    a = threading.Thread(target=_stream, args=(server, [{"id": 0, "scale": 1}], n, "a", log, lock, out))
    b = threading.Thread(target=_stream, args=(server, [], n, "b", log, lock, out))
    a.start()
    end = time.monotonic() + 60
    while not log and time.monotonic() < end:
        time.sleep(0.001)
    b.start()
    a.join(120)
    b.join(120)
    first_done = log.index(next(e for e in log if e[1] == "done"))
    before = log[:first_done]
    assert before.count(("a", "token")) >= 20 and before.count(("b", "token")) >= 20, before[-40:]
    assert out["a"] == expected((1.0, 0.0), n)
    assert out["b"] == expected((0.0, 0.0), n)


BAD = [
    ({"id": 0, "scale": 1}, "array"),  # not a list
    ([{"id": 2, "scale": 1}], "no adapter has id 2"),
    ([{"id": -1, "scale": 1}], "no adapter has id -1"),
    ([{"id": "0", "scale": 1}], "id must be a whole number"),
    ([{"id": 0, "scale": 101}], "from -100 to 100"),
    ([{"id": 0, "scale": -1000}], "from -100 to 100"),
    ([{"id": 0, "scale": "0.5"}], "must be a number"),
    ([{"id": 0}], "scale must be a number"),
    ([{"id": 0, "scale": 1, "weight": 2}], "unknown key 'weight'"),
    ([{"id": 0, "scale": 1}, {"id": 0, "scale": 0.5}], "given twice"),
    ([{"id": 0, "scale": 1}] * 3, "3 entries"),
    ([7], "must be an object"),
]


@pytest.mark.parametrize(("body", "said"), BAD)
def test_bad_bodies_are_400_and_change_nothing(server, body, said):
    status, out = request(server, "POST", "/lora-adapters", body)
    assert status == 400 and said in out["error"]["message"], out
    status, out = request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "lora": body})
    assert status == 400 and out["error"]["param"] == "lora" and said in out["error"]["message"], out
    assert scales(server) == [1.0, 0.5]


@pytest.mark.parametrize("raw", [b'[{"id": 0, "scale": NaN}]', b'[{"id": 0, "scale": Infinity}]',
                                 b'[{"id": 0, "scale": 1e999}]', b"not json", b"{}"])
def test_bad_numbers_and_bad_json_are_400(server, raw):
    status, out = request(server, "POST", "/lora-adapters", raw=raw)
    assert status == 400 and out["error"]["message"], out
    assert scales(server) == [1.0, 0.5]
    assert text(complete(server, max_tokens=2))  # still serving


def test_the_api_key_and_the_origin_guard_cover_the_routes(pair):
    base, ad0, _ = pair
    with serving(base, parallel=1, n_ctx=256, lora=(Lora(ad0),), api_key="k") as srv:
        for method, body in (("GET", None), ("POST", [{"id": 0, "scale": 0}])):
            assert request(srv, method, "/lora-adapters", body)[0] == 401
        assert request(srv, "POST", "/lora-adapters", [], headers={"Authorization": "Bearer k",
                                                                   "Origin": "http://evil.example"})[0] == 403
        status, out = request(srv, "GET", "/lora-adapters", headers={"Authorization": "Bearer k"})
        assert status == 200 and out[0]["scale"] == 1.0  # neither refused POST changed it


def test_a_server_without_adapters_lists_none(pair):
    with serving(pair[0], parallel=1, n_ctx=256) as srv:
        assert request(srv, "GET", "/lora-adapters") == (200, [])
        assert request(srv, "POST", "/lora-adapters", [])[0] == 200
        status, out = request(srv, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2,
                                                               "lora": [{"id": 0, "scale": 1}]})
        assert status == 400 and "start it with --lora" in out["error"]["message"]
