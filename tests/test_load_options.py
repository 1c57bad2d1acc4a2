"""How a model is loaded is one value (LoadOptions), built once per command: flag > config.toml > the table."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from malhae.cli import app as cli_app
from malhae.cli import options as o
from malhae.errors import UserError
from malhae.runtime.settings import SETTINGS, LoadOptions


def _flags(command_name: str, group: typer.Typer = cli_app) -> dict[str, object]:
    """A command's options as Click sees them: name → default."""
    command = typer.main.get_command(group)
    for part in command_name.split():
        command = command.commands[part]
    return {p.name: p.default for p in command.params}


@pytest.fixture
def settings_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "config.toml"
    monkeypatch.setenv("MALHAE_CONFIG", str(path))
    return path


def test_flag_beats_file_beats_table(settings_file):
    settings_file.write_text('ctx = 1024\nthreads = 3\ndraft = "off"\ndraft_max = 5\n', encoding="utf-8")
    load, _ = o.settings_for("chat", ctx=None, threads=2, gpu_layers=None, device=None, draft=None, draft_max=None)
    assert (load.ctx, load.threads, load.gpu_layers, load.device) == (1024, 2, "auto", None)
    assert (load.draft, load.draft_max, load.model) == ("off", 5, None)
    load, _ = o.settings_for("serve", ctx=64, threads=None, gpu_layers="0", device="cpu", draft="lookup",
                             draft_max=None, parallel=3)
    assert (load.ctx, load.threads, load.gpu_layers, load.device, load.parallel) == (64, 3, 0, "cpu", 3)
    assert (load.draft, load.draft_max) == ("lookup", 5)


def test_the_draft_length_default_is_the_tables(settings_file):
    assert LoadOptions().draft_max == SETTINGS["draft_max"].default == 16
    load, _ = o.settings_for("ask", draft=None, draft_max=None)
    assert (load.draft, load.draft_max) == ("lookup", 16)  # the built-in draft, the table's length
    load, _ = o.settings_for("ask", draft=None, draft_max=None, remote=True)
    assert load.draft is None  # a server decodes as it does


def test_a_command_without_a_setting_takes_none_from_the_file(settings_file):
    """bench has no --draft: it never speculates, whatever config.toml says; eval's --ctx is a window, not this."""
    settings_file.write_text('ctx = 1024\ndraft = "lookup"\n', encoding="utf-8")
    load, _ = o.settings_for("bench", threads=None, gpu_layers=None, device=None, ctx=200)
    assert (load.ctx, load.draft) == (200, None)
    load, _ = o.settings_for("eval", threads=None, gpu_layers=None, device=None)
    assert load.ctx is None


def test_given_values_are_checked_by_the_table(settings_file):
    with pytest.raises(UserError, match="--threads 0: threads must be"):
        o.settings_for("chat", threads=0)
    with pytest.raises(UserError, match="--draft-max 65"):
        o.settings_for("chat", draft=None, draft_max=65)


@pytest.mark.parametrize("name", ["chat", "ask", "complete", "serve"])
def test_every_command_that_runs_a_model_takes_every_load_flag(name):
    flags = _flags(name)
    assert set(o.LOAD_FLAGS) <= flags.keys(), sorted(flags)
    assert all(flags[k] is None for k in o.LOAD_FLAGS)  # None: not given, so config.toml and the table decide


@pytest.mark.parametrize("name", ["eval ppl", "eval compare", "eval kobest", "bench", "imatrix", "info"])
def test_measuring_commands_take_the_load_flags_they_use(name):
    flags = _flags(name)
    assert {"gpu_layers", "device"} <= flags.keys() and not {"draft", "draft_max"} & flags.keys()
    if name.startswith("eval") and name != "eval kobest":
        assert flags["ctx"] == 512  # the window, their own option


def test_the_shared_options_signature_leaves_out_what_complete_lacks():
    assert {"template", "remote_chat"} <= _flags("ask").keys()
    assert not {"template", "remote_chat"} & _flags("complete").keys()


def test_kv_tokens_are_ctx_per_sequence():
    assert LoadOptions(ctx=512, parallel=4).kv_tokens == 2048
    with pytest.raises(ValueError, match="not resolved"):
        LoadOptions().kv_tokens  # noqa: B018
