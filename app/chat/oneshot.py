"""One-shot generation for `complete` and `ask`: where the prompt comes from, how it is framed, what comes back."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from app.chat.reader import MAX_INPUT, too_long
from app.errors import UserError
from app.runtime import templates
from app.runtime.backend import Backend, open_backend
from app.runtime.endpoint import Endpoint
from app.runtime.engine import Stats
from app.runtime.settings import Sampling


def read_prompt(arg: str | None, kind: str = "complete") -> str:
    """The argument, or standard input when the argument is `-` or absent and stdin is a pipe or file; refused
    when empty (before a model is loaded), for `ask` and `complete` alike."""
    what, example = ("question", "malhae ask '대한민국의 수도는?'") if kind == "ask" else \
        ("prompt", "malhae complete '대한민국의 주권은'")
    if arg is not None and arg != "-":
        if not arg.strip():
            raise UserError(f"the {what} is empty; give some text, e.g. {example}")
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:  # bytes the terminal's encoding could not decode arrive as lone surrogates
            raise UserError(f"the {what} is not valid UTF-8 (is the terminal set to UTF-8? `locale` shows it); "
                            "give UTF-8 text or pipe it in") from None
        return arg
    if sys.stdin is None or sys.stdin.isatty():
        raise UserError("give the prompt as an argument, or pipe it in: echo '대한민국의 주권은' | malhae complete")
    data = sys.stdin.buffer.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        raise too_long("standard input")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"standard input is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "convert it first, e.g. iconv -f cp949 -t utf-8 (EUC-KR/CP949 files are common)") from None
    text = text.removeprefix("\ufeff").rstrip("\r\n")
    if not text.strip():
        raise UserError("standard input is empty: nothing to complete")
    return text


@dataclass
class OneShot:
    engine: Backend
    kind: str
    prompt: str
    sampling: Sampling
    template: str | None = None
    stats: Stats = field(default_factory=Stats)
    messages: list[dict[str, str]] | None = None  # what the prompt was made from (ask), for --remote-chat

    def pieces(self) -> Iterator[str]:
        started = self.kind == "complete"  # an answer's leading spaces (after "어시스턴트:") are not shown
        try:
            for piece in self.engine.generate(self.prompt, self.sampling, messages=self.messages):
                if not started:
                    piece = piece.lstrip()
                    if not piece:
                        continue
                    started = True
                yield piece
        finally:
            self.stats = self.engine.stats
            self.engine.close()

    def collect(self) -> dict:
        text = "".join(self.pieces())
        out = {"model": str(getattr(self.engine, "path", self.engine.name)), "kind": self.kind,
               "template": self.template, "text": text, "stats": self.stats.as_dict()}
        if self.engine.remote:
            out["endpoint"] = self.engine.endpoint.url
        return out


def run(kind: str, text: str, target: Path | Endpoint, sampling: Sampling, *, n_ctx: int | None,
        threads: int | None, gpu_layers: str | int, template: str | None, verbose: bool, notify,
        model: str | None = None, remote_chat: bool = False) -> OneShot:
    """Open the model (a GGUF here, or `model` on an endpoint) and frame the prompt; the caller streams `pieces()`
    or `collect()`s them."""
    engine = open_backend(target, model=model, remote_chat=remote_chat, n_ctx=n_ctx, threads=threads,
                          gpu_layers=gpu_layers, verbose=verbose, notify=notify)
    messages = None
    try:
        if kind == "ask":
            tpl = templates.get(template) if template else templates.for_engine(engine)
            prompt = tpl.prompt([("user", text.strip())])
            sampling.stop = tuple(dict.fromkeys((*tpl.stop, *sampling.stop)))
            template = tpl.name
            messages = ([{"role": "system", "content": tpl.system}] if tpl.system else []) + \
                [{"role": "user", "content": text.strip()}]
        else:
            prompt = text
        engine.check_fits(len(engine.tokenize(prompt)))
    except BaseException:
        engine.close()
        raise
    return OneShot(engine, kind, prompt, sampling, template, messages=messages)
