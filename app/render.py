"""Rich rendering for the CLI: progress bars, tables, summaries. Status goes to stderr, results to stdout."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

_STAGES = {"reading": "reading checkpoint", "writing": "writing GGUF", "quantizing": "quantizing (llama.cpp)"}


class ConvertProgress:
    """One bar per stage, created when the stage first reports; bytes for writing, tensors for quantizing."""

    def __init__(self) -> None:
        self._progress = Progress(TextColumn("{task.description:<24}"), BarColumn(),
                                  TextColumn("{task.fields[count]}"), TimeRemainingColumn(), console=err)
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> ConvertProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, stage: str, done: int, total: int) -> None:
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(_STAGES.get(stage, stage), total=total, count="")
        if stage == "writing":
            count = f"{done / 1e9:.2f}/{total / 1e9:.2f} GB"
        elif stage == "quantizing":
            count = f"{done}/{total} tensors"
        else:
            count = f"{done}/{total} files"
        self._progress.update(self._tasks[stage], completed=done, total=total, count=count)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.0f} K"


def convert_summary(result) -> None:
    mix = ", ".join(f"{k} ×{v}" for k, v in sorted(result.tensor_types.items(), key=lambda kv: -kv[1]))
    out.print(f"wrote {result.path} — {_size(result.size)}, {result.type.upper()}, "
              f"{result.bits_per_weight:.2f} bits/weight, {_count(result.n_params)} parameters, "
              f"{result.seconds:.1f} s", soft_wrap=True)
    err.print(f"[dim]tensors: {mix}; tokenizer '{result.pre}' matches tokenizer.json on "
              f"{result.parity_texts} texts ({result.parity_tokens} tokens)[/dim]", soft_wrap=True)
    template = getattr(result, "template", None)
    if template:
        err.print(f"[dim]chat template: {template} (tokenizer.chat_template)[/dim]", soft_wrap=True)
    else:
        err.print("[dim]no chat template written: malhae does not know this model's prompt format; add "
                  "--template base|koalpaca|kullm if you do[/dim]", soft_wrap=True)


def types_table(types: dict) -> None:
    table = Table(title="malhae convert --type")
    for col in ("type", "made by", "≈ bits/weight", "about"):
        table.add_column(col)
    for t in types.values():
        made_by = "malhae (direct)" if t.direct is not None else "llama.cpp quantizer"
        table.add_row(t.name, made_by, f"{t.bpw:g}", t.about)
    out.print(table)


def verify_table(report) -> None:
    table = Table(title=f"verify {report.type.upper()} against transformers (float32)")
    for col, justify in (("prompt", "left"), ("tokens", "right"), ("max |Δ logit|", "right"),
                         ("max |logit|", "right"), ("top-1 agree", "right")):
        table.add_column(col, justify=justify)
    for r in report.rows:
        prompt = r.prompt.replace("\n", "⏎")
        table.add_row(prompt[:28] + ("…" if len(prompt) > 28 else ""), str(r.tokens), f"{r.max_abs_diff:.2e}",
                      f"{r.max_abs_logit:.2f}",
                      f"{r.top1_agree}/{r.tokens}" + (f" (+{r.near_ties} tie)" if r.near_ties else ""))
    out.print(table)
    verdict = {True: "[green]PASS[/green]", False: "[red]FAIL[/red]", None: "[yellow]INFO[/yellow]"}[report.passed]
    out.print(f"{verdict} {report.criterion}", soft_wrap=True)


def note(message: str) -> None:
    """A one-time remark about what malhae decided for the user (stderr, never mixed into the output)."""
    err.print(f"[dim]malhae: {escape(message)}[/dim]", soft_wrap=True)


def stream(run) -> None:
    """Write pieces as they come: raw text on stdout (no markup, no colour), then a dim status line on a terminal."""
    write, flush = sys.stdout.write, sys.stdout.flush
    ended_with_newline = True
    for piece in run.pieces():
        write(piece)
        flush()
        ended_with_newline = piece.endswith("\n")
    if not ended_with_newline:
        write("\n")
    flush()
    if err.is_terminal:
        s = run.stats
        err.print(f"[dim]{s.generated_tokens} tokens, {s.decode_tps:.1f} tok/s, prompt {s.prompt_tokens} tokens "
                  f"({s.prompt_tps:.0f} tok/s), first token {s.ttft * 1000:.0f} ms, stop: {s.stop_reason}[/dim]")


def json_result(data: dict) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")


def bench_table(result, engine, n_prompt: int, n_gen: int, as_json: bool) -> None:
    where = f"{engine.n_gpu_layers} GPU layers" if engine.n_gpu_layers else "CPU"
    if as_json:
        json_result(result.as_dict() | {"model": str(engine.path), "threads": engine.threads,
                                        "gpu_layers": engine.n_gpu_layers, "n_prompt": n_prompt, "n_gen": n_gen})
        return
    table = Table(title=f"{engine.path.name} — {engine.threads} threads, {where}, median of {result.runs}")
    for col in ("test", "malhae tok/s", "llama-bench tok/s", "ratio"):
        table.add_column(col, justify="right")
    for label, mine, theirs in ((f"pp{n_prompt}", result.prompt_tps, result.upstream_prompt_tps),
                                (f"tg{n_gen}", result.decode_tps, result.upstream_decode_tps)):
        table.add_row(label, f"{mine:.1f}", f"{theirs:.1f}" if theirs else "—",
                      f"{mine / theirs:.1%}" if theirs else "—")
    out.print(table)


def _bytes(n: int) -> str:
    """Binary units, as GPU memory is sold and reported (a "24 GB" card has 24 GiB)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def info_report(mi, as_json: bool = False) -> None:
    """`malhae info`: the file's facts, its tensor types, and the engine's memory plan for it."""
    if as_json:
        json_result(mi.as_dict())
        return
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    arch = f"{mi.architecture or 'unknown'} (GGUF v{mi.gguf_version})"
    if not mi.supported:
        arch += " — malhae runs GPT-NeoX (gptneox) models only"
    facts.add_row("architecture", arch)
    facts.add_row("parameters", f"{_count(mi.parameters)} ({mi.parameters:,})")
    facts.add_row("file", f"{_size(mi.file_size)} ({mi.file_size:,} bytes), {mi.file_type or '?'}, "
                          f"{mi.bits_per_weight:.2f} bits/weight")
    if mi.context_length:
        facts.add_row("context", f"{mi.context_length:,} tokens (trained)")
    if mi.n_layer:
        head_dim = f" of {mi.d_model // mi.n_head}" if mi.d_model and mi.n_head else ""
        kv = f", {mi.n_head_kv} KV heads" if mi.n_head_kv and mi.n_head_kv != mi.n_head else ""
        facts.add_row("shape", f"{mi.n_layer} layers, d_model {mi.d_model}, {mi.n_head} heads{head_dim}{kv}, "
                               f"rotary {mi.rotary_dims} dims, feed-forward {mi.d_ff}")
    tok = mi.tokenizer
    specials = ", ".join(f"{s.role} {s.id} {s.text}" for s in tok.specials) or "none"
    facts.add_row("tokenizer", f"{tok.model or '?'}, pre-tokenizer {tok.pre or '?'}, {tok.vocab_size:,} tokens "
                               f"({tok.control_tokens} control); {specials}")
    ct = mi.chat_template
    template = {"malhae": f"{ct.name} (malhae's, {ct.chars} characters of Jinja)",
                "custom": f"custom Jinja ({ct.chars} characters); ask and chat render it",
                "none": f"none in the file; ask and chat use {ct.used}"}[ct.kind]
    facts.add_row("chat template", template)
    for label, value in (("name", mi.name), ("license", mi.license), ("source", mi.source)):
        if value:
            facts.add_row(label, value)
    out.print(f"[bold]{escape(mi.name or mi.path.name)}[/bold] — {escape(str(mi.path))}", soft_wrap=True)
    out.print(facts)

    mix = Table(title="tensor types")
    for col in ("type", "tensors", "bytes", "share"):
        mix.add_column(col, justify="left" if col == "type" else "right")
    for t in mi.quantization:
        mix.add_row(t.type, str(t.tensors), _bytes(t.bytes), f"{t.bytes / mi.tensor_bytes:.1%}" if mi.tensor_bytes
                    else "—")
    out.print(mix)

    m = mi.memory
    if m is None:
        return
    where = ("CPU only" if not m.gpu_layers else "all layers on the GPU" if m.gpu_layers > m.n_layer
             else f"{m.gpu_layers} of {m.n_layer} layers on the GPU")
    basis = {"auto": "--gpu-layers auto on this machine", "asked": f"--gpu-layers {m.gpu_layers}",
             "what-if": f"a GPU with {_bytes(m.free_vram or 0)} free"}[m.mode]
    out.print(f"estimated memory for context {m.n_ctx:,}, {where} ({basis}: {m.reason}):", soft_wrap=True)
    mem = Table()
    for col in ("", "VRAM", "RAM"):
        mem.add_column(col, justify="left" if not col else "right")

    def cell(n: int) -> str:
        return _bytes(n) if n else "—"

    mem.add_row("weights", cell(m.weights_gpu), cell(m.weights_cpu))
    mem.add_row("KV cache (f16)", cell(m.kv_gpu), cell(m.kv_cpu))
    mem.add_row("compute buffer", cell(m.compute if m.gpu_layers else 0), cell(0 if m.gpu_layers else m.compute))
    mem.add_row("CUDA context", cell(m.cuda_context), "—")
    mem.add_row("[bold]total[/bold]", f"[bold]{cell(m.vram)}[/bold]", f"[bold]{cell(m.ram)}[/bold]")
    out.print(mem)
    if m.note:
        err.print(f"[dim]malhae: {escape(m.note)}[/dim]", soft_wrap=True)
