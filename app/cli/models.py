"""`malhae models …` (the store, the default, the catalog), `malhae info` and `malhae recommend`."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import typer

from malhae.cli import options as o
from malhae.errors import UserError
from malhae.runtime.settings import DEFAULT_MAX_CTX

app = typer.Typer(
    # a Korean gloss goes last in a summary: rich cuts a wrapped line holding wide characters short ("th…")
    help="Your models: list, import, remove, choose the default; the catalog of the Polyglot-Ko family (모델).",
    cls=o.Group,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _models(ctx: typer.Context,
            json_out: bool = typer.Option(False, "--json", help="List the models as JSON.")) -> None:
    """List the models in the store and the built-in demo (no subcommand), or manage them."""
    if ctx.invoked_subcommand is None:
        from malhae.store import adapters, config, model_settings, models, models_view
        from malhae.store.local import open_store

        store, settings = open_store(), config.load()
        entries = store.entries()
        entries += models.builtin_entries([e.name for e in entries])
        models_view.models_table(adapters.arrange(entries), store.root, settings.default_model, settings.path,
                                 json_out, model_settings.listed(store, entries))


@app.command("import", cls=o.Command)
def models_import(
    file: Path = typer.Argument(..., help="The .gguf file to add to the store."),
    name: str | None = typer.Option(None, "--name", help="Its name in the store (default: the file's name)."),
    move: bool = typer.Option(False, "--move", help="Move the file instead of copying it."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace a model of the same name."),
) -> None:
    """Copy (or move) a GGUF file into the store, to run it by name: malhae chat -m NAME."""
    from malhae.store import models_view
    from malhae.store.local import open_store

    store = open_store()
    size = file.stat().st_size if file.is_file() else 0
    with models_view.CopyProgress(f"{'moving' if move else 'copying'} {file.name}", size) as progress:
        entry = store.add(file, name, move=move, force=force, progress=progress.update)
    models_view.added(entry, store.root)


@app.command("rm", cls=o.Command)
def models_rm(
    name: str = typer.Argument(..., help="The model's name in the store (see `malhae models`)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation (needed without a terminal)."),
) -> None:
    """Delete a model from the store (asks first)."""
    from malhae import units
    from malhae.store import models_view, removal, settings_view
    from malhae.store.local import open_store

    store = open_store()
    entry = removal.find(store, name)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"removing '{entry.name}' deletes {entry.path}; add --yes to confirm without a terminal")
        if not typer.confirm(f"delete {entry.name} ({units.size(entry.size)}, {entry.path})?", default=False):
            raise typer.Exit(1)
    done = removal.remove(store, entry)
    models_view.removed(entry)
    if done.settings_file is not None:
        settings_view.removed_with_model(entry.name, done.settings_file)
    models_view.orphans(entry, done.orphans)
    if done.default_in is not None:
        models_view.default_removed(done.default_in)


@app.command("set", cls=o.Command)
def models_set(
    name: str = typer.Argument(..., help="The model's (or a LoRA adapter's) name from `malhae models`."),
    pairs: list[str] | None = typer.Argument(None, metavar="KEY=VALUE", help="Settings to give it: ctx, threads, "
                                             "gpu_layers, device, kv_cache, flash_attn, temperature, top_p, top_k, "
                                             "min_p, max_tokens, seed, system, template, lora, keep_alive (an "
                                             "adapter: scale, sampling, system); KEY= removes one."),
    reset: bool = typer.Option(False, "--reset", help="Remove all of its settings."),
    json_out: bool = typer.Option(False, "--json", help="Print its settings as JSON."),
) -> None:
    """Give a model its own settings, used wherever it runs (serve, chat, ask); none given: show them."""
    from malhae.store import model_settings, settings_view
    from malhae.store.local import open_store

    store = open_store()
    if reset:
        if pairs:
            raise UserError("--reset removes every setting: give it without KEY=VALUE pairs")
        settings_view.reset(name.strip(), model_settings.reset(store, name))
        return
    if not pairs:
        settings_view.show(name.strip(), model_settings.read(store, name), json_out)
        return
    changes = model_settings.pairs(pairs, name.strip())
    before = model_settings.keys_in(store, name)
    after = model_settings.update(store, name, changes)
    settings_view.changed(name.strip(), before, after, changes, json_out)


@app.command("default", cls=o.Command)
def models_default(
    name: str | None = typer.Argument(None, help="A name from `malhae models` or a path to a .gguf file; none: "
                                      "show the current default."),
    clear: bool = typer.Option(False, "--clear", help="Remove the default (the bundled demo is used again)."),
) -> None:
    """Show or set the model used when --model is not given (default_model in the settings file)."""
    from malhae.store import config, models, models_view

    settings = config.load()
    if clear:
        config.set_default_model(None, settings.path)
        models_view.default_set(None, settings.path)
        return
    if name is None:
        resolved = None
        if settings.default_model:
            try:
                resolved = str(models.resolve(settings.default_model))
            except UserError as e:
                resolved = f"(not found: {e})"
        models_view.default_line(settings.default_model, settings.path, settings.exists, resolved)
        return
    value = models.default_value(name)
    config.set_default_model(value, settings.path)
    models_view.default_set(value, settings.path)


@app.command("catalog", cls=o.Command)
def models_catalog(
    json_out: bool = typer.Option(False, "--json", help="Print the catalog, sizes and picks as JSON."),
) -> None:
    """The Polyglot-Ko family: hub ids, sizes per quantization (computed) and the best type per VRAM size."""
    from malhae.store import catalog, catalog_view

    catalog_view.catalog(catalog.load(), json_out)


@o.load_flags(leave_out=("ctx", "threads", "draft", "draft_max", "no_prompt_cache"))
def info(
    load: dict[str, object],
    model: str | None = typer.Argument(None, help="GGUF file or model name (demo: the bundled demo, the default)."),
    ctx: int | None = typer.Option(None, "--ctx", help="Context for the memory estimate (default: the settings "
                                   f"file's, else the model's, at most {DEFAULT_MAX_CTX}, as the engine uses)."),
    vram: float | None = typer.Option(None, "--vram", help="Plan for a GPU with this many GiB free instead "
                                      "(what if)."),
    json_out: bool = typer.Option(False, "--json", help="Print the facts as JSON."),
) -> None:
    """Describe a GGUF: architecture, size, tensor types, tokenizer, chat template and memory needed (정보)."""
    from malhae import ui, units
    from malhae.store import info_view, models
    from malhae.store.info import describe

    options, _ = o.settings_for("info", ctx=ctx, **load)
    if vram is not None:
        units.gib_bytes("--vram", vram)  # a bad flag is refused before anything is said about the model
        # --vram plans the automatic offload on a GPU that is not here, whatever the settings file says
        options = replace(options, gpu_layers=options.gpu_layers if load["gpu_layers"] is not None else "auto",
                          device=load["device"])
    path = models.resolve(model, ui.note)
    info_view.info_report(describe(path, options, vram_gib=vram), json_out)


def recommend(
    vram: float | None = typer.Option(None, "--vram", help="GiB of free VRAM to plan for; 0 = no GPU (default: "
                                      "this machine's GPUs as llama.cpp sees them, free memory now)."),
    ram: float | None = typer.Option(None, "--ram", help="GiB of RAM to plan for without a GPU (default: this "
                                     "machine's)."),
    kv_cache: str = typer.Option("f16", "--kv-cache", metavar="TYPE", help="The KV cache type the picks count: "
                                 "f16, q8_0 (about half the memory) or q4_0 (about a quarter). The longest contexts "
                                 "are shown for all three either way."),
    json_out: bool = typer.Option(False, "--json", help="Print the picks as JSON."),
) -> None:
    """Which catalog model and quantization fit this machine, and the pull command for each (추천)."""
    from malhae.runtime.settings import parse
    from malhae.store import catalog, catalog_view
    from malhae.store import recommend as rec

    kv_cache = str(parse("kv_cache", kv_cache))
    machine = rec.machine(vram, ram)
    rows = [(e, rec.pick(e, vram_bytes=machine.vram_bytes, ram_bytes=machine.ram_bytes, gpus=machine.gpus,
                         kv_cache=kv_cache)) for e in catalog.load()]
    catalog_view.recommendation(machine, rows, json_out, kv_cache)
