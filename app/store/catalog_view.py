"""Rendering for `malhae models catalog`, `malhae recommend` and `malhae pull`: Rich tables on stdout, or JSON.

Sizes are shown in GB (10^9 bytes), like `malhae models` and `malhae convert`; the VRAM columns are cards' nominal
sizes, which are GiB (an "8 GB" card has 8 × 2^30 bytes).
"""

from __future__ import annotations

import json

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from malhae import units
from malhae.store import recommend
from malhae.store.catalog import QUALITY_ORDER, Entry, drafts_for
from malhae.ui import err, out


def _console() -> Console:
    """stdout; when it is a pipe or file, wide enough that no table row wraps (Rich would assume 80 columns)."""
    return out if out.is_terminal else Console(highlight=False, width=160)


def _table() -> Table:
    return Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1))


def _titled(console: Console, title: str, table: Table) -> None:
    """A table under its title, the title a line of its own: as Table(title=…) it was wrapped to the table's width,
    mid-phrase ("(at most q4_k_m, for" / "decode speed)") when the table is narrower than the title."""
    console.print(Text(title, style="table.title"))
    console.print(table)


def catalog(entries: tuple[Entry, ...], as_json: bool) -> None:
    if as_json:
        data = [e.as_dict() | {"picks": recommend.table(e),
                               "draft_models": [d.name for d in drafts_for(e, entries)]} for e in entries]
        out.print_json(json.dumps({"models": data, "quality_order": list(QUALITY_ORDER),
                                   "ram_fraction": recommend.RAM_FRACTION}, ensure_ascii=False))
        return
    about = _table()
    for col in ("name", "params", "template", "draft with", "license", "hub id"):  # the long ones wrap, not vanish
        about.add_column(col, justify="right" if col == "params" else "left",
                         no_wrap=col in ("name", "params", "template", "license"), overflow="fold")
    for e in entries:
        drafts = drafts_for(e, entries)
        about.add_row(e.name, units.params(e.parameters), e.template, drafts[0].name if drafts else "-", e.license,
                      e.hub_id)
    console = _console()
    _titled(console, "Polyglot-Ko catalog: malhae pull NAME --type TYPE", about)

    sizes = _table()
    sizes.add_column("name", overflow="fold")  # folded on a narrow terminal, so that every type's column shows
    for t in QUALITY_ORDER:
        sizes.add_column(t, justify="right", no_wrap=True)
    for e in entries:
        sizes.add_row(e.name, *(units.gb(e.sizes[t].total) for t in QUALITY_ORDER))
    _titled(console, "Tensor bytes per type, GB (a file adds ~1 MB of metadata)", sizes)

    picks = {e.name: recommend.table(e) for e in entries}
    columns = list(next(iter(picks.values()))) if picks else []
    for title, cols in (("Best type fully on a GPU with N GB of VRAM (context 2048)",
                         [c for c in columns if not c.startswith("RAM")]),
                        (f"Best type without a GPU in ≤ {recommend.RAM_FRACTION:.0%} of N GB of RAM (at most "
                         f"{recommend.RAM_CEILING}: speed)",
                         [c for c in columns if c.startswith("RAM")])):
        table = _table()
        table.add_column("name", no_wrap=True)
        for c in cols:
            table.add_column(c.removeprefix("RAM "), justify="center", no_wrap=True)
        for e in entries:
            table.add_row(e.name, *(picks[e.name][c] or "-" for c in cols))
        _titled(console, title, table)
    err.print("[dim]- : no type fits fully; a partial GPU offload still runs (`malhae recommend --vram GB` says how "
              "many layers fit). Sizes: python benchmarks/catalog_sizes.py[/dim]", soft_wrap=True)


def recommendation(machine: recommend.Machine, rows: list[tuple[Entry, recommend.Pick]], as_json: bool,
                   kv_cache: str = "f16") -> None:
    if as_json:
        speeds = recommend.CPU_DECODE_AT_DEPTH
        data = {"vram_bytes": machine.vram_bytes, "ram_bytes": machine.ram_bytes, "gpus": list(machine.gpu_names),
                "kv_cache": kv_cache, "cpu_decode_at_depth": {"depth": recommend.CPU_DEPTH, "tok_s": speeds},
                "devices": [d.as_dict() for d in machine.gpus], "hint": machine.hint,
                "models": [{"name": e.name, "hub_id": e.hub_id, **p.as_dict(), "pull": pull_command(e, p)}
                           for e, p in rows]}
        out.print_json(json.dumps(data, ensure_ascii=False))
        return
    integrated = bool(machine.gpus) and all(d.kind == "igpu" for d in machine.gpus)
    if machine.hint:
        err.print(f"[dim]malhae: {escape(machine.hint)}[/dim]", soft_wrap=True)
    if machine.vram_bytes:
        where = ", ".join(machine.gpu_names) or "GPU"
        source = "given" if machine.vram_given else "free now, as llama.cpp reports it"
        shared = " (integrated: used only where a pick fits entirely, else RAM)" if integrated else ""
        err.print(f"[dim]{escape(where)}{shared}: {units.gib(machine.vram_bytes)} VRAM {source}; a pick fits "
                  f"entirely on the GPU at context 2048, KV cache {kv_cache} (the offload planner's "
                  "arithmetic)[/dim]", soft_wrap=True)
    if not machine.vram_bytes or integrated:
        source = "given" if machine.ram_given else "total"
        err.print(f"[dim]{'no usable GPU; ' if not machine.vram_bytes else ''}"
                  f"{units.gib(machine.ram_bytes)} RAM {source}: a pick uses at most "
                  f"{recommend.RAM_FRACTION:.0%} of it (weights + {kv_cache} KV cache at context 2048 + compute "
                  f"buffer), and is at most {recommend.RAM_CEILING}: without a GPU every token reads all weights, so "
                  "smaller decodes faster[/dim]", soft_wrap=True)
    table = _table()
    for col in ("name", "pick", "fits", "needs", "then run"):
        table.add_column(col, justify="right" if col == "needs" else "left", no_wrap=col != "then run",
                         overflow="fold")
    for e, p in rows:
        if p.full:
            fits, needs = ("on the GPU" if p.where == "gpu" else "in RAM"), units.gib(p.needed)
        elif p.partial is not None and p.partial.n_gpu_layers:
            fits = f"partly: {p.partial.n_gpu_layers}/{p.partial.n_layer} layers"
            needs = units.gib(p.partial.gpu_bytes)
        else:
            fits, needs = "does not fit", "-"
        command = pull_command(e, p)
        table.add_row(e.name, p.type or (recommend.PARTIAL_TYPE if command else "-"), fits, needs, command or "-")
    _console().print(table)
    _longest(rows)


def _longest(rows: list[tuple[Entry, recommend.Pick]]) -> None:
    """The longest context that keeps every layer on the GPU per K/V type, and what a smaller cache costs on a CPU
    (said wherever the types are offered: it saves memory, not time)."""
    found = [(e, p.longest) for e, p in rows if p.longest is not None]
    speeds = recommend.CPU_DECODE_AT_DEPTH
    cost = (f"a smaller cache saves memory, not time: on a CPU it decodes slower at depth (q8_0 {speeds['q8_0']} "
            f"tok/s against f16's {speeds['f16']}, {recommend.CPU_DEPTH:,} tokens deep; llama-bench, 1.3b-shaped "
            "q4_k_m, 2 threads)")
    if not found:
        err.print(f"[dim]KV cache types: q8_0 takes about half of f16's memory and q4_0 about a quarter, for longer "
                  f"contexts on a GPU (`malhae recommend --vram GB` shows how long); {cost}[/dim]", soft_wrap=True)
        return
    cap = found[0][1].cap
    trained = cap // recommend.CONTEXT_CAP_FACTOR
    table = _table()
    for col in ("name", "weights", *(f"K/V {t}" for t in found[0][1].tokens)):
        table.add_column(col, justify="left" if col in ("name", "weights") else "right", no_wrap=True)
    for e, lg in found:
        table.add_row(e.name, lg.type, *(_tokens(n, cap) for n in lg.tokens.values()))
    _titled(_console(), "Longest context with every layer on the GPU, per KV cache type (--kv-cache TYPE)", table)
    err.print(f"[dim]tokens in blocks of 256, tried up to {cap:,} ({recommend.CONTEXT_CAP_FACTOR} × the trained "
              f"{trained:,}; ≥ : at least that); past {trained:,} a context serves as slots: serve --parallel N --ctx "
              f"{trained} needs N × {trained:,}. {cost[0].upper()}{cost[1:]}[/dim]",
              soft_wrap=True)


def _tokens(n: int, cap: int) -> str:
    return "-" if not n else f"≥ {n:,}" if n >= cap else f"{n:,}"


def pull_command(e: Entry, p: recommend.Pick) -> str | None:
    chosen = p.type or (recommend.PARTIAL_TYPE if p.partial is not None and p.partial.n_gpu_layers else None)
    return f"malhae pull {e.name} --type {chosen}" if chosen else None


def pulled(p) -> None:
    how = "from the hub cache (offline)" if p.offline else "downloaded into the hub cache"
    err.print(f"[dim]{escape(p.source.hub_id)}: {len(p.files)} files {how}: {escape(str(p.snapshot))}[/dim]",
              soft_wrap=True)
    out.print(f"added '{escape(p.entry.name)}' to the store ({p.entry.path}); run it: "
              f"malhae chat -m {escape(p.entry.name)}", soft_wrap=True)


def pull_starting(source, snapshot, offline: bool) -> None:
    how = "using the checkpoint in the hub cache (offline)" if offline else "downloaded"
    err.print(f"[dim]{escape(source.hub_id)}: {how}; converting to the store as '{escape(source.store_name)}'[/dim]",
              soft_wrap=True)
