"""LoRA adapters (issue 29) against upstream llama.cpp: interop both ways, and what an unmerged adapter costs.

    python benchmarks/build_llama_tools.py --server --lora   # once: llama-server (and llama-export-lora)
    python benchmarks/lora.py --interop [--threads 2] [--llama-server PATH] [--json FILE]
    python benchmarks/lora.py --speed [--rounds 5] [--threads 2] [--model Q4.gguf --hf HF_FOLDER] [--json FILE]

--interop, on the bundled demo model (models/malhae-demo-ko-f16.gguf), with the shipped demo adapter and random
adapters made here by PEFT on its HF checkpoint (models/demo/hf; seeded, B scaled by DEMO_B_SCALE):
  a. malhae → upstream: each adapter GGUF malhae's converter wrote is given to upstream `llama-server --lora FILE`
     (`--lora-scaled FILE:S` for a scale) and to `python -m malhae complete -m DEMO --lora FILE[:S]` on the same
     base, greedy (temperature 0, repeat penalty 1), 32 tokens; the token counts and the texts must be equal (but
     for a last character cut by the limit: malhae holds its first bytes back, llama-server prints U+FFFD). Each
     case also says whether the text differs from the base model's, i.e. whether "equal" shows the adapter applied
     alike or only that neither side's greedy text changed. The rslora case matters most: malhae folds √r into the
     file's alpha, so upstream runs it as PEFT does.
  b. upstream → malhae: upstream's convert_lora_to_gguf.py (`--base models/demo/hf --outtype f32`) converts each
     PEFT adapter (and models/demo/train_lora.py's PEFT folder, where it is in /tmp); malhae loads
     that file and its own conversion (f32) on the demo's F16 GGUF and compares Context.logits (precise: f32 K/V, no
     flash attention) over a 37-token prompt: max |Δlogit| and top-1 agreement, next to how far the adapter moves
     the logits from the base's (so that a small Δ means something). The rslora adapter's row is reported, not
     judged: upstream ignores use_rslora, so its file is expected to differ (by what √r makes of the scale).
Exit status 1 if any case differs (a: not equal; b, without rslora: max |Δ| over 1e-3 or a top-1 disagreement).

--speed, on the 1.3b-shaped Q4_K_M that `python benchmarks/decode_speed.py --shaped` builds (and its HF folder): a
random rank-16 PEFT adapter on all four linear layers of every block (init_lora_weights=False, alpha 16, seeded; made
once in --workdir from the HF folder loaded in float16 — PEFT keeps the adapter in float32 — and converted by
malhae to F16) is applied unmerged. Four setups, each started once: malhae's Engine without and with the adapter, and
llama-server (-t T -c 2048 -np 1) without and with `--lora`. Every round measures all four, in an order that rotates
each round: prompt speed (256 tokens from an empty cache, 1 generated; llama-server: timings.prompt_per_second,
cache_prompt false) and decode speed (64 tokens after a 16-token prompt, greedy, end tokens ignored;
timings.predicted_per_second). Medians over the rounds, and the per-round ratios' medians: each side's adapter cost
(with/without) and malhae against llama-server with the same adapter (goal ≥ 1.0×).

llama-server is tied to this process (malhae.children) and stopped in a finally.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import processes  # noqa: E402  benchmarks/processes.py, beside this script

from malhae import children  # noqa: E402
from malhae.convert import lora, lora_gguf  # noqa: E402
from malhae.eval import bench  # noqa: E402
from malhae.runtime.engine import Engine  # noqa: E402
from malhae.runtime.llama import Context, Model  # noqa: E402
from malhae.runtime.settings import LoadOptions, Lora  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "malhae-demo-ko-f16.gguf"
DEMO_HF = ROOT / "models" / "demo" / "hf"
DEMO_ADAPTER = ROOT / "models" / "malhae-demo-ko-lora-signoff.gguf"
SHAPED = Path("/tmp/malhae-decode-speed/polyglot-ko-1.3b-shaped-q4_k_m.gguf")  # decode_speed.py --shaped's
SHAPED_HF = SHAPED.parent / "polyglot-ko-1.3b-shaped"
UPSTREAM_CONVERT = Path("/tmp/llama-tools/llama.cpp/convert_lora_to_gguf.py")
ALL_LINEAR = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
FRAMED = ("다음은 사용자와 친절하고 정확한 한국어 인공지능 어시스턴트의 대화입니다.\n\n"  # `ask`'s base frame
          "사용자: 대통령의 임기는 몇 년인가요?\n어시스턴트:")
LOGIT_TEXT = FRAMED + " 헌법 제70조에 따라 대통령의 임기는 5년이며, 중임할 수 없습니다."
CTX = 2048
COMPLETE_PROMPT = "모든 국민은 법률이 정하는 바에 의하여"
# PEFT's random B (nn.Linear's init) moves the demo's logits by 10 and more with all linear layers adapted: every
# greedy text then degenerates into spaces, equal on both sides whatever they compute. 0.3 of it keeps the texts
# readable and still changes them (each case reports whether it did).
DEMO_B_SCALE = 0.3
# random adapters made here on the demo's HF checkpoint: name → (rank, alpha, targets, rslora); the output head is
# lm_head in transformers 5 (embed_out in 4, which matches nothing here)
RANDOM = {"r4-qkv": (4, 8, ["query_key_value"], False),
          "r8-all-linear": (8, 16, ALL_LINEAR, False),
          "r4-all-linear-head": (4, 8, [*ALL_LINEAR, "lm_head"], False),
          "r4-rslora-all-linear": (4, 8, ALL_LINEAR, True)}


def peft_adapter(hf: Path, out: Path, rank: int, alpha: float, targets: list[str], rslora: bool, seed: int = 0,
                 dtype: str = "float32", b_scale: float = 1.0) -> Path:
    """A random PEFT adapter (A and B both random: init_lora_weights=False; B times b_scale) on `hf`, saved in `out`
    once."""
    if (out / "adapter_model.safetensors").is_file():
        return out
    import peft
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)  # PEFT's call
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=getattr(torch, dtype))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                             use_rslora=rslora)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    model.save_pretrained(out)
    del model
    return out


def malhae_gguf(folder: Path, base: Path, out: Path, type_name: str) -> Path:
    if not out.is_file():
        lora_gguf.write(lora.read(folder), lora_gguf.Base.from_gguf(base), out, type_name=type_name, force=True)
    return out


def upstream_gguf(folder: Path, hf: Path, out: Path) -> Path:
    if not out.is_file():
        subprocess.run([sys.executable, str(UPSTREAM_CONVERT), "--base", str(hf), "--outtype", "f32", "--outfile",
                        str(out), str(folder)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


# --- llama-server ----------------------------------------------------------------------------------------------

class Server:
    def __init__(self, binary: Path, model: Path, threads: int, log: Path, extra: list[str] = ()):
        self.port = processes.free_port()
        cmd = [str(binary), "-m", str(model), "-t", str(threads), "-c", str(CTX), "-np", "1", "--host", "127.0.0.1",
               "--port", str(self.port), *extra]
        with open(log, "wb") as sink:
            self.proc = children.popen(cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 300:
            if self.proc.poll() is not None:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}) while loading:\n{tail}")
            try:
                if self.request("GET", "/health", None, timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"llama-server did not become healthy in 300 s (log: {log})")

    def request(self, method: str, path: str, body: dict | None, timeout: float = 600) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, json.dumps(body).encode() if body is not None else None,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        return resp.status, (json.loads(raw) if raw else {})

    def complete(self, prompt: str | list[int], n: int, ignore_eos: bool = False) -> dict:
        status, out = self.request("POST", "/completion", {
            "prompt": prompt, "n_predict": n, "temperature": 0, "repeat_penalty": 1.0, "cache_prompt": False,
            "ignore_eos": ignore_eos, "stream": False})
        if status != 200:
            raise RuntimeError(f"llama-server answered HTTP {status}: {str(out)[:300]}")
        return out

    def stop(self) -> None:
        processes.stop(self.proc)


# --- interop -----------------------------------------------------------------------------------------------------

def malhae_complete(prompt: str, loras: list[str], n: int, threads: int, home: Path) -> tuple[str, int]:
    """`python -m malhae complete` greedy, in a malhae home of its own (no config.toml lora or default model)."""
    argv = [sys.executable, "-m", "malhae", "complete", prompt, "-m", str(DEMO), "--temperature", "0",
            "--repeat-penalty", "1", "-n", str(n), "--threads", str(threads), "--json", "--no-prompt-cache"]
    for value in loras:
        argv += ["--lora", value]
    env = dict(os.environ, MALHAE_HOME=str(home))
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"malhae complete failed ({run.returncode}): {run.stderr.strip()[-400:]}")
    out = json.loads(run.stdout)
    return out["text"], out["stats"]["generated_tokens"]


def interop_a(args: argparse.Namespace, adapters: dict[str, Path], logs: Path) -> list[dict]:
    cases = [("demo signoff (shipped, f16)", DEMO_ADAPTER, 1.0, FRAMED)]
    cases += [(f"random {name} (f16)", path, 1.0, COMPLETE_PROMPT) for name, path in adapters.items()]
    cases += [(f"random {name} (f16) at 0.5", path, 0.5, COMPLETE_PROMPT) for name, path in adapters.items()
              if name == "r4-rslora-all-linear"]
    plain = {p: malhae_complete(p, [], args.n, args.threads, logs)[0] for p in {c[3] for c in cases}}
    rows = []
    for label, path, scale, prompt in cases:
        extra = ["--lora", str(path)] if scale == 1 else ["--lora-scaled", f"{path}:{scale:g}"]
        server = Server(args.llama_server, DEMO, args.threads, logs / f"server-{len(rows)}.log", extra)
        try:
            answer = server.complete(prompt, args.n)
        finally:
            server.stop()
        up, up_n = answer["content"], answer["tokens_predicted"]
        ours, n = malhae_complete(prompt, [f"{path}:{scale:g}" if scale != 1 else str(path)], args.n, args.threads,
                                  logs)
        # a character cut by the token limit: malhae holds its first bytes back, llama-server prints U+FFFD
        cut = up == ours + "\ufffd"
        equal = n == up_n and (ours == up or cut)
        rows.append({"case": label, "equal": equal, "tokens": [n, up_n], "cut_character": cut,
                     "differs_from_plain": ours != plain[prompt], "malhae": ours, "llama_server": up})
        print(f"a. {label}: equal {equal} ({n}/{up_n} tokens{', last character cut' if cut else ''}), differs "
              f"from the base's text {ours != plain[prompt]}: {ours!r}", flush=True)
        if ours != up:
            print(f"   llama-server: {up!r}", flush=True)
    return rows


def interop_b(args: argparse.Namespace, folders: dict[str, Path], work: Path) -> list[dict]:
    rows = []
    with Model(DEMO) as model:
        tokens = model.tokenize(LOGIT_TEXT)
        options = LoadOptions(model=DEMO, ctx=128, threads=args.threads)
        with Context(model, options, precise=True) as ctx:
            base = ctx.logits(tokens)
        for name, folder in folders.items():
            ours = malhae_gguf(folder, DEMO, work / f"{name}-malhae-f32.gguf", "f32")
            up = upstream_gguf(folder, DEMO_HF, work / f"{name}-upstream-f32.gguf")
            got = {}
            for side, path in (("malhae", ours), ("upstream", up)):
                with Context(model, LoadOptions(model=DEMO, ctx=128, threads=args.threads, lora=(Lora(path),)),
                             precise=True) as ctx:
                    got[side] = ctx.logits(tokens)
            delta = float(np.abs(got["malhae"] - got["upstream"]).max())
            top1 = float((got["malhae"].argmax(-1) == got["upstream"].argmax(-1)).mean())
            moved = float(np.abs(got["malhae"] - base).max())
            rslora = lora.read_config(folder).rslora
            rows.append({"adapter": name, "rslora": rslora, "positions": len(tokens), "max_abs_delta": delta,
                         "top1_agreement": top1, "adapter_moves_logits_by": moved, "bytes_malhae": ours.stat().st_size,
                         "bytes_upstream": up.stat().st_size})
            print(f"b. {name}: {len(tokens)} positions, max |Δlogit| malhae vs upstream file {delta:.2e}, top-1 "
                  f"agreement {top1:.4f}; the adapter moves the logits by up to {moved:.2f}"
                  + (" (rslora: upstream writes lora_alpha as it is, not folded with √r; reported, not judged)"
                     if rslora else ""), flush=True)
    return rows


def interop(args: argparse.Namespace, logs: Path) -> dict:
    work = args.workdir / "interop"
    work.mkdir(parents=True, exist_ok=True)
    folders = {name: peft_adapter(DEMO_HF, work / name, *spec, b_scale=DEMO_B_SCALE) for name, spec in RANDOM.items()}
    adapters = {name: malhae_gguf(folder, DEMO, work / f"{name}-malhae-f16.gguf", "f16")
                for name, folder in folders.items()}
    a = interop_a(args, adapters, logs)
    trained = Path("/tmp/malhae-demo-lora")  # models/demo/train_lora.py's PEFT folder, where it was trained here
    if (trained / "adapter_model.safetensors").is_file():
        folders["demo signoff (trained)"] = trained
    b = interop_b(args, folders, work)
    ok = all(r["equal"] for r in a) and all(
        r["max_abs_delta"] <= 1e-3 and r["top1_agreement"] == 1.0 for r in b if not r["rslora"])
    return {"a": a, "b": b, "ok": ok}


# --- speed -------------------------------------------------------------------------------------------------------

def speed(args: argparse.Namespace, logs: Path) -> dict:
    folder = peft_adapter(args.hf, args.workdir / "speed-r16-all-linear", 16, 16, ALL_LINEAR, False,
                          dtype="float16")
    adapter = malhae_gguf(folder, args.model, args.workdir / "speed-r16-all-linear-f16.gguf", "f16")
    print(f"adapter: {adapter} ({adapter.stat().st_size / 2**20:.1f} MiB)", flush=True)
    setups = ("malhae", "malhae+lora", "server", "server+lora")
    engines, servers = {}, {}
    rows: list[dict[str, tuple[float, float]]] = []
    loads: list[float] = []  # the 1-minute load average as each round started: a shared machine's other work
    try:
        for name, loras in (("malhae", ()), ("malhae+lora", (Lora(adapter),))):
            engines[name] = Engine(LoadOptions(model=args.model, ctx=CTX, threads=args.threads, lora=loras))
        for name, extra in (("server", []), ("server+lora", ["--lora", str(adapter)])):
            servers[name] = Server(args.llama_server, args.model, args.threads, logs / f"{name}.log", extra)
        tokens = bench.prompt_tokens(engines["malhae"], args.prompt)
        for name in servers:  # warm-up, as run_engine warms the engine
            servers[name].complete(tokens[:16], 4, ignore_eos=True)
        for r in range(args.rounds):
            loads.append(os.getloadavg()[0])
            row = {}
            for name in setups[r % 4:] + setups[:r % 4]:
                if name in engines:
                    row[name] = bench.run_engine(engines[name], args.prompt, args.gen, 1)
                else:
                    pp = servers[name].complete(tokens, 1)["timings"]
                    tg = servers[name].complete(tokens[:16], args.gen, ignore_eos=True)["timings"]
                    if tg["predicted_n"] != args.gen or pp["prompt_n"] != args.prompt:
                        raise RuntimeError(f"{name} evaluated {pp['prompt_n']} prompt tokens and generated "
                                           f"{tg['predicted_n']}")
                    row[name] = (pp["prompt_per_second"], tg["predicted_per_second"])
            rows.append(row)
            cells = "   ".join(f"{n} pp {row[n][0]:6.1f} tg {row[n][1]:5.2f}" for n in setups)
            print(f"round {r + 1} (load {loads[-1]:.1f}): {cells}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
        for e in engines.values():
            e.close()

    def med(f) -> float:
        return statistics.median(f(row) for row in rows)

    summary = {"rounds": rows, "loads": loads, "adapter_bytes": adapter.stat().st_size,
               "median": {n: {"pp": med(lambda row, n=n: row[n][0]), "tg": med(lambda row, n=n: row[n][1])}
                          for n in setups}}
    for k, (i, what) in {"pp": (0, "prompt"), "tg": (1, "decode")}.items():
        summary[k] = {"malhae lora/plain": med(lambda row, i=i: row["malhae+lora"][i] / row["malhae"][i]),
                      "server lora/plain": med(lambda row, i=i: row["server+lora"][i] / row["server"][i]),
                      "malhae/server plain": med(lambda row, i=i: row["malhae"][i] / row["server"][i]),
                      "malhae/server lora": med(lambda row, i=i: row["malhae+lora"][i] / row["server+lora"][i])}
        print(f"{what}: " + ", ".join(f"{n} {v:.3f}" for n, v in summary[k].items()), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:5]))
    parser.add_argument("--interop", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-n", type=int, default=32, help="--interop: tokens generated (default 32)")
    parser.add_argument("--rounds", type=int, default=5, help="--speed: rounds (default 5)")
    parser.add_argument("--prompt", type=int, default=256, help="--speed: prompt tokens (default 256)")
    parser.add_argument("--gen", type=int, default=64, help="--speed: decoded tokens (default 64)")
    parser.add_argument("--model", type=Path, default=SHAPED, help=f"--speed: the base GGUF (default: {SHAPED})")
    parser.add_argument("--hf", type=Path, default=SHAPED_HF, help="--speed: its HF folder, for the PEFT adapter")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/malhae-lora-bench"))
    parser.add_argument("--llama-server", type=Path, default=Path("/tmp/llama-tools/build/bin/llama-server"))
    parser.add_argument("--json", type=Path, help="also write everything measured to this file")
    args = parser.parse_args()
    if not (args.interop or args.speed):
        parser.error("give --interop, --speed or both")
    if not args.llama_server.is_file():
        parser.error(f"no llama-server at {args.llama_server}: python benchmarks/build_llama_tools.py --server")
    if args.interop and not UPSTREAM_CONVERT.is_file():
        parser.error(f"no {UPSTREAM_CONVERT} (the llama.cpp source build_llama_tools.py unpacks)")
    if args.speed and not (args.model.is_file() and (args.hf / "config.json").is_file()):
        parser.error(f"--speed needs {args.model} and its HF folder {args.hf}: python benchmarks/decode_speed.py "
                     "--shaped --llama-bench PATH builds both")
    args.workdir.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    out: dict = {"threads": args.threads}
    if args.interop:
        out["interop"] = interop(args, logs)
    if args.speed:
        out["speed"] = speed(args, logs)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    if args.interop and not out["interop"]["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
