"""The rules a server of many models keeps in memory by (app.runtime.memory.room and need): which idle models go
for a new one, when it waits, when it is refused, and what a model needs on a GPU, with ggml's devices faked (as
tests/fake_devices.py does: this CI has no GPU) and the demo's real header."""

from __future__ import annotations

from dataclasses import replace

import fake_devices
from fake_devices import GiB, MiB

from malhae.runtime import memory
from malhae.runtime.memory import Need
from malhae.runtime.settings import LoadOptions


class M:
    """A loaded model as room() sees it."""

    def __init__(self, name: str, ram: int, idle: bool, used: float, vram: int = 0) -> None:
        self.name, self.need, self.idle, self.used = name, Need(ram, vram, 0), idle, used

    def entry(self):
        return (self, self.need, self.idle, self.used)


def room(new: Need, *models: M, max_loaded: int = 3, max_memory: int = 10 * GiB):
    return memory.room(new, [m.entry() for m in models], max_loaded, max_memory)


def test_a_model_that_fits_evicts_nothing():
    a = M("a", 2 * GiB, True, 1.0)
    assert room(Need(3 * GiB, 0, 0), a).evict == [] and not room(Need(3 * GiB, 0, 0), a).wait


def test_the_least_recently_used_idle_models_go_first_and_no_more_than_needed():
    old, mid, new = M("old", 3 * GiB, True, 1.0), M("mid", 3 * GiB, True, 2.0), M("new", 3 * GiB, True, 3.0)
    got = room(Need(2 * GiB, 0, 0), new, old, mid, max_loaded=9)  # 9 + 2 > 10: one must go
    assert got.evict == [old] and "--max-memory" in got.why
    got = room(Need(5 * GiB, 0, 0), new, old, mid, max_loaded=9)  # 9 + 5 > 10: two
    assert got.evict == [old, mid]
    got = room(Need(1, 0, 0), new, old, mid)  # three loaded, at most three: the count rule alone
    assert got.evict == [old] and "--max-loaded" in got.why


def test_busy_models_are_never_evicted_the_load_waits():
    busy, idle = M("busy", 6 * GiB, False, 1.0), M("idle", 1 * GiB, True, 2.0)
    got = room(Need(5 * GiB, 0, 0), busy, idle)  # even with idle gone, 6 + 5 > 10: wait for busy
    assert got.wait and got.evict == []


def test_max_loaded_counts_models_not_bytes():
    a, b = M("a", 1, True, 2.0), M("b", 1, True, 1.0)
    assert room(Need(1, 0, 0), a, b, max_loaded=2).evict == [b]
    assert room(Need(1, 0, 0), M("x", 1, False, 1.0), max_loaded=1).wait


def test_a_model_larger_than_the_cap_is_refused_with_the_reason():
    got = room(Need(11 * GiB, 0, 0))
    assert got.refused and "--max-memory" in got.refused and "10.00 GiB" in got.refused


def test_a_gpu_short_of_room_takes_it_from_idle_models_holding_gpu_memory():
    """Ollama's preference: a new model that a GPU cannot hold whole gets the GPU memory of idle models, even when
    RAM would hold it; idle models on the CPU are left alone, busy ones are never touched."""
    cpu_only = M("cpu", 1 * GiB, True, 0.5)
    on_gpu_old, on_gpu_new = M("g1", 0, True, 1.0, vram=3 * GiB), M("g2", 0, True, 2.0, vram=3 * GiB)
    busy = M("g3", 0, False, 0.1, vram=3 * GiB)
    got = room(Need(4 * GiB, 0, 4 * GiB), cpu_only, on_gpu_new, on_gpu_old, busy, max_loaded=9)
    assert got.evict == [on_gpu_old, on_gpu_new] and "GPU" in got.why
    assert room(Need(4 * GiB, 0, 2 * GiB), on_gpu_old, on_gpu_new).evict == [on_gpu_old]
    assert room(Need(1 * GiB, 0, 0), on_gpu_old).evict == []  # whole on the GPU already: nothing to free


def test_need_on_faked_gpus(monkeypatch, demo_path):
    """The demo at 4 slots of 512 tokens: on the CPU all in RAM; on a roomy GPU all in VRAM; on a GPU with room for
    a few layers, the rest is RAM and `short` says what more free memory would take."""
    options = LoadOptions(model=demo_path, threads=2, parallel=4, ctx=512)
    fake_devices.install(monkeypatch, fake_devices.cpu())
    alone = memory.need(options)
    assert alone.ram > 0 and alone.vram == 0 and alone.short == 0
    fake_devices.install(monkeypatch, fake_devices.cuda(0, 24 * GiB), fake_devices.cpu())
    roomy = memory.need(options)
    assert roomy.vram > 0 and roomy.short == 0 and roomy.ram == 0
    fake_devices.install(monkeypatch, fake_devices.cuda(0, 430 * MiB), fake_devices.cpu())
    tight = memory.need(options)
    assert tight.ram > 0 and tight.short == tight.ram
    fake_devices.install(monkeypatch, fake_devices.cuda(0, 24 * GiB), fake_devices.cpu())
    asked = memory.need(replace(options, gpu_layers=0))  # --gpu-layers 0: the GPU is not in play
    assert asked.vram == 0 and asked.short == 0


def test_requests_waiting_for_a_load_are_bounded_and_a_failed_load_leaves_nothing(demo_path):
    """A Pool (app.serve.residency) whose loads wait for a signal: `queue` requests may wait for a loading model,
    the next gets 503; a load that fails fails every waiter and the next request tries again."""
    import asyncio
    import threading

    import pytest

    from malhae.errors import UserError
    from malhae.runtime.target import Target
    from malhae.serve.errors import ApiError
    from malhae.serve.residency import Pool
    from malhae.serve.service import Service

    go, fail = threading.Event(), [True]

    def load(target, start=None):
        go.wait(30)
        if fail[0]:
            raise UserError("the disk was pulled out")
        return Service.load(target.options, model_id=target.key, queue=4, start=start)

    pool = Pool(loader=load, max_loaded=3, max_memory=64 * GiB, queue=2)
    target = Target("demo", "demo", LoadOptions(model=demo_path, threads=2, parallel=1, ctx=256))

    async def scenario():
        waiting = [asyncio.ensure_future(pool.acquire(target, 300.0)) for _ in range(2)]
        while not pool.snapshot() or pool.snapshot()[0].waiting < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(ApiError) as e:
            await pool.acquire(target, 300.0)  # a third waits for nothing: refused at once
        assert e.value.status == 503 and e.value.headers.get("Retry-After")
        go.set()
        for w in waiting:
            with pytest.raises(ApiError) as e:
                await w
            assert e.value.status == 500 and "the disk was pulled out" in e.value.message
        assert pool.snapshot() == []  # no half-loaded model left
        fail[0] = False
        lease = await pool.acquire(target, 300.0)  # tried again, and loaded
        assert lease.service.model_id == "demo" and [r.key for r in pool.snapshot()] == ["demo"]
        lease.release()

    try:
        asyncio.run(scenario())
    finally:
        pool.close()


def test_keep_alive_durations_read_as_ollama_reads_them():
    import pytest

    from malhae import units
    from malhae.errors import UserError

    cases = {"5m": 300.0, "1h30m": 5400.0, "90s": 90.0, "1.5h": 5400.0, "300ms": 0.3, 300: 300.0, "300": 300.0,
             0: 0.0, "0": 0.0, -1: None, "-1m": None, "forever": None, 2.5: 2.5}
    for given, seconds in cases.items():
        assert units.duration(given, "keep_alive") == seconds, given
    for bad in ("abc", "5x", "", "5m5", True, None, [], "9" * 40, 1e300, float("nan"), "1e309"):
        with pytest.raises(UserError) as e:
            units.duration(bad, "keep_alive")
        assert str(e.value).startswith("keep_alive must be a duration")
    assert [units.duration_text(s) for s in (None, 0.0, 90.0, 300.0, 5400.0, 30.0)] == \
        ["forever", "0s", "90s", "5m", "1h30m", "30s"]
