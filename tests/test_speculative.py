"""Speculative decoding: the same tokens as plain decoding (greedy and seeded), with lookup and with draft models.

Run on the trained demo model, whose answers quote its prompt often enough for drafts to be accepted (each test also
checks that drafts were made and kept, so the verification path is what it tests). Draft models: a copy of the demo
cut to its first two layers (an imperfect draft of the same tokenizer) and the demo itself (a perfect one).
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from malhae.convert.rewrite import copy_gguf, first_layers
from malhae.errors import UserError
from malhae.runtime import llama
from malhae.runtime.draft import Lookup
from malhae.runtime.engine import Engine, common_prefix
from malhae.runtime.settings import LoadOptions, Sampling
from malhae.runtime.speculate import EXPLORE_AFTER, PRIOR_ACCEPT, DraftLength

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "malhae-demo-ko-f16.gguf"
CONSTITUTION = (ROOT / "models" / "data" / "ko-public-domain" / "constitution.txt").read_text(encoding="utf-8")
BILL = (ROOT / "models" / "data" / "ko-public-domain" / "bills" / "1809890.txt").read_text(encoding="utf-8")

# quoting prompts (a passage, then its beginning again) and one the answer does not quote
PROMPTS = [
    CONSTITUTION[:1200] + "\n" + CONSTITUTION[:120],
    CONSTITUTION[3000:4000] + "\n\n" + CONSTITUTION[3000:3100],
    BILL[:1000] + "\n" + BILL[:80],
    "대한민국의 수도는",
]
LONG = Sampling(temperature=0, max_tokens=320, ignore_eos=True)


def speculating(draft, **options) -> Engine:
    """The demo with `draft`, deciding draft lengths as on a GPU (verifying is nearly free, so it drafts whenever it
    can): the same choices whatever else this machine is doing, and the verification path runs as often as possible.
    DraftLength's own choices are tested on their own (test_draft_length_follows_costs_and_acceptance)."""
    engine = Engine(LoadOptions(model=DEMO, ctx=options.pop("n_ctx", 1024), threads=2, gpu_layers=0, draft=draft,
                                **options))
    engine.speculator.length = DraftLength(engine.speculator.draft_max, costs=GPU_LIKE, draft_cost=0.0)
    return engine


GPU_LIKE = {rows: 1.0 + 0.02 * (rows - 1) for rows in (1, 64)}


@pytest.fixture(scope="module")
def plain():
    with Engine(LoadOptions(model=DEMO, ctx=1024, threads=2, gpu_layers=0)) as e:
        yield e


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory) -> Path:
    return first_layers(DEMO, tmp_path_factory.mktemp("draft") / "demo-2-layers.gguf", 2)


def run(engine: Engine, prompt: str, sampling: Sampling) -> tuple[str, list[int], object]:
    text = "".join(engine.generate(prompt, sampling))
    return text, list(engine.generated), engine.stats


@pytest.mark.parametrize("draft", ["lookup", "two-layers", "demo"])
def test_greedy_equals_plain_decoding(plain, two_layers, draft):
    target = {"lookup": "lookup", "two-layers": two_layers, "demo": DEMO}[draft]
    with speculating(target) as spec:
        proposed = accepted = 0
        for prompt in PROMPTS:
            want_text, want_ids, want = run(plain, prompt, LONG)
            text, ids, stats = run(spec, prompt, LONG)
            assert ids == want_ids and text == want_text
            assert len(ids) == 320 and stats.stop_reason == want.stop_reason == "length"
            proposed += stats.draft_proposed
            accepted += stats.draft_accepted
        assert accepted > 200, (proposed, accepted)  # drafts were made and kept: the verification path ran
        if draft == "demo":  # a perfect draft: all its guesses are right (but it may stop where it is unsure)
            assert accepted >= 0.97 * proposed


def kernel_logits(tokens: list[int]) -> tuple[np.ndarray, float]:
    """The demo's logits for the last of `tokens` as plain decoding computes them (the prompt in one batch, then one
    row at a time), and how far llama.cpp's multi-row kernels (as a verification uses them, with 2, 5 and 16 rows)
    move any logit there on this CPU: the size of its rounding."""
    llama.init(False)
    with llama.Model(DEMO) as model, llama.Context(model, LoadOptions(model=DEMO, ctx=1024, threads=2)) as ctx, \
            llama.Batch(1024) as batch:
        ctx.clear()
        batch.fill(tokens[:-1], range(len(tokens) - 1))
        ctx.decode(batch)
        batch.fill(tokens[-1:], [len(tokens) - 1])
        ctx.decode(batch)
        one_row = ctx.output_logits(1)[0].copy()
        spread = 0.0
        for rows in (2, 5, 16):
            ctx.clear()
            batch.fill(tokens[:-rows], range(len(tokens) - rows))
            ctx.decode(batch)
            batch.fill(tokens[-rows:], range(len(tokens) - rows, len(tokens)))
            ctx.decode(batch)
            spread = max(spread, float(np.abs(ctx.output_logits(rows)[-1] - one_row).max()))
    return one_row, spread


@pytest.mark.parametrize("draft", ["lookup", "two-layers"])
def test_seeded_sampling_gives_the_same_text(plain, two_layers, draft):
    """The same seed gives the same answer with or without a draft, or parts from it only at a near tie.

    A verification decodes several rows at once, and llama.cpp's multi-row kernels round differently from its one-row
    kernel on some CPUs (this project's AMD EPYC machines: F16 weights, AVX-512 without AMX). A seeded draw between two
    tokens whose logits are closer than that rounding then picks the other one: measured here, seed 2 with the
    two-layer draft parts after 67 equal tokens, where tokens 3209 and 2150 have logits 4.8780 and 4.8775 and the
    multi-row kernels move logits by up to 0.005, swapping their order. So every answer must be equal, except that one
    may part where the two tokens are such a tie: their logits differ by no more than the kernels' rounding there, and
    that rounding is small (a real fault — a wrong position, a stale cache, a sampler drawing out of turn — would give
    equal logits or logits far apart). On CPUs whose kernels agree, all nine answers are equal."""
    target = {"lookup": "lookup", "two-layers": two_layers}[draft]
    with speculating(target) as spec:
        accepted = 0
        parted = []  # (prompt tokens up to the first differing answer token, plain's token, the speculative one)
        for seed in (1, 2, 3):
            for prompt in PROMPTS[:3]:
                s = Sampling(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, seed=seed,
                             max_tokens=200)
                want_text, want_ids, _ = run(plain, prompt, s)
                text, ids, stats = run(spec, prompt, s)
                if ids != want_ids:
                    at = common_prefix(ids, want_ids)
                    parted.append((plain.tokenize(prompt) + want_ids[:at], want_ids[at], ids[at]))
                else:
                    assert text == want_text
                accepted += stats.draft_accepted
        assert len(parted) <= 1, [(len(t), a, b) for t, a, b in parted]
        for tokens, theirs, ours in parted:
            logits, rounding = kernel_logits(tokens)
            gap = abs(float(logits[theirs] - logits[ours]))
            assert 0 < rounding < 0.05 and gap <= 2 * rounding, (len(tokens), theirs, ours, gap, rounding)
        assert accepted > 50


def test_stop_strings_inside_accepted_drafts(plain):
    prompt = PROMPTS[0]
    full, _, _ = run(plain, prompt, LONG)
    with speculating("lookup") as spec:
        # stop texts at many points of a quoted answer, where nearly every token comes from an accepted draft
        for at in range(40, 600, 37):
            stop = full[at:at + 3]
            if not stop.strip():
                continue
            s = Sampling(temperature=0, max_tokens=320, ignore_eos=True, stop=(stop,))
            want_text, _, want = run(plain, prompt, s)
            text, _, stats = run(spec, prompt, s)
            assert text == want_text == full[:full.index(stop)]
            assert stats.stop_reason == want.stop_reason == "stop"
            assert stats.generated_tokens == want.generated_tokens
            assert stats.draft_accepted > 0


def test_the_context_ends_mid_draft(plain):
    with speculating("lookup") as spec:
        for n_ctx_left in (1, 2, 5, 17):
            prompt = spec.tokenize(PROMPTS[0])
            s = Sampling(temperature=0, max_tokens=10_000, ignore_eos=True)
            filler = spec.tokenize(CONSTITUTION[:3000])[: 1024 - len(prompt) - n_ctx_left]
            tokens = filler + prompt
            _, want_ids, want = run(plain, tokens, s)
            _, ids, stats = run(spec, tokens, s)
            assert ids == want_ids and len(ids) == n_ctx_left
            assert stats.stop_reason == want.stop_reason == "context"


def test_max_tokens_mid_draft_and_kv_reuse_across_turns(plain):
    with speculating("lookup") as spec:
        conversation = PROMPTS[0]
        for max_tokens in (7, 33, 64):
            s = Sampling(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            want_text, want_ids, _ = run(plain, conversation, s)
            text, ids, stats = run(spec, conversation, s)
            assert ids == want_ids and len(ids) == max_tokens
            conversation += text + "\n" + CONSTITUTION[:60]  # the next turn extends this one
        assert stats.cached_tokens > 300  # the engine kept its cache (with accepted drafts) for the next turn


def test_an_interrupted_answer_leaves_a_consistent_cache(plain):
    with speculating("lookup") as spec:
        pieces = spec.generate(PROMPTS[1], LONG)
        for _, _ in zip(range(30), pieces, strict=False):
            pass
        pieces.close()  # Ctrl-C: the generator is closed between tokens
        assert spec.stats.stop_reason == "interrupted"
        want_text, want_ids, _ = run(plain, PROMPTS[1], LONG)
        text, ids, _ = run(spec, PROMPTS[1], LONG)
        assert ids == want_ids


def test_draft_models_of_another_vocabulary_are_refused(tmp_path, checkpoints):
    from malhae.convert import pipeline

    small = pipeline.convert(checkpoints("tf4-st-f16"), "f16", tmp_path / "other.gguf").path
    with pytest.raises(UserError, match=r"other.gguf cannot draft for this model: its vocabulary has 1,0\d\d "
                                        r"tokens and the model's 7,552"):
        Engine(LoadOptions(model=DEMO, ctx=256, threads=2, gpu_layers=0, draft=small))
    tokens = gguf.GGUFReader(DEMO).fields[gguf.Keys.Tokenizer.LIST].contents()
    tokens[1000] = "다른토큰"
    renamed = copy_gguf(DEMO, tmp_path / "renamed.gguf", fields={gguf.Keys.Tokenizer.LIST: tokens})
    with pytest.raises(UserError, match="renamed.gguf cannot draft for this model: token 1000 is"):
        Engine(LoadOptions(model=DEMO, ctx=256, threads=2, gpu_layers=0, draft=renamed))


def test_a_draft_models_cost_per_token_leaves_out_reading_a_new_prompt(plain, monkeypatch):
    """A draft model first reads the whole prompt; counting that as drafting time made one drafted token look as dear
    as hundreds, so drafting never paid again (the demo as a perfect draft for its heavy twin: 6 tokens proposed in
    200). The clock is faked: evaluating costs a second per token, drafting nothing."""
    import types

    from malhae.runtime import draft as draft_module
    from malhae.runtime.draft import CATCH_UP, DraftModel
    from malhae.runtime.engine import common_prefix

    clock = [0.0]
    monkeypatch.setattr(draft_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    drafter = DraftModel(Engine(LoadOptions(model=DEMO, ctx=1024, threads=2, gpu_layers=0)), plain.model)
    evaluate = drafter.engine.evaluate

    def timed(tokens: list[int]) -> None:
        clock[0] += len(tokens) - min(common_prefix(drafter.engine.cache, tokens), len(tokens) - 1)
        evaluate(tokens)

    drafter.engine.evaluate = timed
    try:
        history = plain.tokenize(PROMPTS[0])
        assert len(history) > CATCH_UP
        _, draft = drafter.propose(history, 4)
        assert draft and drafter.seconds_per_token == 0.0  # the prompt was read, nothing was spent drafting
        # two guesses kept (already in the draft's cache), then the target's own token: one to catch up on, which
        # is part of what drafting costs
        _, again = drafter.propose(history + draft[:2] + [7], 4)
        assert again and drafter.seconds_per_token == pytest.approx(1 / len(again))
    finally:
        drafter.close()


def test_lookup_guesses_the_confident_continuation_of_the_longest_match():
    lookup = Lookup(n_max=3)
    once = (3, 1, True)  # a 3-gram seen once, always followed by the guess
    history = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3]
    # [1, 2, 3] was followed by 4 (once: enough for 3 tokens); then 5 after [2, 3, 4], 9 after [3, 4, 5] …
    assert lookup.propose(history, 4) == ([once] * 4, [4, 5, 9, 2])
    # [2, 3, 7] was followed by 8, [3, 7, 8] by 1, [7, 8, 1] by 2; [8, 1, 2] by 3 (the table grew in place)
    assert lookup.propose(history + [7], 4) == ([once] * 4, [8, 1, 2, 3])
    assert lookup.propose([5, 6], 4) == ([], [])  # a new history is indexed afresh: nothing repeats
    assert lookup.propose([5, 6, 5], 2) == ([], [])  # [5] → 6 seen once: too little for one token
    assert lookup.propose([5, 6, 5, 6, 5], 2) == ([once] * 2, [6, 5])  # [5, 6, 5] → 6 (once: a 3-gram), then 5
    assert lookup.propose([5, 6, 5, 7, 5], 1) == ([], [])  # [5] → 6 once, 7 once: no confident guess
    assert lookup.propose([7, 5, 6, 8, 5, 6, 9, 4, 5], 1) == ([(1, 2, True)], [6])  # [4, 5] unseen; [5] → 6, 2 of 2
    assert lookup.propose([1, 2, 1, 3, 1, 2, 1], 0) == ([], [])  # told to propose nothing
    # [2, 4, 1] → 2 once, then 3 once: the latest wins, and the guess is marked as one its n-gram did not always make
    assert lookup.propose([4, 1, 2, 4, 1, 2, 4, 1, 3, 4, 1, 2, 4, 1], 2) == ([(3, 1, False), once], [3, 4])
    # [2, 1] → 2 three times, [1, 2] → 1 four times: the count is kept up to 3
    assert Lookup(n_max=2).propose([1, 2, 1, 2, 1, 2, 1, 2, 1], 2) == ([(2, 3, True)] * 2, [2, 1])


def test_draft_length_follows_costs_and_acceptance():
    """The hardware's answers are faked: a CPU-like cost curve (2 rows 1.5×, 8 rows 5.5×) and a GPU-like flat one.
    Acceptance is learned per kind of guessed token ("right" always accepted, "wrong" never)."""
    cpu, gpu = DraftLength(16), DraftLength(16)
    for rows, factor in ((1, 1.0), (2, 1.5), (4, 2.9), (8, 5.5), (16, 7.7)):
        cpu.timed(rows, 0.040 * factor)
        gpu.timed(rows, 0.005 * (1 + 0.02 * (rows - 1)))
    assert cpu.row_cost(3) == pytest.approx(0.040 * 2.2)  # between measured points: interpolated
    for lengths in (cpu, gpu):
        for _ in range(200):
            lengths.observe(["right"] * 16, 16)
            lengths.observe(["wrong", "right"], 0)  # the second token was never really tried
        assert lengths.accept_rate("right") > 0.98 and lengths.accept_rate("wrong") < 0.05
    assert cpu.cut(["right"] * 16) == gpu.cut(["right"] * 16) == 16  # always right: as long as drafted, even on a CPU
    assert cpu.cut(["right"] * 3) == 3  # never more than was drafted
    assert cpu.reach(16) == gpu.reach(16) == 16  # a draft model should draft that far: it may all be right
    assert cpu.reach(5) == 5  # never past the limit the caller gives (max_tokens, the context)
    assert gpu.cut(["right"] * 3 + ["wrong"] + ["right"] * 12) == 3  # verified up to the guess that is never right
    assert cpu.cut(["wrong"] + ["right"] * 15) == 0  # nor a draft that starts with one
    for lengths in (cpu, gpu):  # guesses right 60% of the time
        lengths.tried["maybe"], lengths.kept["maybe"] = 100.0, 60.0
    assert cpu.cut(["maybe"] * 16) == 1  # E(2) = 1.96 tokens for 2.2× one token's time does not pay; E(1) = 1.6: 1.5×
    assert 4 <= gpu.cut(["maybe"] * 16) <= 8  # E(k)/(1 + 0.02k) is largest near k = 5 or 6
    skipped = [cpu.cut(["wrong"]) for _ in range(EXPLORE_AFTER)]
    assert skipped[:-1] == [0] * (EXPLORE_AFTER - 1) and skipped[-1] == 1  # nothing pays; one short try now and then


# --- the front ends ----------------------------------------------------------------------------------------------

def test_serve_speculates_for_a_lone_request_and_batches_several(plain):
    import json
    import threading

    from helpers import serving
    from test_serve import request

    prompts = PROMPTS[:3]
    want = [run(plain, p, Sampling(temperature=0, max_tokens=120, repeat_penalty=1.0))[0] for p in prompts]
    body = {"model": "malhae-demo-ko-f16", "max_tokens": 120, "temperature": 0, "repeat_penalty": 1.0}
    with serving(DEMO, parallel=3, n_ctx=1024, draft="lookup") as server:
        server.state.ready.wait(60)
        engine = server.state.service.engine
        engine.speculator.length = DraftLength(engine.speculator.draft_max, costs=GPU_LIKE, draft_cost=0.0)
        counts = engine.speculator.counts
        for prompt, text in zip(prompts, want, strict=True):  # one at a time: each speculates alone
            status, _, out = request(server, "POST", "/v1/completions", body | {"prompt": prompt})
            assert status == 200 and out["choices"][0]["text"] == text
        alone = counts.accepted
        assert alone > 60, json.dumps(vars(counts))
        got: dict[int, str] = {}

        def ask(i: int) -> None:
            got[i] = request(server, "POST", "/v1/completions", body | {"prompt": prompts[i]})[2]["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [got[i] for i in range(3)] == want  # batched together (and speculating once one is left): the same


def test_ask_and_complete_take_draft_flags_and_report_drafts(tmp_path):
    import json
    import subprocess
    import sys

    def malhae(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, cwd=ROOT, timeout=120,
                              stdin=subprocess.DEVNULL)

    prompt = PROMPTS[0]
    texts = {}
    for draft in ("off", "lookup", str(DEMO)):
        proc = malhae("complete", prompt, "--temperature", "0", "-n", "64", "--json", "--draft", draft,
                      "--draft-max", "4")
        assert proc.returncode == 0, proc.stderr.decode()
        out = json.loads(proc.stdout)
        texts[draft] = out["text"]
        assert {"draft_proposed", "draft_accepted"} <= out["stats"].keys()
        if draft == "off":
            assert out["stats"]["draft_proposed"] == 0
        assert out["stats"]["draft_accepted"] <= out["stats"]["draft_proposed"]
    assert len(set(texts.values())) == 1
    from helpers import one_error_line

    assert "--draft nosuch: no model named 'nosuch'" in one_error_line(malhae("ask", "안녕", "--draft", "nosuch"))
    assert "--draft-max 65: draft_max must be a whole number from 1 to 64" in one_error_line(
        malhae("ask", "안녕", "--draft-max", "65"))
    config = tmp_path / "config.toml"
    config.write_text('draft = "nosuch.gguf"\n', encoding="utf-8")
    import os

    env = os.environ | {"MALHAE_CONFIG": str(config)}
    proc = subprocess.run([sys.executable, "-m", "malhae", "ask", "안녕"], capture_output=True, cwd=ROOT, timeout=120,
                          stdin=subprocess.DEVNULL, env=env)
    assert f"{config}: draft nosuch.gguf: model file nosuch.gguf does not exist" in one_error_line(proc)


def test_set_draft_in_chat(tmp_path):
    from test_chat import talk

    def frozen(chat) -> None:
        chat.engine.speculator.length = DraftLength(chat.load.draft_max, costs=GPU_LIKE, draft_cost=0.0)

    keys = (CONSTITUTION[:400].replace("\n", " ") + "\r/stats\r/set draft_max 4\r/show\r/set draft off\r"
            f"/set draft nosuch\r/set draft\r/set draft_max 0\r/set draft {tmp_path}\r안녕\r/stats\r")
    s = talk(DEMO, keys, setup=frozen, draft="lookup",
             sampling=Sampling(temperature=0, max_tokens=120, ignore_eos=True))
    assert re.search(r"drafts \(lookup\): \d+ of \d+ proposed tokens accepted", s.err)
    assert "draft_max = 4" in s.err and "draft lookup (max 4)" in s.err  # /show
    assert "draft = off (speculative decoding off)" in s.err
    for hint in ("/set draft nosuch: no model named 'nosuch'", "/set draft needs a value",
                 "draft_max must be a whole number from 1 to 64", f"{tmp_path} is a directory, not a model file"):
        assert len(s.hints(hint)) == 1, (hint, s.err)
    assert s.err.count("drafts (lookup)") == 1  # the second answer ran without drafts


def test_draft_length_learns_from_its_first_drafts():
    """Before plain decoding has run, one token's cost is estimated from the smallest measured verification; an
    untried kind of guess is assumed to be accepted PRIOR_ACCEPT of the time, so drafts that are always right grow
    longer as their kind is measured."""
    lengths = DraftLength(16)
    lengths.timed(2, 0.080)  # only drafts of 1 so far, on a CPU-like machine
    assert lengths.row_cost(1) == pytest.approx(0.080 / 1.6)  # not the 2-row cost itself
    assert lengths.accept_rate("new") == PRIOR_ACCEPT
    assert lengths.reach(16) == 1 and lengths.cut(["new"] * 16) == 1  # little is known yet: a short draft
    for _ in range(60):
        lengths.observe(["sure"], 1)  # every one-token draft accepted
    assert lengths.accept_rate("sure") > 0.9
    for rows in (3, 8, 17):  # verifying longer drafts turned out cheap (a GPU)
        lengths.timed(rows, 0.080 * (1 + 0.02 * rows))
    lengths.timed(1, 0.078)
    assert lengths.reach(16) == 16 and lengths.cut(["sure"] * 16) == 16
    assert lengths.reach(16, draft_seconds=0.078) == 0  # unless each drafted token costs as much as a decode


def test_the_replay_benchmark_drafts_exactly_as_the_engine_does():
    """benchmarks/lookup_replay.py projects speeds from recorded answers; its figures mean something only if it makes
    the choices the engine makes. With the same fixed costs, the engine's proposed and kept counts are the replay's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lookup_replay", ROOT / "benchmarks" / "lookup_replay.py")
    replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay)
    sampling = Sampling(temperature=0, repeat_penalty=1.0, max_tokens=200, ignore_eos=True)
    with speculating("lookup") as engine:
        for prompt in PROMPTS[:3]:
            engine.speculator.length = DraftLength(engine.speculator.draft_max, costs=GPU_LIKE, draft_cost=0.0)
            _, ids, stats = run(engine, prompt, sampling)
            case = {"prompt": engine.tokenize(prompt), "answer": ids}
            _, proposed, accepted = replay.replay(case, GPU_LIKE, "malhae")
            assert stats.draft_accepted > 20  # drafts were made and kept
            assert (proposed, accepted) == (stats.draft_proposed, stats.draft_accepted)
            oracle, _, best = replay.replay(case, GPU_LIKE, "oracle")
            assert best >= accepted and oracle >= replay.replay(case, GPU_LIKE, "malhae")[0]
