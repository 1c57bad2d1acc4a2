"""Rendering a chat template that came from outside — a GGUF's tokenizer.chat_template, a server's template — with
bounds on memory and time.

Jinja's sandbox keeps a template away from Python's internals, but not from the memory or the clock:
`{{ 'x' * 100000000000 }}` asks for 100 GB, and two nested `range(100000)` loops run for hours. So every render here
is held to:

- work: every loop iteration, range element, call, filter and intercepted operator is a step of a budget
  (MAX_STEPS), and past MAX_SECONDS the render stops at its next step;
- size: no string, list or integer a template makes with `*`, `**`, `+`, `%`, `~`, a call or a filter may exceed
  MAX_CHARS items or MAX_INT_BITS bits; checked before it is made where its size is known in advance (repetition,
  widths, replace, join, indent), after it is made otherwise;
- output: rendered piece by piece (generate()) and stopped past MAX_CHARS.

Anything a template raises (Exceeded for these bounds, a TemplateError, ZeroDivisionError, MemoryError,
RecursionError …) leaves `render` for the caller to word (app.runtime.templates names the template's source). The
checks run inside the render, in its own thread: no watchdog thread, no signal.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_context

MAX_CHARS = 4 << 20  # a prompt is at most a context of text (a few hundred KB); 4 M characters is no chat's
MAX_INT_BITS = 4096
MAX_STEPS = 1_000_000  # a real template takes a few per message
MAX_SECONDS = 2.0  # a real template renders in milliseconds
_WIDTH = re.compile(r"%[-+ #0]*(\d+)?(?:\.(\d+))?")  # printf-style widths and precisions in a `%` format
# str methods and filters whose numbers are widths or counts of what they make (`%` with a `*` width: "%")
_WIDTH_TAKERS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap", "truncate",
                           "batch", "slice", "format", "%"})


class Exceeded(Exception):
    """A template went past one of the bounds; the message says which."""


class _Budget:
    """The steps one render may still take, and when its time is up."""

    def __init__(self) -> None:
        self.steps = MAX_STEPS
        self.deadline = time.monotonic() + MAX_SECONDS

    def take(self) -> None:
        """One step; the clock is read at every one (tens of nanoseconds), since a single step may be a filter over
        millions of items."""
        self.steps -= 1
        if self.steps < 0:
            raise Exceeded(f"it took more than {MAX_STEPS:,} steps (loops, calls, operators)")
        if time.monotonic() > self.deadline:
            raise Exceeded(f"it ran for more than {MAX_SECONDS:g} seconds")


_BUDGET: ContextVar[_Budget | None] = ContextVar("malhae_template_budget", default=None)


def _step() -> None:
    budget = _BUDGET.get()
    if budget is not None:  # None: Jinja evaluating constants while compiling, before any render
        budget.take()


def _too_big(kind: object, size: int, how: str = "") -> Exceeded:
    """"it makes a string of 8,388,608 characters with ~" (`kind`: a value of the type made)."""
    noun = f"a string of {size:,} characters" if isinstance(kind, str) else f"a {type(kind).__name__} of {size:,} items"
    return Exceeded(f"it makes {noun}{how}, over the limit of {MAX_CHARS:,}")


def _checked(value: object) -> object:
    """`value`, if a template may keep it: strings and collections up to MAX_CHARS, integers up to MAX_INT_BITS."""
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_CHARS:
        raise _too_big(value, len(value))
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise Exceeded(f"it makes an integer of more than {MAX_INT_BITS} bits")
    return value


def _check_args(name: str, args: tuple, kwargs: dict) -> None:
    """No width or count over MAX_CHARS for the functions that make one (center, ljust, zfill, indent, `%*d` …):
    that would be more than any prompt holds. Other functions' numbers are left alone (a timestamp is no width)."""
    if name not in _WIDTH_TAKERS:
        return
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and abs(value) > MAX_CHARS:
            shown = f"{value:,}" if value.bit_length() < 64 else "a larger number"
            raise Exceeded(f"it asks for a width or count of {shown} (at most {MAX_CHARS:,})")


def _check_growth(name: str, text: object, args: tuple) -> None:
    """The operations that multiply a string, sized before they run (str methods and the filters of the same name)."""
    if not isinstance(text, str):
        if name == "join" and isinstance(text, (list, tuple)):  # the join filter: (items, separator)
            sep = args[0] if args and isinstance(args[0], str) else ""
            _check_growth("join", sep, (text,))
        return
    size = len(text)
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        size += (text.count(args[0]) if args[0] else size + 1) * max(len(args[1]) - len(args[0]), 0)
    elif name == "join" and args and isinstance(args[0], (list, tuple)):
        size = sum(len(x) for x in args[0] if isinstance(x, str)) + len(text) * len(args[0])
    elif name == "indent" and args and isinstance(args[0], (str, int)):
        size += text.count("\n") * (len(args[0]) if isinstance(args[0], str) else abs(args[0]))
    elif name == "expandtabs":
        size += text.count("\t") * (args[0] if args and isinstance(args[0], int) else 8)
    if size > MAX_CHARS:
        raise _too_big(text, size, f" with {name}")


class _Range:
    """range() for templates: at most MAX_STEPS numbers, and each one handed out is a step (`|join` over it too, not
    only a for loop). Its range is private: the sandbox keeps templates from underscore names."""

    def __init__(self, *args: int) -> None:
        self._range = range(*args)
        if len(self._range) > MAX_STEPS:
            raise Exceeded(f"it asks for a range of {len(self._range):,} numbers (at most {MAX_STEPS:,})")

    def __iter__(self) -> Iterator[int]:
        for i in self._range:
            _step()
            yield i

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index: int | slice) -> object:
        item = self._range[index]
        return _Range(item.start, item.stop, item.step) if isinstance(item, range) else item


@pass_context  # a context filter is never run while compiling (Jinja folds constants)
def _loop_steps(context: jinja2.runtime.Context, iterable: object) -> Iterator[object]:
    """Every `{% for %}` iterates through this: each iteration is a step."""
    for item in iterable:
        _step()
        yield item


def _bounded_filter(name: str, func: Callable[..., object]) -> Callable[..., object]:
    """A filter that takes a step, refuses huge widths and growth before running, and checks what it made."""
    pass_arg = getattr(getattr(func, "jinja_pass_arg", None), "name", None)

    @pass_context
    def run(context, value, *args, **kwargs):
        _step()
        _check_args(name, args, kwargs)
        _check_growth(name, value, args)
        head = {"context": (context,), "eval_context": (context.eval_ctx,),
                "environment": (context.environment,)}.get(pass_arg, ())
        return _checked(func(*head, value, *args, **kwargs))

    return run


class _Generator(CodeGenerator):
    """Jinja's code generator, with `~` (string concatenation) sized like the other operators."""

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.concat_bounded((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The environment transformers and llama-cpp-python render chat templates in (sandboxed, trim_blocks and
    lstrip_blocks, loop controls, raise_exception and strftime_now), with this module's bounds."""

    code_generator_class = _Generator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters["malhae_loop_steps"] = _loop_steps
        self.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs; no chat template uses it
        self.globals["range"] = _Range
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # as transformers offers it

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Every for loop iterates through malhae_loop_steps, whatever it loops over."""
        tree = super()._parse(source, name, filename)
        for loop in list(tree.find_all(nodes.For)):
            loop.iter = nodes.Filter(loop.iter, "malhae_loop_steps", [], [], None, None, lineno=loop.lineno)
        return tree

    def call(__self, __context, __obj, *args, **kwargs):  # Jinja's own signature: no name a keyword could clash with
        _step()
        name = getattr(__obj, "__name__", "")
        _check_args(name, args, kwargs)
        _check_growth(name, getattr(__obj, "__self__", None), args)
        return _checked(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator: str, left: object, right: object) -> object:
        _step()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_CHARS:
                    raise _too_big(seq, len(seq) * n, " with *")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                raise Exceeded(f"it makes an integer of more than {MAX_INT_BITS} bits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                and right > 0 and (left.bit_length() - 1) * right > MAX_INT_BITS:
            raise Exceeded(f"it makes an integer of more than {MAX_INT_BITS} bits")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                and len(left) + len(right) > MAX_CHARS:
            raise _too_big(left, len(left) + len(right), " with +")
        elif operator == "%" and isinstance(left, str):
            if "*" in left:  # "%*d": the width is an argument
                _check_args("%", right if isinstance(right, tuple) else (right,), {})
            for m in _WIDTH.finditer(left):
                if any(g and (len(g) > 9 or int(g) > MAX_CHARS) for g in m.groups()):
                    raise Exceeded(f"it formats with {m.group()!r}, a width over the limit of {MAX_CHARS:,}")
        return _checked(super().call_binop(context, operator, left, right))

    def concat_bounded(self, parts: tuple) -> str:
        """`a ~ b ~ c`, refused past MAX_CHARS."""
        _step()
        texts = [str(p) for p in parts]
        if sum(map(len, texts)) > MAX_CHARS:
            raise _too_big("", sum(map(len, texts)), " with ~")
        return "".join(texts)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def render(template: jinja2.Template, **variables: object) -> str:
    """`template` rendered within this module's bounds (see the module's docstring); Exceeded or whatever the
    template raised otherwise. The template must come from a BoundedEnvironment."""
    token = _BUDGET.set(_Budget())
    try:
        out, size = [], 0
        for piece in template.generate(**variables):
            size += len(piece)
            if size > MAX_CHARS:
                raise Exceeded(f"it makes a prompt of more than {MAX_CHARS:,} characters")
            out.append(piece)
        return "".join(out)
    finally:
        _BUDGET.reset(token)
