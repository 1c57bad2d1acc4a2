"""How a conversion shows itself (`malhae convert`, `malhae pull`): progress bars, the summary, --list-types, the
--verify table. Results go to stdout, progress and details to stderr."""

from __future__ import annotations

from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from malhae import units
from malhae.ui import Bars, err, out

_STAGES = {"reading": "reading checkpoint", "writing": "writing GGUF", "calibrating": "importance matrix",
           "quantizing": "quantizing (llama.cpp)"}


class ConvertProgress(Bars):
    """One bar per stage, created when the stage first reports; bytes for writing, tensors for quantizing. Started
    at the first report, so a pull or convert that stops before converting prints its one error line only."""

    def __init__(self) -> None:
        super().__init__(TextColumn("{task.description:<24}"), BarColumn(), TextColumn("{task.fields[count]}"),
                         TimeRemainingColumn(), transient=False)

    def update(self, stage: str, done: int, total: int) -> None:
        if stage == "writing":
            count = f"{units.gb(done)}/{units.size(total)}"
        elif stage == "quantizing":
            count = f"{done}/{total} tensors"
        elif stage == "calibrating":
            count = f"{done}/{total} chunks"
        else:
            count = f"{done}/{total} files"
        self.advance(stage, _STAGES.get(stage, stage), done, total, count=count)


def convert_summary(result) -> None:
    mix = ", ".join(f"{k} ×{v}" for k, v in sorted(result.tensor_types.items(), key=lambda kv: -kv[1]))
    out.print(f"wrote {result.path} — {units.size(result.size)}, {result.type.upper()}, "
              f"{result.bits_per_weight:.2f} bits/weight, {units.params(result.n_params)} parameters, "
              f"{result.seconds:.1f} s", soft_wrap=True)
    err.print(f"[dim]tensors: {mix}; tokenizer '{result.pre}' matches tokenizer.json on "
              f"{result.parity_texts} texts ({result.parity_tokens} tokens)[/dim]", soft_wrap=True)
    if getattr(result, "imatrix", None):
        how = "computed on malhae's Korean calibration text" if result.imatrix == "auto" else result.imatrix
        err.print(f"[dim]importance matrix: {how}[/dim]", soft_wrap=True)
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
        made_by += ", needs --imatrix" if t.needs_imatrix else ""
        table.add_row(t.name, made_by, f"{t.bpw:g}", t.about)
    out.print(table)


def imatrix_summary(result) -> None:
    out.print(f"wrote {result.path} — {result.entries} matrices, {result.chunks} chunks of {result.chunk_size} "
              f"tokens, {result.seconds:.1f} s", soft_wrap=True)
    err.print(f"[dim]text: {', '.join(result.datasets)} ({result.text_tokens:,} tokens); perplexity on it "
              f"{result.ppl:.3f}; use it with: malhae convert DIR --type iq3_xxs --imatrix {result.path.name}[/dim]",
              soft_wrap=True)


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


def added(entry) -> None:
    out.print(f"in the store as {entry.name}: malhae chat -m {entry.name}", markup=False, soft_wrap=True)


def adapter_summary(written, seconds: float) -> None:
    """`malhae convert ADAPTER_FOLDER`: what was written (stdout) and what llama.cpp will apply (stderr)."""
    out.print(f"wrote {written.path} — {units.size(written.size)}, LoRA adapter, rank {written.rank}, "
              f"{written.modules} modules ({', '.join(written.targets)}), {seconds:.1f} s", soft_wrap=True)
    err.print(f"[dim]alpha {written.alpha:g} (PEFT's scale × rank); run it with --lora {written.path.name}[/dim]",
              soft_wrap=True)
