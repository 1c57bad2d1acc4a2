"""malhae's front ends on upstream llama-server (`--endpoint`) against the same front ends on the local GGUF.

    python benchmarks/build_llama_tools.py --server      # once: builds llama-server from the same llama.cpp source
    python benchmarks/remote_interop.py [-m MODEL.gguf] [-n 64] [--threads 2] [--quick] [--llama-server PATH]
        [--json FILE]

What it shows: that `complete`, `ask` and `chat --endpoint http://127.0.0.1:PORT/v1` on llama.cpp's own llama-server
answer what the same commands answer locally, greedy, token for token — malhae frames the prompt, the server
tokenizes it (/tokenize) and gets the token ids on /v1/completions with malhae's sampling fields (top_k, min_p,
repeat_penalty, repeat_last_n; app/runtime/remote.py) — and that `eval ppl --endpoint` refuses llama-server.

1. llama-server starts on the GGUF (default: the bundled demo, models/malhae-demo-ko-f16.gguf) on a free port of
   127.0.0.1 with `-c 2048 -np 1 --threads T`; the script waits for GET /health 200 (120 s at most) and stops the
   server at the end, on an error or on Ctrl-C too (terminate, then kill). Its log goes to a temporary file, whose
   tail is printed when it fails to start.
2. Every case runs `python -m malhae ...` twice as a subprocess: locally (`-m MODEL --threads T --endpoint local`, so
   neither $MALHAE_ENDPOINT nor config.toml's endpoint applies) and remotely (`--endpoint URL`, the server's only
   model). Local first, then remote; only one of them computes at a time.
   - complete, ask: `PROMPT --temperature 0 -n N --json`, compared on "text" and "stats.generated_tokens".
   - ask --remote-chat (remote side only): the question goes to /v1/chat/completions and llama-server frames it
     with the GGUF's chat template itself (its own Jinja engine); compared with the local ask as above. Only for a
     GGUF with a chat template (without one, llama-server frames chat as chatml: another prompt by design).
   - chat: the same three lines (and /exit) piped into `chat --temperature 0 -n N`; compared on stdout (the
     answers) and on the tokens of each answer, read from the status lines on stderr ("17 tokens · … · context").
   Before each remote run the server's slot is erased (`--slot-save-path`, POST /slots/0?action=erase) and its
   host-memory prompt cache is off (`--cache-ram 0`): a prompt partly reused from an earlier case is evaluated in
   other batches than the local one, and Q4_K rounds those differently (~1e-3), enough to flip a near-tie of a
   random-weight model (seen: the chat case differed from its first token until then).
   - complete with the default sampling (temperature 0.7, top_k 40, top_p 0.95, min_p 0.05, repeat_penalty 1.1)
     and `--seed 7`: reported, not judged — two servers' samplers need not draw alike at temperature > 0.
3. `python -m malhae eval ppl --endpoint URL --text models/data/ko-public-domain/bills/1809899.txt --ctx 128` must
   exit 2 with one line saying that llama-server does not return a prompt's log-probabilities.

Printed: one row per case — the command, the prompt (shortened), whether the texts are equal, the tokens local/remote
and whether they are equal, the first differing character (and about which token: the server's tokens of the common
prefix) and a note where the stop reasons or the prompt formats (ask's "template", chat's banner) differ or where
the remote count is one more (llama-server counts the end token) — then, for each case that differs, both texts
around the first difference, which chat template llama-server reports on /props (the GGUF's own, or its chatml
fallback when the GGUF has none), and the refusal check. Exit status: 0 when every greedy case is equal in text and
tokens and the refusal holds, 1 otherwise, 2 without llama-server. --quick runs one complete and one ask prompt (with
chat, the seeded run and the refusal), for a large model on a small machine (a 1.3B Q4_K_M with -n 32 on 2 cores:
under a minute on a quiet machine, about 4.5 minutes on a busy one).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

import processes  # benchmarks/processes.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "malhae-demo-ko-f16.gguf"
PPL_TEXT = ROOT / "models" / "data" / "ko-public-domain" / "bills" / "1809899.txt"
COMPLETE_PROMPTS = ["대한민국의 주권은", "모든 국민은 법률이 정하는 바에 의하여", "제1조 대한민국은"]
ASK_PROMPTS = ["대한민국의 수도는 어디인가요?", "국회의 권한은 무엇인가요?", "대통령의 임기는 몇 년인가요?"]
CHAT_LINES = ["안녕하세요. 헌법에 대해 알려 주세요.", "국민의 의무는 무엇인가요?", "법원은 어떤 일을 하나요?"]
SEED = 7
# chat's status line after each answer (stderr): "17 tokens · 1331.9 tok/s · context 38/1024"
STATUS = re.compile(r"^(\d+) tokens\b.*?context (\d+)/(\d+)", re.M)
BANNER_TEMPLATE = re.compile(r"· template (\S+)")  # chat's banner: "malhae chat · model … · template base · …"
# llama-server's chat template when the GGUF has none (llama.cpp common/chat.cpp, CHATML_TEMPLATE_SRC): /props
# reports it as "chat_template" all the same
CHATML_FALLBACK = ("{%- for message in messages -%}\n"
                   "  {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}\n"
                   "{%- endfor -%}\n"
                   "{%- if add_generation_prompt -%}\n"
                   "  {{- '<|im_start|>assistant\n' -}}\n"
                   "{%- endif -%}")


@dataclass
class Run:
    argv: list[str]
    rc: int | None = None
    text: str | None = None
    tokens: list[int] = field(default_factory=list)  # generated tokens: one number, or one per chat answer
    stop_reason: list[str] = field(default_factory=list)
    template: str | None = None  # the prompt format malhae chose (ask's "template", chat's banner)
    context_used: list[int] = field(default_factory=list)  # chat only: "context A/B"'s A after each answer
    seconds: float = 0.0
    error: str | None = None
    stderr_tail: str = ""


@dataclass
class Case:
    command: str
    prompt: str
    greedy: bool
    local: Run
    remote: Run
    text_equal: bool = False
    tokens_equal: bool = False
    first_diff: int | None = None  # character offset of the first difference in the texts
    first_diff_token: int | None = None  # about which token: the server's token count of the common prefix
    note: str = ""


# --- llama-server ----------------------------------------------------------------------------------------------

def tail(path: Path, n: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def http_json(port: int, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw) if raw else {}
        except ValueError:
            return resp.status, {}
    finally:
        conn.close()


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited ({proc.returncode}) while loading; its log ends:\n{tail(log)}")
        try:
            if http_json(port, "GET", "/health", timeout=5)[0] == 200:
                return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"llama-server did not answer /health 200 in {timeout:.0f} s; its log ends:\n{tail(log)}")



def gguf_chat_template(model: Path) -> str | None:
    """The GGUF's tokenizer.chat_template (None without one, or when the file cannot be read)."""
    try:
        import gguf

        f = gguf.GGUFReader(model).fields.get("tokenizer.chat_template")
        return f.contents() if f is not None else None
    except Exception:  # noqa: BLE001 - a report line, not a check
        return None


# --- malhae's front ends ---------------------------------------------------------------------------------------

def run_app(argv: list[str], stdin: str | None, timeout: float, chat: bool = False) -> Run:
    run = Run(argv=argv)
    env = os.environ | {"COLUMNS": "400", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "malhae", *argv], input=stdin if stdin is not None else "",
                           capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, cwd=ROOT,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        run.seconds = time.perf_counter() - t0
        run.error = f"timed out after {timeout:.0f} s"
        return run
    run.seconds = time.perf_counter() - t0
    run.rc = p.returncode
    run.stderr_tail = "\n".join(p.stderr.strip().splitlines()[-5:])
    if p.returncode != 0:
        run.error = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        return run
    if chat:
        run.text = p.stdout
        m = BANNER_TEMPLATE.search(p.stderr)
        run.template = m.group(1) if m else None
        for m in STATUS.finditer(p.stderr):
            run.tokens.append(int(m.group(1)))
            run.context_used.append(int(m.group(2)))
        return run
    try:
        out = json.loads(p.stdout)
        run.text = out["text"]
        run.tokens = [int(out["stats"]["generated_tokens"])]
        run.stop_reason = [str(out["stats"].get("stop_reason"))]
        run.template = out.get("template")
    except (ValueError, KeyError, TypeError) as e:
        run.error = f"unreadable --json output ({e}): {p.stdout[:200]!r}"
    return run


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def compare(case: Case, port: int) -> None:
    lo, re_ = case.local, case.remote
    if lo.error or re_.error or lo.text is None or re_.text is None:
        case.note = "run failed: " + "; ".join(f"{w}: {r.error}" for w, r in (("local", lo), ("remote", re_))
                                             if r.error)
        return
    case.text_equal = lo.text == re_.text
    case.tokens_equal = lo.tokens == re_.tokens
    if not case.text_equal:
        case.first_diff = common_prefix(lo.text, re_.text)
        try:
            status, data = http_json(port, "POST", "/tokenize",
                                     {"content": lo.text[:case.first_diff], "add_special": False})
            if status == 200 and isinstance(data.get("tokens"), list):
                case.first_diff_token = len(data["tokens"])
        except OSError:
            pass
    if case.text_equal and not case.tokens_equal and len(lo.tokens) == len(re_.tokens):
        plus = [r - loc for loc, r in zip(lo.tokens, re_.tokens, strict=True)]
        if set(plus) <= {0, 1} and (case.command == "chat" or lo.stop_reason == ["eos"]):
            which = "" if case.command != "chat" else " on answers " + ",".join(
                str(i + 1) for i, d in enumerate(plus) if d)
            case.note = f"remote +1{which}: llama-server counts the end token in completion_tokens"
    if lo.template != re_.template:
        case.note += ("; " if case.note else "") + f"template {lo.template} (local) vs {re_.template} (remote)"
    if lo.stop_reason != re_.stop_reason:
        case.note += ("; " if case.note else "") + (f"stop_reason {'/'.join(lo.stop_reason)} (local) vs "
                                                    f"{'/'.join(re_.stop_reason)} (remote)")


# --- the report ------------------------------------------------------------------------------------------------

def width(text: str) -> int:
    """Terminal columns: Hangul and other wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def pad(text: str, n: int) -> str:
    return text + " " * max(0, n - width(text))


def short(text: str, n: int = 30) -> str:
    text = text.replace("\n", " / ")
    if width(text) <= n:
        return text
    while width(text) > n - 1:
        text = text[:-1]
    return text + "…"


def tokens_cell(run: Run) -> str:
    return "+".join(map(str, run.tokens)) if run.tokens else "-"


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def table(cases: list[Case]) -> str:
    rows = [("command", "prompt", "text ==", "tokens local/remote", "tokens ==", "first diff", "note")]
    for c in cases:
        diff = "-" if c.first_diff is None else f"char {c.first_diff}" + (
            f" (~tok {c.first_diff_token})" if c.first_diff_token is not None else "")
        failed = c.local.error or c.remote.error
        rows.append((c.command, short(c.prompt), "ERR" if failed else yes(c.text_equal),
                     f"{tokens_cell(c.local)} / {tokens_cell(c.remote)}", "ERR" if failed else yes(c.tokens_equal),
                     diff, ("" if c.greedy else "(not judged) ") + c.note))
    widths = [max(width(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for k, r in enumerate(rows):
        cells = (pad(cell, w) for cell, w in zip(r[:-1], widths, strict=True))
        lines.append("  ".join(cells) + "  " + r[-1])
        if k == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    return "\n".join(lines)


def details(c: Case) -> str:
    out = [f"{c.command} {c.prompt!r}:"]
    for where, r in (("local ", c.local), ("remote", c.remote)):
        out.append(f"  {where} $ python -m malhae {' '.join(r.argv)}")
        if r.error:
            out.append(f"  {where} error: {r.error}")
    if c.first_diff is not None and c.local.text is not None and c.remote.text is not None:
        i = c.first_diff
        for where, r in (("local ", c.local), ("remote", c.remote)):
            out.append(f"  {where} …{r.text[max(0, i - 20):i]!r} | {r.text[i:i + 40]!r}")
    if c.local.stop_reason or c.remote.stop_reason:
        out.append(f"  stop_reason local {c.local.stop_reason} remote {c.remote.stop_reason}")
    if c.local.context_used or c.remote.context_used:
        out.append(f"  chat context used after each answer: local {c.local.context_used} "
                   f"remote {c.remote.context_used}")
    return "\n".join(out)


# --- main ------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:6]))
    parser.add_argument("-m", "--model", type=Path, default=DEMO, help="the GGUF both sides run (default: the demo)")
    parser.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens per answer (-n of every command)")
    parser.add_argument("--threads", type=int, default=2, help="threads of llama-server and of the local runs")
    parser.add_argument("--quick", action="store_true", help="one complete and one ask prompt (plus chat, the seeded "
                                                             "run and the refusal)")
    parser.add_argument("--llama-server", type=Path, default=processes.default_llama_server(),
                        help="upstream llama-server binary (default: build_llama_tools.py --server's)")
    parser.add_argument("--load-timeout", type=float, default=120, help="seconds llama-server may take to load")
    parser.add_argument("--run-timeout", type=float, default=600, help="seconds one `python -m malhae` may take")
    parser.add_argument("--json", type=Path, help="also write every case (both argvs, texts, tokens) to this file")
    args = parser.parse_args()
    model = args.model.resolve()
    if not model.is_file():
        parser.error(f"{model}: no such file")
    if not args.llama_server.is_file():
        print(f"error: no llama-server at {args.llama_server}; build it with "
              "`python benchmarks/build_llama_tools.py --server` (or pass --llama-server PATH)", file=sys.stderr)
        raise SystemExit(2)

    n, t = str(args.max_tokens), str(args.threads)
    complete_prompts = COMPLETE_PROMPTS[:1] if args.quick else COMPLETE_PROMPTS
    ask_prompts = ASK_PROMPTS[:1] if args.quick else ASK_PROMPTS
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}/v1"
    # --cache-ram 0: no prompt restored from llama-server's host-memory cache; with the slot erased before each case
    # (below), every case starts from an empty cache on both sides, as the local run does
    slot_dir = tempfile.mkdtemp(prefix="remote-interop-slots-")  # erasing a slot needs --slot-save-path
    cmd = [str(args.llama_server), "-m", str(model), "-c", "2048", "-np", "1", "--threads", t, "--cache-ram", "0",
           "--slot-save-path", slot_dir, "--host", "127.0.0.1", "--port", str(port)]
    local_opts = ["-m", str(model), "--threads", t, "--endpoint", "local"]
    remote_opts = ["--endpoint", url]

    # SIGTERM (and SIGHUP) end the run like Ctrl-C does: through the finally below, which stops the server
    def interrupted(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    fd, log_name = tempfile.mkstemp(prefix="remote-interop-llama-server-", suffix=".log")
    os.close(fd)
    log = Path(log_name)
    cases: list[Case] = []
    refusal: dict = {}
    proc = None
    props: dict = {}
    t_start = time.perf_counter()
    try:
        print(f"starting llama-server: {' '.join(cmd)}\n  log: {log}", file=sys.stderr)
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        load_s = wait_healthy(proc, port, log, args.load_timeout)
        print(f"  healthy after {load_s:.1f} s on port {port}", file=sys.stderr)
        props = http_json(port, "GET", "/props")[1]

        def case(command: str, prompt: str, argv: list[str], *, greedy: bool = True, stdin: str | None = None,
                 chat: bool = False, remote_extra: tuple[str, ...] = ()) -> None:
            lo = run_app([*argv, *local_opts], stdin, args.run_timeout, chat)
            # an earlier case's prompt left in the slot would be reused, and a prompt evaluated in other batches
            # rounds differently on Q4_K (enough to flip a near-tie of a random-weight model): start empty
            status, said = http_json(port, "POST", "/slots/0?action=erase")
            if status != 200:
                raise RuntimeError(f"llama-server did not erase its slot ({status}: {said})")
            rem = run_app([*argv, *remote_opts, *remote_extra], stdin, args.run_timeout, chat)
            c = Case(command, prompt, greedy, lo, rem)
            compare(c, port)
            cases.append(c)
            state = "ERR" if lo.error or rem.error else "equal" if c.text_equal and c.tokens_equal else "differ"
            print(f"  {command:16} {pad(short(prompt, 40), 40)} {state:6} "
                  f"tokens {tokens_cell(lo)} / {tokens_cell(rem)} ({lo.seconds:.1f} s / {rem.seconds:.1f} s)",
                  file=sys.stderr)

        greedy = ["--temperature", "0", "-n", n]
        for prompt in complete_prompts:
            case("complete", prompt, ["complete", prompt, *greedy, "--json"])
        for prompt in ask_prompts:
            case("ask", prompt, ["ask", prompt, *greedy, "--json"])
        # the server frames the question with its own template (llama-server renders the GGUF's Jinja itself)
        if gguf_chat_template(model) is not None:  # else llama-server frames it as chatml, another prompt
            case("ask --remote-chat", ask_prompts[0], ["ask", ask_prompts[0], *greedy, "--json"],
                 remote_extra=("--remote-chat",))
        case("chat", " / ".join(CHAT_LINES), ["chat", *greedy], stdin="\n".join([*CHAT_LINES, "/exit"]) + "\n",
             chat=True)
        case(f"complete seed {SEED}", COMPLETE_PROMPTS[0],
             ["complete", COMPLETE_PROMPTS[0], "--seed", str(SEED), "-n", n, "--json"], greedy=False)

        ppl = ["eval", "ppl", "--endpoint", url, "--text", str(PPL_TEXT.relative_to(ROOT)), "--ctx", "128"]
        env = os.environ | {"COLUMNS": "400", "NO_COLOR": "1"}
        p = subprocess.run([sys.executable, "-m", "malhae", *ppl], capture_output=True, text=True, encoding="utf-8",
                           errors="replace", env=env, cwd=ROOT, timeout=args.run_timeout)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        said = " ".join(lines).lower()
        refusal = {"argv": ppl, "rc": p.returncode, "stderr": p.stderr.strip(), "stdout": p.stdout.strip(),
                   "ok": p.returncode == 2 and len(lines) == 1 and "llama-server" in said
                   and "log-probabilities" in said and not p.stdout.strip()}
    except KeyboardInterrupt:
        print("interrupted: stopping llama-server", file=sys.stderr)
        raise SystemExit(130) from None
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        processes.stop(proc)
        shutil.rmtree(slot_dir, ignore_errors=True)

    judged = [c for c in cases if c.greedy]
    ok = all(c.text_equal and c.tokens_equal for c in judged) and bool(refusal.get("ok"))
    build = props.get("build_info", "")
    served = props.get("chat_template")
    own = gguf_chat_template(model)
    if not isinstance(served, str) or not served:
        template_line = "none"
    elif own is not None and served.strip() == own.strip():  # llama-server trims the template it reads
        template_line = "the GGUF's own (tokenizer.chat_template)"
    elif served == CHATML_FALLBACK and own is None:
        template_line = ("llama.cpp's chatml fallback: the GGUF has no tokenizer.chat_template; malhae does not "
                         "take it for the model's own and frames by the model's name, as it does locally")
    else:
        template_line = "not the GGUF's (a --chat-template of the server?)"
    print(f"\n{model.name} · llama-server {build} ({args.llama_server}) · -c 2048 -np 1 --threads {t} · "
          f"-n {n} · {time.perf_counter() - t_start:.0f} s\n")
    print(table(cases))
    differing = [c for c in cases if not (c.text_equal and c.tokens_equal)]
    if differing:
        print("\nwhere they differ:")
        for c in differing:
            print(details(c))
    print(f"\nllama-server's /props chat_template: {template_line}")
    print(f"\neval ppl --endpoint (llama-server): exit {refusal.get('rc')}, "
          f"{'refused as expected' if refusal.get('ok') else 'NOT the expected refusal'}")
    for line in (refusal.get("stderr") or "").splitlines():
        print(f"  {line}")
    n_eq = sum(c.text_equal and c.tokens_equal for c in judged)
    print(f"\ngreedy cases equal: {n_eq}/{len(judged)} (text and tokens); "
          f"texts equal: {sum(c.text_equal for c in judged)}/{len(judged)} → {'OK' if ok else 'FAIL'}")
    if args.json:
        out = {"model": str(model), "llama_server": str(args.llama_server), "build_info": build, "server_cmd": cmd,
               "max_tokens": args.max_tokens, "threads": args.threads, "quick": args.quick, "ok": ok,
               "server_chat_template": served,
               "gguf_chat_template": own, "cases": [asdict(c) for c in cases], "ppl_refusal": refusal}
        args.json.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
