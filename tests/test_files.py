"""How malhae writes files: whole or not at all, through one partial-file scheme whose leftovers (a run killed
outright, kill -9) are removed by the next write into the folder, and only those; and where its files live."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from malhae import files
from malhae.convert import pipeline
from malhae.store import local


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _partial(directory, name: str, age: float):
    path = directory / name
    path.write_bytes(b"GGUF" + b"\0" * 100)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_only_old_files_of_finished_processes_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = _partial(tmp_path, f".m.gguf.{dead}.partial", 3600)
    staged = _partial(tmp_path, f".m-q4_k_m.gguf.{dead}.staged.partial", 3600)
    recent = _partial(tmp_path, f".n.gguf.{dead}.partial", 10)  # maybe another machine's write, still going
    running = _partial(tmp_path, f".o.gguf.{alive}.partial", 3600)
    mine = _partial(tmp_path, f".p.gguf.{os.getpid()}.partial", 3600)
    other = _partial(tmp_path, f"notes.{dead}.partial", 3600)  # not hidden: not one of malhae's
    assert sorted(files.sweep(tmp_path)) == sorted([stale, staged])
    assert not stale.exists() and not staged.exists()
    assert all(p.exists() for p in (recent, running, mine, other))
    assert files.sweep(tmp_path / "missing") == []


def test_a_store_import_and_a_conversion_clean_up_before_writing(tmp_path, checkpoints):
    models = tmp_path / "models"
    models.mkdir()
    killed_import = _partial(models, f".big.gguf.{_dead_pid()}.partial", 3600)
    gguf = pipeline.convert(checkpoints("tf4-st-f16"), "f16", tmp_path / "m.gguf").path
    local.open_store(models).add(gguf, "m")
    assert not killed_import.exists() and (models / "m.gguf").is_file()

    killed_convert = _partial(gguf.parent, f".m2.gguf.{_dead_pid()}.quantized.partial", 3600)
    pipeline.convert(checkpoints("tf4-st-f16"), "f16", gguf.parent / "m2.gguf")
    assert not killed_convert.exists()


def test_small_files_are_written_whole_through_the_same_scheme(tmp_path):
    """config.toml and saved chats go through files.write_text: the old file or the new one, and a leftover of a
    killed write of either is swept like a GGUF's."""
    from malhae.chat.conversation import Conversation, save
    from malhae.runtime import templates
    from malhae.store import config

    target = tmp_path / "config.toml"
    assert files.partial_path(target).name == f".config.toml.{os.getpid()}.partial"
    assert files.PARTIAL.match(files.partial_path(target, "staged").name)
    killed_config = _partial(tmp_path, f".config.toml.{_dead_pid()}.partial", 3600)
    killed_chat = _partial(tmp_path, f".chat.json.{_dead_pid()}.partial", 3600)
    config.set_default_model("m", target)
    assert not killed_config.exists() and not killed_chat.exists()
    assert config.load(target).default_model == "m"
    save(Conversation(templates.get("base")), tmp_path / "chat.json")
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_where_files_live_follows_malhae_home(tmp_path, monkeypatch):
    import platformdirs

    from malhae.chat import reader
    from malhae.store import config

    monkeypatch.setenv("MALHAE_HOME", str(tmp_path / "home"))
    assert files.data_dir() == files.config_dir() == tmp_path / "home"
    assert local.models_dir() == tmp_path / "home" / "models"
    assert config.config_path() == tmp_path / "home" / "config.toml"
    assert reader.history_path() == tmp_path / "home" / "chat_history"
    monkeypatch.delenv("MALHAE_HOME")
    assert files.data_dir() == Path(platformdirs.user_data_dir("malhae"))
    assert files.config_dir() == Path(platformdirs.user_config_dir("malhae"))


def _specials(tmp_path: Path, suffix: str = "") -> dict[str, Path]:
    """Things that are not regular files, made for real: a FIFO, a socket, a folder, a symlink to a FIFO, and (as
    root, where mknod is allowed) a character device — a private copy of /dev/null (1, 3)."""
    import socket
    import stat

    made = {"a named pipe (FIFO)": tmp_path / f"fifo{suffix}", "a socket": tmp_path / f"sock{suffix}",
            "a directory": tmp_path / f"dir{suffix}"}
    os.mkfifo(made["a named pipe (FIFO)"])
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(made["a socket"]))
    server.close()
    made["a directory"].mkdir()
    link = tmp_path / f"link{suffix}"
    link.symlink_to(made["a named pipe (FIFO)"])
    made["a named pipe (FIFO) "] = link  # the same kind, reached through a symlink
    if os.geteuid() == 0:
        device = tmp_path / f"null{suffix}"
        try:
            os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
            made["a character device"] = device
        except OSError:  # a container without CAP_MKNOD
            pass
    return made


def _unchanged(specials: dict[str, Path]) -> None:
    import stat

    for kind, path in specials.items():
        mode = path.stat().st_mode
        assert not stat.S_ISREG(mode), f"{path} ({kind}) was replaced by a regular file"


def test_writes_refuse_anything_but_a_regular_file_even_with_force(tmp_path):
    """`-o /dev/null --force`, as root, replaced the system's /dev/null with a regular file."""
    from malhae.errors import UserError

    specials = _specials(tmp_path)
    for kind, path in specials.items():
        for force in (False, True):
            with pytest.raises(UserError) as e:
                files.check_target(path, force)
            assert f"is {kind.strip()}" in str(e.value) and "\n" not in str(e.value)
        if kind != "a directory":
            with pytest.raises(OSError, match="not a regular file"):
                files.write_text(path, "x")
    _unchanged(specials)
    regular = tmp_path / "regular"
    regular.write_text("old")
    with pytest.raises(UserError, match="already exists; add --force"):
        files.check_target(regular, False)
    files.check_target(regular, True)
    files.check_target(tmp_path / "new", False)
    with pytest.raises(UserError, match="does not exist"):
        files.check_target(tmp_path / "no" / "such" / "x", True)


def test_every_command_that_writes_refuses_a_device(tmp_path, checkpoints, capsys, monkeypatch):
    """The same rule through convert -o, models import (a special file where the store's copy would go), /save and
    the settings file."""
    from malhae.chat.conversation import Conversation, save
    from malhae.cli import main
    from malhae.errors import UserError
    from malhae.runtime import templates
    from malhae.store import config, models
    from malhae.store.local import Store

    specials = _specials(tmp_path)
    src = checkpoints("tf4-st-f16")
    for kind, path in specials.items():
        assert main(["convert", str(src), "--type", "f16", "-o", str(path), "--force"]) == 2
        err = capsys.readouterr().err
        assert err.count("malhae: error:") == 1 and kind.strip() in err
        with pytest.raises(UserError, match=re.escape(kind.strip())):
            save(Conversation(templates.get("base")), path, force=True)
        with pytest.raises(UserError, match="settings file .*" + re.escape(kind.strip())):
            config.set_default_model("x", path)
    _unchanged(specials)
    store = Store(tmp_path / "store")
    store.root.mkdir()
    in_store = _specials(store.root, ".gguf")
    for kind, path in in_store.items():
        with pytest.raises(UserError, match=re.escape(kind.strip())):
            store.check_new(path.stem, force=True)
        assert main(["--models-dir", str(store.root), "models", "import", str(models.demo_model()), "--name",
                     path.stem, "--force"]) == 2
        assert kind.strip() in capsys.readouterr().err
    _unchanged(in_store)
    assert not list(tmp_path.glob(".*.partial"))


def test_files_that_cannot_be_read_are_said_in_one_wording(tmp_path):
    """read_user_text's lines, written out: every command that reads a file the user named says these the same way."""
    from malhae.errors import UserError

    def error(path, **kw) -> str:
        with pytest.raises(UserError) as e:
            files.read_user_text(path, "text file", limit=16, **kw)
        return str(e.value)

    missing = tmp_path / "none.txt"
    with pytest.raises(files.MissingFile):  # a UserError that a caller for whom absence is normal can catch alone
        files.read_user_text(missing, "text file", limit=16)
    assert error(missing) == f"cannot read text file {missing}: it does not exist (no such file)"
    assert error(missing, fix="give another") == (f"cannot read text file {missing}: it does not exist (no such "
                                                  "file); give another")
    assert error(tmp_path) == f"cannot read text file {tmp_path}: it is a directory"
    cp949 = tmp_path / "cp949.txt"
    cp949.write_bytes("가".encode() + "헌법".encode("cp949"))
    assert error(cp949) == (f"text file {cp949} is not valid UTF-8 (byte 0xc7 at offset 3); convert it first, e.g. "
                            "iconv -f cp949 -t utf-8 (EUC-KR/CP949 files are common)")
    big = tmp_path / "big.txt"
    big.write_text("x" * 17)
    assert error(big) == f"cannot read text file {big}: it is larger than such a file can be (16 bytes)"
    assert error(big, verb="load") == f"cannot load text file {big}: it is larger than such a file can be (16 bytes)"
    fine = tmp_path / "fine.txt"
    fine.write_text("x" * 16)
    assert files.read_user_text(fine, "", limit=16) == "x" * 16


def test_a_file_without_permission_is_said_with_how_to_see_who_may_read_it(tmp_path, monkeypatch):
    """Refused at the open, as root too (who reads anything regardless of the mode)."""
    from malhae.errors import UserError

    locked = tmp_path / "locked.txt"
    locked.write_text("x")

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(UserError) as e:
        files.read_user_bytes(locked, "", limit=16, fix="give a text file")
    assert str(e.value) == f"cannot read {locked}: permission denied (ls -l {locked} shows who may read it); give a " \
                           "text file"
