"""The prompt cache on disk: a long prompt's KV state is saved once, so the same document is never read twice.

On a laptop CPU the 5.8b shape reads about 27 tokens/s: a 4,000-token contract costs 2.5 minutes, every session, for
the same text. After the engine has evaluated at least MIN_TOKENS tokens of a prompt, it saves that sequence's state
(llama_state_seq_get_data: the K/V of every cached token) here; a later prompt that shares at least MIN_TOKENS tokens
with a saved one, from the start, restores it (the longest shared prefix wins), drops what differs and evaluates only
the rest. So `ask --file 계약서.txt` with another question, a chat's `/read` of the same file or a client resending a
long system prompt cost the new tokens only.

A state is only valid for the exact computation that made it, so the folder of an entry is named by a digest of
everything that changes the numbers: the model file's identity (size, mtime and a digest of its first bytes, which hold
the GGUF header), the K/V types, flash attention and the adapters. Its file holds the tokens it covers, the state and a
CRC of both, so a truncated, corrupt or foreign file is removed when it is found, never restored. Writes are atomic
(app.files' partial-file scheme) and happen on a thread after the answer, off the path to the first token. The folder
is bounded by a size cap (setting prompt_cache_max), the least recently used entries going first; an entry whose tokens
a newer one extends is removed at once (the newer one serves every prompt the older one would).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malhae import files
from malhae.errors import UserError
from malhae.runtime.kv import common_prefix

# What a save must beat, measured (benchmarks/prompt_cache.py, docs/benchmarks.md; 1.3b-shaped Q4_K_M, 2 cores): a
# state restores at about 1 GB/s (0.2 s for 1,024 tokens, 201 MB, read + CRC + llama_state_seq_set_data) while the
# prompt was read at 9 ms per token (9.3 s), so on a CPU restoring pays from the first tokens on. On a fast GPU it
# may not: reading the prompt again can be as quick as reading its state from disk. So a state is saved only when
# reading its tokens took at least PAYS times what restoring it is expected to take (worth_saving), and only for
# MIN_TOKENS or more, so that one-line questions and short chat turns do not fill the disk with states no one reuses.
MIN_TOKENS = 128
RESTORE_BYTES_PER_SECOND = 1e9
PAYS = 2
DEFAULT_MAX_BYTES = 4 * 2**30
MAGIC = b"MALHAEKV"
VERSION = 1
SUFFIX = ".kv"
_HEADER = struct.Struct("<8sII")  # magic, version, length of the JSON header that follows
MAX_HEADER = 1 << 16
MAX_TOKENS = 1 << 22
HEAD_BYTES = 1 << 22  # how much of the model file is digested: the GGUF header and metadata, and the first tensors


@dataclass(frozen=True)
class Entry:
    """One saved state, as its file's header says (the state itself is read only on a hit)."""

    path: Path
    tokens: tuple[int, ...]
    model: str  # the model file's name, for `malhae cache`
    state_bytes: int
    size: int  # of the file
    last_used: float  # the file's mtime, refreshed on every hit


def model_identity(path: Path) -> str:
    """Size, mtime and a digest of the first bytes of the model file: another file, or this one rewritten, differs."""
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(HEAD_BYTES))
    return f"{st.st_size}:{st.st_mtime_ns}:{digest.hexdigest()}"


def folder_for(root: Path, model_path: Path, setup: dict[str, object]) -> Path:
    """The folder of the states made with this model file and this setup (K/V types, flash attention, adapters)."""
    key = json.dumps({"model": model_identity(model_path), **setup}, sort_keys=True)
    return root / hashlib.sha256(key.encode()).hexdigest()[:24]


def _read_header(f) -> tuple[dict, tuple[int, ...], int] | None:
    """(header, tokens, where the state starts) from an open entry, or None if it is not a whole one of ours."""
    head = f.read(_HEADER.size)
    if len(head) != _HEADER.size:
        return None
    magic, version, n = _HEADER.unpack(head)
    if magic != MAGIC or version != VERSION or not 0 < n <= MAX_HEADER:
        return None
    try:
        meta = files.parse_json(f.read(n), "a prompt-cache entry")  # bounded: nesting, digits, sizes
        count = int(meta["n_tokens"])
        if not 0 < count <= MAX_TOKENS or int(meta["state_bytes"]) <= 0:
            return None
    except (UserError, ValueError, KeyError, TypeError):
        return None
    raw = f.read(4 * count)
    if len(raw) != 4 * count:
        return None
    return meta, tuple(np.frombuffer(raw, dtype="<i4").tolist()), _HEADER.size + n + 4 * count


def read_entry(path: Path) -> Entry | None:
    """An entry's header and tokens; None (and the file removed) when it is not one of ours or is cut short."""
    try:
        with open(path, "rb") as f:
            found = _read_header(f)
            st = os.fstat(f.fileno())
    except OSError:
        return None
    if found is None:
        remove(path)
        return None
    meta, tokens, start = found
    if st.st_size != start + int(meta["state_bytes"]):
        remove(path)
        return None
    return Entry(path, tokens, str(meta.get("model", "?")), int(meta["state_bytes"]), st.st_size, st.st_mtime)


def remove(path: Path) -> bool:
    """Delete an entry; False where that is not allowed (a read-only folder, a file another program holds open on
    Windows): a cache that cannot be tidied is only a cache, never a failure."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        return False
    return True


def worth_saving(evaluated: int, seconds: float, state_bytes: int) -> bool:
    """Whether `evaluated` tokens read in `seconds` are worth a state of `state_bytes` on disk (see PAYS)."""
    return evaluated >= MIN_TOKENS and seconds >= PAYS * state_bytes / RESTORE_BYTES_PER_SECOND


class PromptCache:
    """The saved states of one model and setup (`folder`), under a root bounded to `max_bytes` in all."""

    def __init__(self, root: Path, folder: Path, model_name: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root, self.folder, self.model_name, self.max_bytes = root, folder, model_name, max_bytes
        self._writer: threading.Thread | None = None

    def entries(self) -> list[Entry]:
        try:
            paths = [p for p in self.folder.iterdir() if p.suffix == SUFFIX]
        except OSError:
            return []
        return [e for e in map(read_entry, paths) if e is not None]

    def find(self, tokens: Sequence[int], at_least: int = MIN_TOKENS) -> tuple[Entry, int] | None:
        """The entry sharing the longest prefix with `tokens` (at least `at_least` tokens), and that length."""
        self.wait()  # a state still being written is found once it is complete
        best: tuple[Entry, int] | None = None
        for entry in self.entries():
            n = common_prefix(entry.tokens, tokens)
            if n >= max(at_least, 1) and (best is None or n > best[1]):
                best = (entry, n)
        return best

    def load(self, entry: Entry) -> bytearray | None:
        """The state of `entry`, checked against its CRC; None (and the file removed) if it does not match."""
        state = bytearray(entry.state_bytes)
        try:
            with open(entry.path, "rb") as f:
                found = _read_header(f)
                complete = f.readinto(state) == entry.state_bytes and not f.read(1)
        except OSError:
            return None
        if found is None or not complete or found[1] != entry.tokens:
            remove(entry.path)
            return None
        meta, tokens, _ = found
        crc = zlib.crc32(state, zlib.crc32(np.asarray(tokens, dtype="<i4").tobytes()))
        if crc != meta.get("crc32"):
            remove(entry.path)
            return None
        with contextlib.suppress(OSError):
            os.utime(entry.path)  # recently used: evicted last
        return state

    def save(self, tokens: Sequence[int], state: bytes | memoryview) -> None:
        """Write the state of `tokens` on a thread (the caller has copied it out of llama.cpp already); a state
        larger than the whole cap is not written (it would only evict everything, itself included)."""
        self.wait()
        if len(state) > self.max_bytes:
            return
        tokens = tuple(tokens)
        self._writer = threading.Thread(target=self._write, args=(tokens, state), name="prompt-cache", daemon=False)
        self._writer.start()

    def wait(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None

    def _write(self, tokens: tuple[int, ...], state: bytes | memoryview) -> None:
        """Never raises: a cache that cannot be written only costs the next run its speed."""
        raw = np.asarray(tokens, dtype="<i4").tobytes()
        meta = json.dumps({"n_tokens": len(tokens), "state_bytes": len(state), "model": self.model_name,
                           "crc32": zlib.crc32(state, zlib.crc32(raw)), "saved": time.time()})
        target = self.folder / (hashlib.sha256(raw).hexdigest()[:24] + SUFFIX)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            files.sweep(self.folder)
            with files.partial(target) as tmp:
                with open(tmp, "wb") as f:
                    f.write(_HEADER.pack(MAGIC, VERSION, len(meta.encode())))
                    f.write(meta.encode())
                    f.write(raw)
                    f.write(state)
                os.replace(tmp, target)
        except OSError:
            return
        for entry in self.entries():  # what the new state extends serves no prompt the new one does not
            if entry.path != target and len(entry.tokens) <= len(tokens) and tokens[:len(entry.tokens)] == entry.tokens:
                remove(entry.path)
        prune(self.root, self.max_bytes)


def all_entries(root: Path) -> list[Entry]:
    """Every entry under `root`, the least recently used first."""
    try:
        folders = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return []
    found = [e for folder in folders for e in PromptCache(root, folder, "").entries()]
    return sorted(found, key=lambda e: e.last_used)


def prune(root: Path, max_bytes: int) -> list[Entry]:
    """Remove the least recently used entries until the rest fit in `max_bytes`; returns what was removed."""
    entries = all_entries(root)
    total = sum(e.size for e in entries)
    removed = []
    for entry in entries:
        if total <= max_bytes:
            break
        if remove(entry.path):
            total -= entry.size
            removed.append(entry)
    return removed


def clear(root: Path, model: str | None = None) -> list[Entry]:
    """Remove every entry (or those of model files named `model`); returns what was removed."""
    removed = [e for e in all_entries(root) if (model is None or e.model == model) and remove(e.path)]
    for folder in {e.path.parent for e in removed}:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty
    return removed
