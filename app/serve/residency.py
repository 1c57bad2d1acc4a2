"""Which models the server holds in memory: loaded on demand by name, kept while used, given back when idle.

Ollama's rules, since its clients and users expect them:
- A request for a model not loaded loads it, in a thread of its own, while the other models go on serving; requests
  for a model that is loading wait for it (at most `queue` of them, and at most LOAD_WAIT seconds; then 503).
- A model stays loaded `keep_alive` after its last request ends (5 minutes by default; each request may say its
  own, and the latest one's counts; 0 unloads it once idle; a negative one keeps it). Then it is unloaded without
  any request, and its memory really returned (app.runtime.hardware.return_free_memory).
- A load that does not fit beside what is loaded — more than `max_loaded` models, more than `max_memory` bytes of
  RAM by the offload planner's estimate, or a GPU that has no room for all of its layers while idle models hold
  some — first unloads the least recently used idle models. A model with requests running is never unloaded: the
  load then waits for one to become idle. A model that could not fit even alone is refused with the reason.
- A load that fails leaves nothing behind: its waiting requests get the error, and the next request tries again.
- A model whose file changed (replaced, removed) since it was loaded is loaded again once idle.

One lock guards the table; loads and unloads run in their own threads; requests wait asynchronously (a load's
future, or a short poll while they wait for memory), so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from malhae import units
from malhae.errors import UserError
from malhae.runtime import memory
from malhae.runtime.target import UNSET, Target
from malhae.serve.errors import ApiError

DEFAULT_KEEP_ALIVE = 300.0  # Ollama's 5 minutes
LOAD_WAIT = 300.0  # seconds a request waits for a load, or for memory to load into (Ollama's load timeout)
POLL = 0.05  # seconds between looks while waiting for a busy model to become idle
LOADER_NICE = 10  # a load's thread yields the CPU to the decodes of loaded models (Linux: per thread)


@dataclass(eq=False)
class Resident:
    """One model in memory (or on its way in)."""

    key: str
    target: Target
    identity: tuple | None  # the file as it was when loading began (app.serve.residency.file_identity)
    need: memory.Need
    pinned: bool = False
    state: str = "loading"  # loading → ready; a failed load is dropped from the table
    service: object = None  # app.serve.service.Service once ready
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    busy: int = 0  # requests holding it
    waiting: int = 0  # requests waiting for its load
    used: float = field(default_factory=time.monotonic)
    keep_alive: float | None = DEFAULT_KEEP_ALIVE
    expires: float | None = None  # monotonic deadline once idle; None: not counting down (busy, or for ever)

    @property
    def idle(self) -> bool:
        return self.state == "ready" and self.busy == 0 and not self.pinned


class Lease:
    """A request's hold on a loaded model; `release()` once the answer is complete (any number of times)."""

    def __init__(self, pool: Pool, resident: Resident, target: Target, keep_alive: float | None,
                 waited: float = 0.0) -> None:
        self.pool, self.resident, self.keep_alive = pool, resident, keep_alive
        self.service = resident.service.view(target)  # the loaded model under the name asked for
        self.service.waited = waited
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._release(self.resident, self.keep_alive)


def file_identity(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Pool:
    def __init__(self, *, loader, max_loaded: int, max_memory: int, keep_alive: float | None = DEFAULT_KEEP_ALIVE,
                 queue: int = 64, notify=None) -> None:
        """`loader(target, start) -> Service` loads one model (app.serve.service.Service.load with the server's
        options; `start` runs the scheduler's start on a thread of normal priority);
        the rest are the rules of the module's docstring."""
        self.loader = loader
        self.max_loaded = max_loaded
        self.max_memory = max_memory
        self.keep_alive = keep_alive
        self.queue = queue
        self.notify = notify or (lambda message: None)
        self.residents: dict[str, Resident] = {}
        self._closing: list[concurrent.futures.Future] = []  # unloads not finished: a load waits for them
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._stopped = False
        self._reaper = threading.Thread(target=self._reap, name="malhae-keep-alive", daemon=True)
        self._reaper.start()
        # where loaded models' scheduler threads are started: a thread born here, of this thread's priority, since
        # the loads run niced and a thread inherits its creator's niceness (which it cannot undo unprivileged); a
        # decode at nice 10 ran at 0.23x its speed while the next model loaded (benchmarks/serve_models.py)
        self._starter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="malhae-start")
        self._starter.submit(int).result()  # its thread exists now, not when a niced loader first calls it

    # --- requests (the event loop) -----------------------------------------------------------------------------

    def keep_alive_for(self, target: Target, given: object = UNSET) -> float | None:
        """A request's keep_alive (seconds; None: for ever): its own, else the model's settings', else the
        server's."""
        if given is not UNSET:
            return units.duration(given, "keep_alive")
        return target.keep_alive if target.keep_alive is not UNSET else self.keep_alive  # type: ignore[return-value]

    async def acquire(self, target: Target, keep_alive: float | None) -> Lease:
        """A lease on the target's model, loading it (and making room) first when needed."""
        began = time.monotonic()
        deadline = began + LOAD_WAIT
        counted: Resident | None = None  # the load this request is counted as waiting for
        need: memory.Need | None = None
        try:
            while True:
                with self._lock:
                    r = self._usable(target)
                    if r is not None and r.state == "ready":
                        r.busy += 1
                        r.used, r.expires, r.keep_alive = time.monotonic(), None, keep_alive
                        return Lease(self, r, target, keep_alive, time.monotonic() - began if counted else 0.0)
                    if r is None and need is not None:
                        r = self._place(target, need)
                    if r is not None and counted is not r:
                        if r.waiting >= self.queue:
                            raise _busy(f"{r.waiting} requests are already waiting for {target.key} to load")
                        r.waiting += 1
                        if counted is not None:
                            counted.waiting -= 1
                        counted = r
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _busy(f"{target.key} could not be loaded within {LOAD_WAIT:g} s (the models in memory "
                                "stayed busy)")
                if r is None and need is None:  # planned in a thread: it reads the header and asks the GPUs
                    need = await asyncio.to_thread(self._need, target)
                elif r is None:  # waiting for a busy model to become idle
                    await asyncio.sleep(min(POLL, left))
                else:
                    try:
                        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(r.future)), left)
                    except asyncio.TimeoutError:
                        continue
                    except UserError as e:
                        raise ApiError(f"cannot load {target.key}: {e}", 500, code="load_failed",
                                       kind="server_error") from None
        finally:
            if counted is not None:
                with self._lock:
                    counted.waiting -= 1

    def _need(self, target: Target) -> memory.Need:
        try:
            return memory.need(target.options, self.notify)
        except UserError as e:
            raise ApiError(f"cannot load {target.key}: {e}", 500, code="load_failed", kind="server_error") from None

    def _usable(self, target: Target) -> Resident | None:
        """The resident model for the target, unless its load settings or its file changed since it was loaded:
        then it is unloaded once idle and loaded again (a model replaced with `malhae models import --force`)."""
        r = self.residents.get(target.key)
        if r is None or r.pinned or r.state != "ready":
            return r
        if r.target.options == target.options and r.identity == file_identity(target.options.model):
            return r
        if r.busy:
            return r  # in use: it goes on serving what it loaded; reloaded once idle
        self._unload(r)
        return None

    def busy(self, key: str) -> bool:
        """Whether requests are running on (or waiting for) that model."""
        with self._lock:
            r = self.residents.get(key)
            return r is not None and (r.busy > 0 or r.state == "loading")

    def drop_stale(self, key: str) -> None:
        """A name that no longer resolves (its file removed or broken): its loaded model goes once idle, as
        `_usable` does for a changed file."""
        with self._lock:
            r = self.residents.get(key)
            if r is not None and r.idle and r.identity != file_identity(r.target.options.model):
                self._unload(r)

    def _release(self, r: Resident, keep_alive: float | None) -> None:
        with self._lock:
            r.busy -= 1
            r.used = time.monotonic()
            r.keep_alive = keep_alive
            if r.busy == 0 and not r.pinned:
                r.expires = None if keep_alive is None else r.used + keep_alive
                self._wake.notify()

    # --- making room -------------------------------------------------------------------------------------------

    def _place(self, target: Target, need: memory.Need) -> Resident | None:
        """Start loading the target if it fits (after unloading idle models as needed); None: wait for a busy
        model to become idle. Called holding the lock."""
        plan = memory.room(need, [(r, r.need, r.idle, r.used) for r in self.residents.values()], self.max_loaded,
                           self.max_memory)
        if plan.refused:
            raise ApiError(f"cannot load {target.key}: {plan.refused}", 507, code="insufficient_memory",
                           kind="server_error")
        if plan.wait:
            return None
        for r in plan.evict:
            self.notify(f"unloading {r.key} to make room for {target.key} ({plan.why})")
            self._unload(r)
        r = Resident(target.key, target, file_identity(target.options.model), need)
        self.residents[target.key] = r
        closing = list(self._closing)
        threading.Thread(target=self._load, args=(r, closing), name=f"malhae-load-{target.key}", daemon=True).start()
        return r

    def _start(self, fn):
        """Run fn on the starter thread (normal priority) and return what it returns."""
        return self._starter.submit(fn).result()

    def _load(self, r: Resident, closing: list[concurrent.futures.Future]) -> None:
        memory.lower_priority(LOADER_NICE)
        concurrent.futures.wait(closing)  # their memory is back before this model's planner looks at what is free
        try:
            service = self.loader(r.target, self._start)
        except BaseException as e:
            with self._lock:
                if self.residents.get(r.key) is r:
                    del self.residents[r.key]
            error = e if isinstance(e, UserError) else UserError(f"internal error ({type(e).__name__}: {e})")
            r.future.set_exception(error)
            return
        with self._lock:
            if self._stopped or self.residents.get(r.key) is not r:  # the server stopped meanwhile
                service.close()
                r.future.set_exception(UserError("the server is shutting down"))
                return
            r.service, r.state = service, "ready"
            r.need = memory.settled(r.need, service.engine.plan)  # where it went: planned before room was made
            r.expires = None if r.keep_alive is None else time.monotonic() + r.keep_alive
            self._wake.notify()
        self.notify(f"loaded {r.key} ({service.engine.where})")
        r.future.set_result(service)

    # --- unloading ---------------------------------------------------------------------------------------------

    def _unload(self, r: Resident) -> concurrent.futures.Future:
        """Take an idle model out of the table now and close it in a thread (holding the lock)."""
        del self.residents[r.key]
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._closing.append(done)

        def close() -> None:
            try:
                if r.service is not None:
                    r.service.close()
                memory.return_free()
            finally:
                with self._lock:
                    self._closing.remove(done)
                done.set_result(None)

        threading.Thread(target=close, name=f"malhae-unload-{r.key}", daemon=True).start()
        return done

    async def expire(self, key: str) -> bool:
        """keep_alive 0 with nothing to run (Ollama's unload, `malhae stop`): unload now if idle, else once its
        requests end; returns once the memory is back. False: it was not loaded."""
        with self._lock:
            r = self.residents.get(key)
            if r is None:
                return False
            if r.pinned:
                raise ApiError(f"{key} is this server's only model (started with -m) and stays loaded; start "
                               "`malhae serve` without -m to load and unload models by name", code="pinned")
            r.keep_alive = 0.0
            done = self._unload(r) if r.idle else None
            if r.state == "ready" and r.busy:
                self._wake.notify()
        if done is not None:
            await asyncio.wrap_future(done)
        return True

    def _reap(self) -> None:
        """Unload idle models whose keep_alive has run out, without waiting for a request."""
        with self._lock:
            while not self._stopped:
                now = time.monotonic()
                for r in list(self.residents.values()):
                    if r.idle and r.expires is not None and r.expires <= now:
                        self.notify(f"unloading {r.key} (idle for {units.duration_text(r.keep_alive)})")
                        self._unload(r)
                deadlines = [r.expires for r in self.residents.values() if r.idle and r.expires is not None]
                self._wake.wait(max(0.0, min(deadlines) - now) if deadlines else None)

    # --- the pinned model, listing, stopping -------------------------------------------------------------------

    def load_now(self, target: Target) -> object:
        """Load the -m model at start, in this thread; it is never unloaded (nor counted against the limits)."""
        need = memory.need(target.options, self.notify)  # for /api/ps
        service = self.loader(target)
        with self._lock:
            r = Resident(target.key, target, file_identity(target.options.model), need, pinned=True,
                         state="ready", service=service, keep_alive=None)
            r.future.set_result(service)
            self.residents[target.key] = r
        return service

    def snapshot(self) -> list[Resident]:
        with self._lock:
            return sorted(self.residents.values(), key=lambda r: -r.used)

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            residents = list(self.residents.values())
            self.residents.clear()
            self._wake.notify()
        for r in residents:
            if r.service is not None:
                r.service.close()
        self._starter.shutdown(wait=False)


def _busy(message: str) -> ApiError:
    return ApiError(f"{message}; retry shortly", 503, code="loading", kind="server_error",
                    headers={"Retry-After": "2"})
