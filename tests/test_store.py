"""The model store and `--model` resolution, on real GGUF files (the bundled demo, and small ones written here)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from malhae import flags
from malhae.errors import UserError
from malhae.store import config, local, models
from malhae.store.local import open_store

DEMO = models.demo_model()
pytestmark = pytest.mark.skipif(DEMO is None, reason="the bundled demo model is not built")


@pytest.fixture
def st(tmp_path) -> local.Store:
    return open_store(tmp_path / "store")


def llama_gguf(path: Path) -> Path:
    """A valid GGUF of another architecture (what a user might download for another runner)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reader_value(reader: gguf.GGUFReader, key: str):
    field = reader.fields[key]
    return field.contents()


# --- where the store is --------------------------------------------------------------------------------------

def test_models_dir_precedence(tmp_path, monkeypatch):
    import platformdirs

    monkeypatch.setenv("MALHAE_HOME", str(tmp_path / "home"))
    assert local.models_dir() == tmp_path / "home" / "models"
    monkeypatch.setattr(flags, "MODELS_DIR", tmp_path / "flag")
    assert local.models_dir() == tmp_path / "flag"
    monkeypatch.setattr(flags, "MODELS_DIR", None)
    monkeypatch.delenv("MALHAE_HOME")
    assert local.models_dir() == Path(platformdirs.user_data_dir("malhae")) / "models"


def test_open_store_creates_nothing_until_a_write(st):
    assert st.entries() == [] and st.names() == [] and not st.root.exists()
    assert st.get("anything") is None


# --- names -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "-x", "", "a b", "x\\y", "a" * 200])
def test_bad_names_are_refused(st, bad):
    with pytest.raises(UserError) as e:
        st.path_for(bad)
    assert "cannot be a model name" in str(e.value)


def test_good_names(st):
    assert st.path_for("polyglot-ko-1.3b-q4_k_m") == st.root / "polyglot-ko-1.3b-q4_k_m.gguf"
    assert st.path_for("kullm.v2.gguf") == st.root / "kullm.v2.gguf"  # the suffix is not doubled
    assert st.path_for("말해-데모") == st.root / "말해-데모.gguf"


# --- adding, listing, removing ----------------------------------------------------------------------------------

def test_listing_fields_equal_the_files_metadata(st):
    entry = st.add(DEMO, "demo")
    assert entry.path == st.root / "demo.gguf" and entry.path.read_bytes() == DEMO.read_bytes()
    [listed] = st.entries()
    assert listed == entry
    reader = gguf.GGUFReader(str(entry.path))  # read independently, with gguf-py
    assert reader_value(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16 and listed.type == "f16"
    assert listed.size == os.path.getsize(DEMO)
    assert listed.params == sum(int(t.n_elements) for t in reader.tensors)
    assert listed.source == reader_value(reader, "malhae.source")
    assert listed.architecture == reader_value(reader, "general.architecture") == "gptneox"


def test_default_name_is_the_file_stem(st, tmp_path):
    entry = st.add(DEMO)
    assert entry.name == DEMO.stem and st.names() == [DEMO.stem]


def test_hidden_partial_and_other_files_are_ignored(st):
    st.add(DEMO, "demo")
    for junk in (".demo.gguf.123.partial", ".hidden.gguf", "notes.txt", "x.gguf.partial"):
        (st.root / junk).write_bytes(b"junk")
    (st.root / "folder.gguf").mkdir()
    assert st.names() == ["demo"]


def test_a_broken_file_in_the_store_is_listed_as_unreadable(st):
    st.root.mkdir()
    (st.root / "broken.gguf").write_bytes(b"GGUF\x03\x00")
    [entry] = st.entries()
    assert entry.name == "broken" and entry.error and "not a valid GGUF" in entry.error


def test_existing_name_needs_force(st, tmp_path):
    st.add(DEMO, "demo")
    with pytest.raises(UserError) as e:
        st.add(DEMO, "demo")
    assert "already in the store" in str(e.value) and "--force" in str(e.value)
    other = llama_gguf(tmp_path / "other.gguf")
    with pytest.raises(UserError):
        st.add(other, "demo", force=True)  # force replaces, but only with a model malhae runs
    assert st.add(DEMO, "demo", force=True).name == "demo"


def test_non_gguf_and_foreign_files_are_refused(st, tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(UserError, match="is not a GGUF file"):
        st.add(text)
    with pytest.raises(UserError, match="llama model; malhae runs GPT-NeoX"):
        st.add(llama_gguf(tmp_path / "llama.gguf"))
    with pytest.raises(UserError, match="does not exist"):
        st.add(tmp_path / "missing.gguf")
    with pytest.raises(UserError, match="is a directory"):
        st.add(tmp_path)
    assert not st.root.exists()  # nothing was created for a refused file


def test_interrupted_copy_leaves_nothing(st, monkeypatch):
    monkeypatch.setattr(local, "CHUNK", 1 << 20)
    seen = []

    def interrupt(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the copy

    with pytest.raises(KeyboardInterrupt):
        st.add(DEMO, "demo", progress=interrupt)
    assert seen[-1] < os.path.getsize(DEMO)
    assert list(st.root.iterdir()) == []  # no partial file, no half model


def test_a_source_that_shrinks_mid_copy_leaves_nothing(st, tmp_path, monkeypatch):
    """The source is cut short while it is copied (another process truncating it): refused, nothing kept."""
    src = tmp_path / "src.gguf"
    shutil.copy(DEMO, src)
    monkeypatch.setattr(local, "CHUNK", 1 << 20)

    def truncate_source(done: int, total: int) -> None:
        if done == 1 << 20:
            os.truncate(src, 3 << 20)

    with pytest.raises(UserError, match="changed while it was being copied"):
        st.add(src, "demo", progress=truncate_source)
    assert list(st.root.iterdir()) == []


def test_move(st, tmp_path):
    src = tmp_path / "moved.gguf"
    shutil.copy(DEMO, src)
    entry = st.add(src, move=True)
    assert entry.name == "moved" and not src.exists() and entry.path.read_bytes() == DEMO.read_bytes()


def test_remove_and_suggestions(st):
    st.add(DEMO, "polyglot-ko-1.3b-q4_k_m")
    st.add(DEMO, "kullm-5.8b-q4_k_m")
    assert st.suggest("polyglot-ko-1.3b") == "polyglot-ko-1.3b-q4_k_m"
    assert st.suggest("zzz") is None
    with pytest.raises(UserError, match="did you mean 'kullm-5.8b-q4_k_m'"):
        st.remove("kulm-5.8b-q4_k_m")
    removed = st.remove("kullm-5.8b-q4_k_m")
    assert not removed.path.exists() and st.names() == ["polyglot-ko-1.3b-q4_k_m"]


# --- --model resolution -------------------------------------------------------------------------------------------

@pytest.fixture
def home_store(tmp_path, monkeypatch):
    """The store resolve() uses: $MALHAE_HOME/models."""
    monkeypatch.setenv("MALHAE_HOME", str(tmp_path / "home"))
    return open_store()


def test_resolve_names_and_paths(home_store, tmp_path, monkeypatch):
    home_store.add(DEMO, "demo")
    assert models.resolve("demo") == home_store.root / "demo.gguf"
    assert models.resolve("some/dir/demo") == Path("some/dir/demo")  # a separator: a path, even if missing
    assert models.resolve("demo.gguf") == Path("demo.gguf")  # .gguf: a path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_bytes(b"")  # an existing file wins over the store name
    assert models.resolve("demo") == Path("demo")


def test_unknown_name_suggests_the_nearest(home_store):
    home_store.add(DEMO, "demo-f16")
    with pytest.raises(UserError) as e:
        models.resolve("demo-f61")
    assert str(e.value) == (f"no model named 'demo-f61' in {home_store.root}; see `malhae models` "
                            "(did you mean 'demo-f16'?)")


def test_unknown_name_in_an_empty_store_says_how_to_add(home_store):
    with pytest.raises(UserError, match="the store is empty.*malhae models import"):
        models.resolve("polyglot")


def test_resolve_uses_the_settings_default_then_the_demo(home_store):
    said = []
    assert models.resolve(None, said.append) == DEMO and "bundled demo" in said[0]
    home_store.add(DEMO, "mine")
    config.set_default_model("mine")
    said.clear()
    assert models.resolve(None, said.append) == home_store.root / "mine.gguf" and said == []
    home_store.remove("mine")
    with pytest.raises(UserError) as e:
        models.resolve(None)
    assert "default_model" in str(e.value) and str(config.config_path()) in str(e.value)
    assert "malhae models default" in str(e.value)


def test_default_value_checks_names_and_paths(home_store, tmp_path):
    home_store.add(DEMO, "demo")
    assert models.default_value("demo") == "demo"
    assert models.default_value(str(DEMO)) == str(DEMO.absolute())
    with pytest.raises(UserError, match="did you mean 'demo'"):
        models.default_value("dem")
    with pytest.raises(UserError, match="does not exist"):
        models.default_value(str(tmp_path / "nope.gguf"))
