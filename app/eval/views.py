"""How `malhae eval ppl`, `eval compare` and `bench` show themselves: a progress bar on stderr, the result on stdout
(a table, or JSON). KoBEST has its own (app/eval/kobest/render.py)."""

from __future__ import annotations

import math

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from malhae.runtime.kv import describe
from malhae.ui import Bars, err, json_result, out


class WindowProgress(Bars):
    """Windows evaluated, with the running value (perplexity, or mean KL) next to the bar."""

    def __init__(self, label: str, value_format: str) -> None:
        super().__init__(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[value]}"),
                         TimeElapsedColumn(), TimeRemainingColumn())
        self._format = value_format

    def update(self, done: int, total: int, value: float) -> None:
        self.advance("windows", "", done, total, value="" if math.isnan(value) else self._format.format(value))


def ppl_result(result, as_json: bool) -> None:
    if as_json:
        json_result(result.as_dict())
        return
    out.print(f"perplexity {result.ppl:.4f} ± {result.error:.4f}", soft_wrap=True)
    out.print(f"[dim]{result.model}{_lora(result.adapters)}: {result.tokens_scored:,} tokens scored in "
              f"{result.windows} windows of "
              f"{result.n_ctx} (the second half of each; {result.text_tokens:,} tokens in the text), "
              f"{result.n_seq} window{'s' if result.n_seq > 1 else ''} per batch, {result.seconds:.1f} s, "
              f"{result.tokens_per_second:,.0f} tokens/s[/dim]", soft_wrap=True)


def compare_result(result, as_json: bool) -> None:
    if as_json:
        json_result(result.as_dict())
        return
    table = Table(title=f"B against A on {result.tokens_scored:,} scored tokens ({result.windows} windows of "
                        f"{result.n_ctx})")
    table.add_column("measure")
    table.add_column("value", justify="right", overflow="fold")
    table.add_row("A", result.model_a)
    table.add_row("B", result.model_b)
    for name, types in (("A", result.kv_cache_a), ("B", result.kv_cache_b)):
        table.add_row(f"KV cache {name}", f"{describe(*types)}, flash attention {result.flash_attn}")
    if result.adapters:
        table.add_row("LoRA adapters (A and B)", ", ".join(result.adapters))
    table.add_row("mean KL(A ‖ B), nats/token", f"{result.kl_mean:.6f} ± {result.kl_error:.6f}")
    table.add_row("median / 99th percentile / max KL", f"{result.kl_median:.6f} / {result.kl_p99:.6f} / "
                  f"{result.kl_max:.6f}")
    table.add_row("top-1 agreement", f"{result.top1:.2%}")
    table.add_row("perplexity A", f"{result.ppl_a:.4f}")
    table.add_row("perplexity B", f"{result.ppl_b:.4f}")
    table.add_row("ratio B / A", f"{result.ppl_ratio:.4f}")
    out.print(table)
    err.print(f"[dim]measured in {result.seconds:.1f} s[/dim]")


def _lora(adapters: tuple[str, ...]) -> str:
    return f" + LoRA {', '.join(adapters)}" if adapters else ""


def bench_table(result, engine, n_prompt: int, n_gen: int, as_json: bool, depth: int = 0) -> None:
    """The speeds, with what was measured named: threads, devices, and the K/V types and flash attention setting,
    which both sides ran with (a q4_0 cache is slower on a CPU at depth: a number without its types misleads)."""
    where, o = engine.plan.where, engine.options
    if as_json:
        json_result(result.as_dict() | {"model": str(engine.path), "threads": o.threads,
                                        "gpu_layers": engine.n_gpu_layers, "where": where,
                                        "devices": [d.name for d in engine.plan.devices],
                                        "split": engine.plan.layers if len(engine.plan.devices) > 1 else None,
                                        "n_prompt": n_prompt, "n_gen": n_gen, "depth": depth,
                                        "kv_cache_k": o.kv_cache_k, "kv_cache_v": o.kv_cache_v,
                                        "flash_attn": o.flash_attn, "lora": [str(a) for a in o.lora]})
        return
    at = f" at depth {depth:,}" if depth else ""
    name = engine.path.name + _lora(tuple(map(str, o.lora)))
    table = Table(title=f"{name} — {o.threads} threads, {where}, K/V {describe(o.kv_cache_k, o.kv_cache_v)}"
                        f", flash attention {o.flash_attn}{at}, median of {result.runs}")
    for col in ("test", "malhae tok/s", "llama-bench tok/s", "ratio"):
        table.add_column(col, justify="right")
    for label, mine, theirs in ((f"pp{n_prompt}", result.prompt_tps, result.upstream_prompt_tps),
                                (f"tg{n_gen}", result.decode_tps, result.upstream_decode_tps)):
        table.add_row(label, f"{mine:.1f}", f"{theirs:.1f}" if theirs else "—",
                      f"{mine / theirs:.1%}" if theirs else "—")
    out.print(table)
