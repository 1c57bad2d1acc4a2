"""`malhae cache` (the prompt cache on disk: what it holds) and `malhae cache clear [MODEL]`."""

from __future__ import annotations

import typer

from malhae.cli import options as o
from malhae.errors import UserError

app = typer.Typer(
    help="The prompt cache: long prompts' evaluated state kept on disk, so a document is read once (캐시).",
    cls=o.Group,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _root():
    from malhae import files

    return files.cache_dir() / "prompt-cache"


@app.callback()
def _cache(ctx: typer.Context, json_out: bool = typer.Option(False, "--json", help="List the entries as JSON.")
           ) -> None:
    """List the prompt cache's entries (no subcommand): model, tokens, size, last used."""
    if ctx.invoked_subcommand is None:
        from malhae.runtime import prompt_cache
        from malhae.store import cache_view, config

        settings = config.load()
        cap = settings.prompt_cache_max or o.SETTINGS["prompt_cache_max"].default
        cache_view.entries(_root(), prompt_cache.all_entries(_root()), cap, settings.prompt_cache is not False,
                           json_out)


@app.command("clear", cls=o.Command)
def cache_clear(
    model: str | None = typer.Argument(None, help="Only this model's entries: a name from `malhae models` or a "
                                                  ".gguf file (default: every entry).", metavar="MODEL"),
) -> None:
    """Empty the prompt cache (or remove one model's entries); nothing else is touched."""
    from pathlib import Path

    from malhae.runtime import prompt_cache
    from malhae.store import cache_view, models

    name = None
    if model is not None:
        try:
            name = models.resolve(model).name
        except UserError:  # a model removed from the store may still have entries: match its file name
            name = Path(model).name if model.endswith(".gguf") else f"{model}.gguf"
    cache_view.cleared(prompt_cache.clear(_root(), name), model)
