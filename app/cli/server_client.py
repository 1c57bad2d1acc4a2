"""`malhae ps` and `malhae stop NAME`: ask a running `malhae serve` what it has loaded, or unload a model now, as
`ollama ps` and `ollama stop` do (app/serve/client.py talks, app/serve/ps_view.py prints)."""

from __future__ import annotations

from typing import Annotated

import typer

Url = Annotated[str | None, typer.Option("--url", metavar="URL", help="The server's address (default: "
                                         "$MALHAE_ENDPOINT without its /v1, else http://127.0.0.1:8080); the key, if "
                                         "it has one: $MALHAE_API_KEY.")]


def ps(url: Url = None,
       json_out: bool = typer.Option(False, "--json", help="The server's /api/ps answer as JSON.")) -> None:
    """List the models a running `malhae serve` has loaded: size, CPU/GPU, context, busy slots, until when."""
    from malhae.serve import client, ps_view

    where = client.server_url(url)
    ps_view.models(where, client.ps(where), json_out)


def stop(name: str = typer.Argument(..., metavar="NAME", help="A model as `malhae ps` lists it."),
         url: Url = None) -> None:
    """Unload a model from a running `malhae serve` now; the next request that names it loads it again."""
    from malhae.serve import client, ps_view

    ps_view.stopped(name, client.stop(client.server_url(url), name))
