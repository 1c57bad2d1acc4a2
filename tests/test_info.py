"""`malhae info`: every figure checked against gguf-py's own reader (the reference) or the planner's arithmetic, the
memory plan against the engine's, and every mistake in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import pytest
from helpers import one_error_line

from malhae.convert import pipeline
from malhae.errors import UserError
from malhae.runtime import offload, templates
from malhae.runtime.engine import Engine
from malhae.runtime.gguf_info import read_info
from malhae.runtime.settings import LoadOptions
from malhae.store.info import describe

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "malhae-demo-ko-f16.gguf"
GiB = 2**30


@pytest.fixture(scope="module")
def q4(k_quant_checkpoint, tmp_path_factory) -> Path:
    return pipeline.convert(k_quant_checkpoint, "q4_k_m", tmp_path_factory.mktemp("info") / "kq-q4.gguf",
                            template="kullm").path


def field(reader: gguf.GGUFReader, key: str):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[-1]).decode("utf-8")
    return f.parts[-1][0].item()


def check_against_reader(path: Path) -> None:
    mi = describe(path, LoadOptions(gpu_layers="0"))
    ref = gguf.GGUFReader(path)
    assert mi.parameters == sum(int(t.n_elements) for t in ref.tensors)
    counts, nbytes = Counter(), Counter()
    for t in ref.tensors:
        counts[t.tensor_type.name] += 1
        nbytes[t.tensor_type.name] += int(t.n_bytes)
    assert {q.type: q.tensors for q in mi.quantization} == dict(counts)
    assert {q.type: q.bytes for q in mi.quantization} == dict(nbytes)
    assert mi.tensor_bytes == sum(nbytes.values())
    assert mi.file_size == path.stat().st_size
    assert mi.context_length == field(ref, "gptneox.context_length")
    assert mi.n_layer == field(ref, "gptneox.block_count")
    assert mi.d_model == field(ref, "gptneox.embedding_length")
    assert mi.n_head == field(ref, "gptneox.attention.head_count")
    assert mi.rotary_dims == field(ref, "gptneox.rope.dimension_count")
    assert mi.file_type == gguf.LlamaFileType(field(ref, "general.file_type")).name.removeprefix("MOSTLY_").lower()
    tokens = ref.fields["tokenizer.ggml.tokens"]
    texts = [bytes(tokens.parts[i]).decode("utf-8") for i in tokens.data]
    kinds = [int(ref.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in
             ref.fields["tokenizer.ggml.token_type"].data]
    assert mi.tokenizer.vocab_size == len(texts)
    assert mi.tokenizer.control_tokens == kinds.count(int(gguf.TokenType.CONTROL))
    assert mi.tokenizer.pre == field(ref, "tokenizer.ggml.pre")
    eos = field(ref, "tokenizer.ggml.eos_token_id")
    assert [(s.id, s.text) for s in mi.tokenizer.specials if s.role == "eos"] == [(eos, texts[eos])]


def test_demo_model_facts_match_gguf_reader():
    check_against_reader(DEMO)
    mi = describe(DEMO)
    assert mi.parameters == 8_605_696
    assert mi.architecture == "gptneox" and mi.supported
    assert mi.chat_template.kind == "malhae" and mi.chat_template.name == "base"  # written in since issue 12


def test_quantized_file_facts_match_gguf_reader(q4):
    check_against_reader(q4)
    mi = describe(q4)
    assert mi.file_type == "q4_k_m" and {"Q4_K", "F32"} <= {q.type for q in mi.quantization}
    assert mi.chat_template.kind == "malhae" and mi.chat_template.name == "kullm"


def test_info_and_the_store_listing_tell_the_same_story(q4, tmp_path):
    """One reader of the metadata: name, type and source are the same in `malhae info` and `malhae models`."""
    from malhae.store.local import open_store

    entry = open_store(tmp_path / "store").add(q4, "q4")
    mi = describe(entry.path)
    ref = gguf.GGUFReader(q4)
    assert (mi.file_type, mi.source, mi.parameters) == (entry.type, entry.source, entry.params)
    assert mi.source == field(ref, "malhae.source") == "kq"  # the folder's name (a hub id when there is one)


def test_memory_is_the_planners_arithmetic(q4):
    info = read_info(q4)
    n_layer, n_embd = info.metadata["gptneox.block_count"], info.metadata["gptneox.embedding_length"]
    n_ctx = min(info.metadata["gptneox.context_length"], 4096)
    layer = [sum(t.nbytes for t in info.tensors if t.name.startswith(f"blk.{i}.")) for i in range(n_layer)]
    output = sum(t.nbytes for t in info.tensors if t.name.startswith("output"))
    total = sum(t.nbytes for t in info.tensors)
    kv_layer = 2 * n_ctx * n_embd * 2  # K and V in f16, no grouped-query heads in GPT-NeoX

    cpu = describe(q4, LoadOptions(gpu_layers="0")).memory
    assert (cpu.n_ctx, cpu.gpu_layers, cpu.weights_gpu, cpu.vram) == (n_ctx, 0, 0, 0)
    assert cpu.weights_cpu == total and cpu.kv_cpu == kv_layer * n_layer
    assert cpu.ram == total + kv_layer * n_layer + offload.model_sizes(info, n_ctx, min(512, n_ctx)).compute_bytes

    # llama.cpp offloads the output layer first, then the last repeating layers (i_gpu_start in llama-model.cpp)
    one = describe(q4, LoadOptions(gpu_layers="1", ctx=64)).memory
    assert one.weights_gpu == output and one.weights_cpu == total - output and one.kv_gpu == 0
    two = describe(q4, LoadOptions(gpu_layers="2", ctx=64)).memory
    assert two.weights_gpu == output + layer[-1] and two.weights_cpu == total - output - layer[-1]
    # llama.cpp pads each sequence's context to 256 cells (llama-context.cpp: GGML_PAD(n_ctx, 256))
    assert two.kv_gpu == 2 * 256 * n_embd * 2 and two.kv_cpu == two.kv_gpu * (n_layer - 1)

    sizes = offload.model_sizes(info, n_ctx, min(512, n_ctx))
    for free in (0, GiB // 2, 80 * GiB):  # no GPU, a small one, a big one
        mem = describe(q4, vram_gib=free / GiB).memory
        plan = offload.plan(sizes, free)
        assert mem.gpu_layers == plan.n_gpu_layers and mem.vram == plan.gpu_bytes
        assert mem.weights_gpu + mem.weights_cpu == total
    full = describe(q4, vram_gib=80).memory
    assert full.gpu_layers == n_layer + 1 and full.weights_gpu == sum(layer) + output
    assert full.vram == sum(layer) + output + kv_layer * n_layer + sizes.compute_bytes + offload.DEVICE_CONTEXT_BYTES


def test_partial_offload_split(q4):
    """Find a free-memory figure where only some layers fit; the split then follows the planner layer by layer."""
    info = read_info(q4)
    sizes = offload.model_sizes(info, 256, 256)
    overhead = offload.DEVICE_CONTEXT_BYTES + sizes.compute_bytes
    output_and_one = sizes.output_bytes + sizes.layer_bytes[-1] + sizes.kv_bytes_per_layer
    free = int((overhead + output_and_one + 1) / (1 - offload.SAFETY_FRACTION)) + 1
    mem = describe(q4, LoadOptions(ctx=256), vram_gib=free / GiB).memory
    assert mem.gpu_layers == 2 == offload.plan(sizes, free).n_gpu_layers  # the output layer and the last layer
    assert mem.weights_gpu == sizes.output_bytes + sizes.layer_bytes[-1] and mem.kv_gpu == sizes.kv_bytes_per_layer
    assert mem.vram == offload.plan(sizes, free).gpu_bytes


def test_auto_plan_and_context_are_the_engines():
    mi = describe(DEMO)
    with Engine(LoadOptions(model=DEMO)) as engine:
        assert (mi.memory.n_ctx, mi.memory.n_batch, mi.memory.gpu_layers) == (engine.n_ctx, engine.n_batch,
                                                                              engine.n_gpu_layers)
    assert describe(DEMO, LoadOptions(ctx=300)).memory.n_ctx == 300


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, cwd=ROOT, timeout=120)


def test_cli_prints_the_facts_and_json():
    text = run_cli("info", str(DEMO), "--vram", "24")
    assert text.returncode == 0, text.stderr.decode()
    out = text.stdout.decode()
    assert "8,605,696" in out and "F16" in out and "all layers on the GPU (a GPU with 24.00 GiB free" in out
    assert "GPU context" in out
    data = json.loads(run_cli("info", str(DEMO), "--json", "--ctx", "512").stdout)
    assert data["parameters"] == 8_605_696 and data["memory"]["n_ctx"] == 512
    assert data["memory"]["ram"] == describe(DEMO, LoadOptions(ctx=512)).memory.ram


def test_errors_are_one_line(tmp_path):
    assert "does not exist" in one_error_line(run_cli("info", str(tmp_path / "missing.gguf")))
    assert "is a directory" in one_error_line(run_cli("info", str(tmp_path)))
    (tmp_path / "notes.gguf").write_text("hello")
    assert "is not a GGUF file" in one_error_line(run_cli("info", str(tmp_path / "notes.gguf")))
    data = DEMO.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    assert "truncated" in one_error_line(run_cli("info", str(tmp_path / "cut.gguf")))
    assert "--gpu-layers" in one_error_line(run_cli("info", str(DEMO), "--gpu-layers", "many"))
    with pytest.raises(UserError, match="16 or more"):
        describe(DEMO, LoadOptions(ctx=8))
    with pytest.raises(UserError, match="either --vram or --gpu-layers"):
        describe(DEMO, LoadOptions(gpu_layers="2"), vram_gib=8)


def test_a_gguf_without_a_chat_template(checkpoints, tmp_path):
    plain = pipeline.convert(checkpoints("tf4-st-f16"), "f16", tmp_path / "plain.gguf").path
    ct = describe(plain).chat_template
    assert ct.kind == "none" and ct.used.startswith("base")


def test_chat_template_kinds(tmp_path):
    from test_chat_template import with_chat_template

    foreign = with_chat_template(DEMO, tmp_path / "foreign.gguf", "{{ messages[0]['content'] }}")
    ct = describe(foreign).chat_template
    assert (ct.kind, ct.name, ct.chars) == ("custom", None, len("{{ messages[0]['content'] }}"))
    ours = with_chat_template(DEMO, tmp_path / "ours.gguf", templates.get("koalpaca").chat_template)
    assert describe(ours).chat_template.name == "koalpaca"
    assert describe(ours).parameters == 8_605_696  # the copy is the same model
