"""One-shot generation for `complete` and `ask`: where the prompt comes from, how it is framed, what comes back."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from malhae import nfc
from malhae.chat import documents as docs
from malhae.chat.documents import Document
from malhae.errors import UserError
from malhae.runtime import templates
from malhae.runtime.backend import Backend, open_backend
from malhae.runtime.endpoint import Endpoint
from malhae.runtime.engine import Stats
from malhae.runtime.settings import LoadOptions, Sampling
from malhae.runtime.step import StopReason


@dataclass(frozen=True)
class Prompt:
    """What `ask`/`complete` were given: the whole text, and the documents in it (for a "too long" that says why)."""

    text: str
    documents: tuple[Document, ...] = ()


def read_prompt(arg: str | None, kind: str = "complete", paths: Sequence[Path | str] = (),
                notify: nfc.Notify | None = None) -> Prompt:
    """The prompt from the argument, standard input and --file documents, checked before a model is loaded.

    With an argument, a standard input that is a pipe or a file is a document before it (`cat 계약서.txt | malhae
    ask "요약해 주세요"`, as simonw/llm does); an empty one is none. With `-` or no argument, standard input is the
    text itself, as before. The --file documents come after standard input and before the text, in their order;
    with no argument and no pipe, they are the whole prompt. Each part is composed to NFC (app.nfc), and `notify`
    hears once per part that was not."""
    what, example = ("question", "malhae ask '대한민국의 수도는?'") if kind == "ask" else \
        ("prompt", "malhae complete '대한민국의 주권은'")
    piped = docs.piped_stdin()
    if arg is not None and arg != "-":
        if not arg.strip():
            raise UserError(f"the {what} is empty; give some text, e.g. {example}")
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:  # bytes the terminal's encoding could not decode arrive as lone surrogates
            raise UserError(f"the {what} is not valid UTF-8 (is the terminal set to UTF-8? `locale` shows it); "
                            "give UTF-8 text or pipe it in") from None
        arg = nfc.compose(arg, f"the {what}", notify)
        stdin = docs.read_stream(piped, notify=notify) if piped else ""  # not valid UTF-8: an error even so
        given = ([Document(docs.STDIN, stdin)] if stdin.strip() else []) + \
            [docs.read_document(p, notify) for p in paths]
        return Prompt(docs.join(given, arg), tuple(given))
    given = [docs.read_document(p, notify) for p in paths]
    text = docs.read_stream(piped, notify=notify) if piped else None
    if not text or not text.strip():
        if given and arg is None:  # `malhae complete --file 초안.txt`: the documents are the whole prompt
            return Prompt(docs.join(given, None), tuple(given))
        if text is None:
            raise UserError("give the prompt as an argument, or pipe it in: echo '대한민국의 주권은' | malhae "
                            "complete")
        raise UserError("standard input is empty: nothing to complete")
    return Prompt(docs.join(given, text), tuple(given))


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
        """The text as it is generated: `complete` continues the prompt (its leading space included); `ask`'s
        answer starts at its first non-space character (Sampling.answer)."""
        try:
            yield from self.engine.generate(self.prompt, self.sampling, messages=self.messages)
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


def check_complete(shot: OneShot) -> None:
    """An answer held to a schema or grammar that max_tokens (or the context) cut off is not what was asked for: one
    line on stderr and a failing exit, so that `| jq` in a script does not go on with half a JSON."""
    reason = shot.stats.stop_reason
    if shot.sampling.grammar is not None and reason in (StopReason.LENGTH, StopReason.CONTEXT):
        limit = f"--max-tokens {shot.sampling.max_tokens}" if reason is StopReason.LENGTH else "the context"
        raise UserError(f"the answer was cut off at {limit} before its {shot.sampling.grammar.what} was complete; "
                        "raise --max-tokens (or --ctx)")


def run(kind: str, text: str, load: LoadOptions, sampling: Sampling, *, template: str | None, notify,
        endpoint: Endpoint | None = None, model: str | None = None, remote_chat: bool = False,
        documents: Sequence[Document] = (), system: str | None = None) -> OneShot:
    """Open the model (load.model here, or `model` on an `endpoint`) and frame the prompt; the caller streams
    `pieces()` or `collect()`s them. `documents` are those `text` holds (read_prompt's): a prompt too long for the
    context says what each of them takes, since they, not the question, are what usually makes it long. `system`:
    ask's system text (a model's own, `malhae models set NAME system=…`; None: the template's)."""
    engine = open_backend(load, endpoint=endpoint, model=model, remote_chat=remote_chat, notify=notify)
    messages = None
    try:
        if kind == "ask":
            tpl = templates.get(template) if template else templates.for_engine(engine)
            prompt = tpl.prompt([("user", text.strip())], system=system)
            sampling.stop = tpl.stops(sampling.stop, sampling.grammar)
            sampling.answer = True
            template = tpl.name
            said = system if system is not None else tpl.system
            messages = ([{"role": "system", "content": said}] if said else []) + \
                [{"role": "user", "content": text.strip()}]
        else:
            prompt = text
        try:
            engine.check_fits(len(engine.tokenize(prompt)))
        except UserError as e:
            if not documents:
                raise
            raise UserError(f"{e}; the documents in it: {docs.sizes(documents, engine.tokenize)}") from None
    except BaseException:
        engine.close()
        raise
    return OneShot(engine, kind, prompt, sampling, template, messages=messages)
