"""`malhae pull` against a local stand-in for the Hugging Face hub: download, cache, conversion and store are real.

The stand-in is a small HTTP server answering the few endpoints huggingface_hub uses (repo info, the file tree,
resolve/<rev>/<file>), serving a polyglot-shaped checkpoint from tests/factory.py under a catalog model's hub id.
The CLI runs in a child process with HF_ENDPOINT pointing at it and HF_HOME / MALHAE_HOME in tmp_path, exactly as a
user would run it; nothing reaches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import factory
import pytest

from malhae.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
HUB_ID = "EleutherAI/polyglot-ko-1.3b"  # served with a tiny checkpoint of the same family
SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves {repo_id: folder}; records every request path so tests can see what was (not) downloaded."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str) -> dict[str, Path]:
        folder = self.repos[repo]
        return {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}

    def downloads(self) -> list[str]:
        return [path.rsplit("/", 1)[-1] for method, path in self.requests if method == "GET" and "/resolve/" in path]

    def answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self.send(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            files = self.files(repo)
            if len(parts) >= 6 and parts[4] == "tree":
                listing = [{"type": "file", "path": n, "size": p.stat().st_size, "oid": self.oid(p)}
                           for n, p in files.items()]
                return self.send(h, 200, json.dumps(listing).encode(), body=body)
            info = {"id": repo, "modelId": repo, "sha": SHA, "private": False,
                    "siblings": [{"rfilename": n} for n in files]}
            return self.send(h, 200, json.dumps(info).encode(), body=body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            files = self.files(repo) if repo in self.repos else {}
            if name not in files:
                return self.send(h, 404, b"not found", {"X-Error-Code": "EntryNotFound"})
            data = files[name].read_bytes()
            return self.send(h, 200, data, {"X-Repo-Commit": SHA, "ETag": f'"{self.oid(files[name])}"'}, body=body)
        self.send(h, 404, b"unknown endpoint")

    @staticmethod
    def oid(path: Path) -> str:
        return hashlib.sha1(path.read_bytes()).hexdigest()

    @staticmethod
    def send(h: BaseHTTPRequestHandler, code: int, data: bytes, headers: dict | None = None, body: bool = True):
        h.send_response(code)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("Content-Type", "application/json" if data[:1] in (b"{", b"[") else "application/octet-stream")
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A tiny polyglot-shaped repository as published: safetensors AND a .bin copy, a card, and files not needed."""
    folder = factory.build(tmp_path_factory.mktemp("hub") / "polyglot", factory.Spec(
        "pull", hidden=256, heads=4, ff=512, weights="safetensors", legacy_buffers=False))
    (folder / "pytorch_model.bin").write_bytes(b"pickled weights that must not be downloaded")
    (folder / "training_args.bin").write_bytes(b"not needed")
    (folder / "flax_model.msgpack").write_bytes(b"not needed")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: ko\n---\n# test card\n", encoding="utf-8")
    return folder


def run_cli(args: list[str], home: Path, endpoint: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HOME": str(home / "hf"), "HF_ENDPOINT": endpoint, "MALHAE_HOME": str(home / "malhae"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "5",
            "PYTHONPATH": str(ROOT), "NO_COLOR": "1"} | env_extra
    return subprocess.run([sys.executable, "-m", "malhae", "pull", *args], capture_output=True, text=True, env=env,
                          cwd=home, timeout=300)


def store_file(home: Path, name: str) -> Path:
    return home / "malhae" / "models" / f"{name}.gguf"


def test_pull_downloads_converts_and_adds_then_works_offline(repo, tmp_path):
    from malhae.runtime.gguf_info import read_info

    with FakeHub({HUB_ID: repo}) as hub:
        done = run_cli(["polyglot-ko-1.3b", "--type", "q4_k_m", "--name", "tiny"], tmp_path, hub.url)
        assert done.returncode == 0, done.stderr
        fetched = sorted(hub.downloads())
        assert "model.safetensors" in fetched and "config.json" in fetched and "tokenizer.json" in fetched
        assert "pytorch_model.bin" not in fetched, "safetensors are preferred over pickles"
        assert not {"training_args.bin", "flax_model.msgpack"} & set(fetched)

        info = read_info(store_file(tmp_path, "tiny"))
        assert info.metadata["general.file_type"] == 15  # MOSTLY_Q4_K_M
        assert "Q4_K" in info.type_counts()
        assert info.metadata.get("general.license") == "apache-2.0"  # read from the downloaded card
        snapshot = tmp_path / "hf" / "hub" / "models--EleutherAI--polyglot-ko-1.3b" / "snapshots" / SHA
        assert (snapshot / "model.safetensors").is_file()
        assert "tiny" in done.stdout

        # The same checkpoint again, offline: no request reaches the hub, the cache is enough.
        before = len(hub.requests)
        again = run_cli(["EleutherAI/polyglot-ko-1.3b", "--type", "q8_0", "--name", "tiny-q8"], tmp_path, hub.url,
                        HF_HUB_OFFLINE="1")
        assert again.returncode == 0, again.stderr
        assert len(hub.requests) == before
        assert read_info(store_file(tmp_path, "tiny-q8")).metadata["general.file_type"] == 7  # MOSTLY_Q8_0
        assert "hub cache (offline)" in again.stderr


def test_existing_name_is_refused_before_downloading(repo, tmp_path):
    taken = store_file(tmp_path, "mine")
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"GGUF my own model")
    with FakeHub({HUB_ID: repo}) as hub:
        done = run_cli(["polyglot-ko-1.3b", "--name", "mine"], tmp_path, hub.url)
        assert done.returncode == 2
        assert "already in the store" in done.stderr and "--force" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert hub.requests == []
    assert taken.read_bytes() == b"GGUF my own model"


def test_offline_without_cache_says_how_to_convert_a_local_copy(tmp_path):
    done = run_cli(["polyglot-ko-1.3b", "--type", "q5_k_m"], tmp_path, "http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "cannot reach the Hugging Face hub" in lines[0]
    assert "malhae convert DIR --type q5_k_m --add" in lines[0]


def test_unreachable_hub_is_one_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run_cli(["polyglot-ko-1.3b"], tmp_path, f"http://127.0.0.1:{port}")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Hugging Face hub" in lines[0], done.stderr
    assert "malhae convert DIR --type q4_k_m --add" in lines[0]


def test_unknown_repository_is_named(repo, tmp_path):
    with FakeHub({HUB_ID: repo}) as hub:
        done = run_cli(["someone/not-there"], tmp_path, hub.url)
    assert done.returncode == 2
    assert "no model someone/not-there on the hub" in done.stderr


def test_unknown_catalog_name_suggests_the_nearest():
    from malhae.store import pull

    with pytest.raises(UserError, match="did you mean polyglot-ko-1.3b"):
        pull.resolve("polyglot-ko-1.3", "q4_k_m")
    with pytest.raises(UserError, match="unknown --type"):
        pull.resolve("polyglot-ko-1.3b", "q4_k_q")


def test_resolve_names():
    from malhae.store import pull

    s = pull.resolve("KoAlpaca-Polyglot-5.8B", "q4_k_m")  # catalog names are case-insensitive
    assert (s.hub_id, s.store_name, s.entry.template) == ("beomi/KoAlpaca-Polyglot-5.8B",
                                                          "koalpaca-polyglot-5.8b-q4_k_m", "koalpaca")
    s = pull.resolve("beomi/KoAlpaca-Polyglot-12.8B", "q8_0")  # a catalog hub id
    assert s.entry is not None and s.store_name == "koalpaca-polyglot-12.8b-q8_0"
    s = pull.resolve("someone/My-NeoX", "f16", name="neo")  # any hub id
    assert (s.hub_id, s.entry, s.store_name) == ("someone/My-NeoX", None, "neo")


def test_choose_files_prefers_safetensors():
    from malhae.store.pull import choose_files

    both = ["config.json", "tokenizer.json", "README.md", ".gitattributes", "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json", "training_args.bin",
            "onnx/model.onnx"]
    assert choose_files(both) == ["config.json", "tokenizer.json", "README.md", "model-00001-of-00002.safetensors",
                                  "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    pickles = [f for f in both if "safetensors" not in f]
    assert choose_files(pickles) == ["config.json", "tokenizer.json", "README.md", "pytorch_model-00001-of-00002.bin",
                                     "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"]
    with pytest.raises(UserError, match="no model weights"):
        choose_files(["config.json", "tokenizer.json", "flax_model.msgpack"])


def test_missing_huggingface_hub_is_one_line_with_the_pip_command(monkeypatch):
    from malhae.store import pull

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # what an environment without the package sees
    with pytest.raises(UserError, match=r"pip install"):
        pull._hub()


def test_imatrix_auto_through_pull_and_refusals_before_downloading(repo, tmp_path):
    from malhae.runtime.gguf_info import read_info

    with FakeHub({HUB_ID: repo}) as hub:
        refused = run_cli(["polyglot-ko-1.3b", "--type", "iq2_xs", "--name", "x"], tmp_path, hub.url)
        assert refused.returncode == 2 and "--imatrix auto" in refused.stderr
        bad = tmp_path / "not-an-imatrix.gguf"
        bad.write_bytes(b"GGUF\x03\x00\x00\x00")
        refused = run_cli(["polyglot-ko-1.3b", "--type", "q3_k_m", "--imatrix", str(bad), "--name", "x"], tmp_path,
                          hub.url)
        assert refused.returncode == 2 and "not an importance matrix" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert hub.requests == [], "refused before anything was asked of the hub"
        done = run_cli(["polyglot-ko-1.3b", "--type", "iq2_xs", "--imatrix", "auto", "--name", "tiny-iq2"], tmp_path,
                       hub.url)
        assert done.returncode == 0, done.stderr
    info = read_info(store_file(tmp_path, "tiny-iq2"))
    assert info.metadata["general.file_type"] == 20  # MOSTLY_IQ2_XS
    assert info.metadata["quantize.imatrix.file"] == "auto"
    assert info.metadata["quantize.imatrix.dataset"].startswith("malhae-ko-calibration")


def test_pull_merges_an_adapter_before_quantizing(repo, tmp_path):
    """`pull --merge-lora`: a broken adapter is refused before the hub is asked; a good one is merged (the merged
    F32 differs from the plain pull exactly as PEFT's merge says: judged by convert --verify's comparison)."""
    pytest.importorskip("peft")
    import lora_pair

    from malhae.convert import merge, verify
    from malhae.runtime.gguf_info import read_info

    adapter = lora_pair.peft_adapter(repo, tmp_path / "my-adapter")
    with FakeHub({HUB_ID: repo}) as hub:
        refused = run_cli(["polyglot-ko-1.3b", "--merge-lora", str(tmp_path / "missing")], tmp_path, hub.url)
        assert refused.returncode == 2 and "not a directory" in refused.stderr, refused.stderr
        assert hub.requests == []
        done = run_cli(["polyglot-ko-1.3b", "--type", "f32", "--merge-lora", f"{adapter}:0.5"], tmp_path, hub.url)
        assert done.returncode == 0, done.stderr
    merged = store_file(tmp_path, "polyglot-ko-1.3b+my-adapter-f32")
    assert read_info(merged).metadata["malhae.merged_lora"] == "my-adapter:0.5"
    assert verify.verify(repo, merged, "f32", merge=[merge.Spec(adapter, 0.5)]).passed
    assert verify.verify(repo, merged, "f32").passed is False
