"""`malhae info` on the terminal: the file's facts, its tensor types, and the memory plan (or all of it as JSON)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from malhae import units
from malhae.store.info import AdapterFacts
from malhae.ui import err, json_result, out


def info_report(mi, as_json: bool = False) -> None:
    """`malhae info`: the file's facts, its tensor types, and the engine's memory plan for it."""
    if as_json:
        json_result(mi.as_dict())
        return
    if isinstance(mi, AdapterFacts):
        adapter_report(mi)
        return
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    arch = f"{mi.architecture or 'unknown'} (GGUF v{mi.gguf_version})"
    if not mi.supported:
        arch += " — malhae runs GPT-NeoX (gptneox) models only"
    facts.add_row("architecture", arch)
    facts.add_row("parameters", f"{units.params(mi.parameters)} ({mi.parameters:,})")
    facts.add_row("file", f"{units.size(mi.file_size)} ({mi.file_size:,} bytes), {mi.file_type or '?'}, "
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
    if mi.imatrix is None and _quantized(mi.file_type):
        facts.add_row("importance matrix", "none (quantized without one; see malhae convert --imatrix)")
    if mi.imatrix is not None:
        im = mi.imatrix
        how = "computed by malhae convert --imatrix auto" if im.file == "auto" else f"from {im.file or '?'}"
        sizes = ", ".join(x for x in (f"{im.chunks} chunks" if im.chunks else "",
                                      f"{im.entries} matrices" if im.entries else "") if x)
        facts.add_row("importance matrix", f"{how}, on {im.dataset or 'an unnamed text'}"
                                           + (f" ({sizes})" if sizes else ""))
    for label, value in (("name", mi.name), ("license", mi.license), ("source", mi.source)):
        if value:
            facts.add_row(label, value)
    out.print(f"[bold]{escape(mi.name or mi.path.name)}[/bold] — {escape(str(mi.path))}", soft_wrap=True)
    out.print(facts)

    mix = Table(title="tensor types")
    for col in ("type", "tensors", "bytes", "share"):
        mix.add_column(col, justify="left" if col == "type" else "right")
    for t in mi.quantization:
        mix.add_row(t.type, str(t.tensors), units.gib(t.bytes), f"{t.bytes / mi.tensor_bytes:.1%}" if mi.tensor_bytes
                    else "—")
    out.print(mix)

    m = mi.memory
    if m is None:
        return
    devices = ", ".join(_device(d) for d in m.devices) or "none"
    out.print(f"devices (as llama.cpp sees them): {escape(devices)}", soft_wrap=True)
    where = "CPU only" if not m.gpu_layers else m.where
    basis = {"auto": "--gpu-layers auto on this machine", "asked": f"--gpu-layers {m.gpu_layers}",
             "what-if": f"a GPU with {units.gib(m.free_vram or 0)} free"}[m.mode]
    out.print(f"estimated memory for context {m.n_ctx:,}, {escape(where)} ({basis}: {escape(m.reason)}):",
              soft_wrap=True)
    mem = Table()
    for col in ("", "VRAM", "RAM"):
        mem.add_column(col, justify="left" if not col else "right")

    def cell(n: int) -> str:
        return units.gib(n) if n else "—"

    mem.add_row("weights" + (f" (adapters {units.gib(m.adapters)})" if m.adapters else ""), cell(m.weights_gpu),
                cell(m.weights_cpu))
    mem.add_row(f"KV cache ({m.kv_types})", cell(m.kv_gpu), cell(m.kv_cpu))
    mem.add_row("compute buffer" if m.gpu_buffers < 2 else f"compute buffers ({m.gpu_buffers})",
                cell(m.compute * m.gpu_buffers), cell(0 if m.gpu_layers else m.compute))
    mem.add_row("GPU context" if m.gpu_buffers < 2 else f"GPU contexts ({m.gpu_buffers})", cell(m.device_context), "—")
    mem.add_row("[bold]total[/bold]", f"[bold]{cell(m.vram)}[/bold]", f"[bold]{cell(m.ram)}[/bold]")
    out.print(mem)
    if len(m.split) > 1:
        split = Table(title="split over the GPUs (llama.cpp's tensor_split)")
        for col in ("device", "layers", "needs", "free"):
            split.add_column(col, justify="left" if col == "device" else "right")
        for s in m.split:
            split.add_row(escape(f"{s.name} ({s.description})"), str(s.layers), units.gib(s.bytes), units.gib(s.free))
        out.print(split)
    if m.note:
        err.print(f"[dim]malhae: {escape(m.note)}[/dim]", soft_wrap=True)


def adapter_report(a: AdapterFacts) -> None:
    """`malhae info ADAPTER`: what it adapts and how strongly, what it was trained on, and where it can run."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("kind", "LoRA adapter (applied on top of its base model with --lora; never run alone)")
    facts.add_row("file", f"{units.size(a.file_size)} ({a.file_size:,} bytes), {a.tensor_type}, "
                          f"{units.params(a.parameters)} parameters")
    rslora = " (rslora: alpha/√r)" if a.rslora else ""
    facts.add_row("rank", f"{a.rank}, alpha {a.alpha:g}{rslora}: B·A is scaled by {a.scale:g} at --lora "
                          f"{a.path.stem}:1")
    facts.add_row("targets", f"{', '.join(a.targets)} in {a.layers} layers")
    facts.add_row("base", a.base or "not named in the file")
    where = ", ".join(a.bases_in_store) if a.bases_in_store else "none of the store's models"
    facts.add_row("in the store", f"fits {where}")
    if a.source:
        facts.add_row("source", a.source)
    out.print(f"[bold]{escape(a.name)}[/bold] — {escape(str(a.path))}", soft_wrap=True)
    out.print(facts)
    if a.bases_in_store:
        err.print(f"[dim]run it: malhae chat -m {escape(a.bases_in_store[0])} --lora {escape(a.path.stem)}[/dim]",
                  soft_wrap=True)


def _device(d) -> str:
    """`CUDA0 NVIDIA GeForce RTX 4090 (CUDA, 20.1 of 24.0 GiB free)`, `CPU`."""
    if d.kind == "cpu":
        return d.name
    kind = "integrated, " if d.kind == "igpu" else "unified memory, " if d.unified else ""
    return f"{d.name} {d.description} ({d.platform}, {kind}{units.gib(d.free)} of {units.gib(d.total)} free)"


def _quantized(file_type: str | None) -> bool:
    """Whether llama.cpp's quantizer made a file of this type (where an importance matrix could have been used)."""
    from malhae.convert import types

    otype = types.TYPES.get(file_type or "")
    return otype is not None and otype.direct is None
