"""A model's chat template, rendered as transformers renders it (jinja2's sandbox) but bounded.

A template comes with the model, so it is untrusted input: the sandbox stops it reaching Python objects,
and the bounds here stop it hanging the process or filling its memory. Rendering stops with one line
(QloraError) when it runs past `seconds`, when the prompt or any string or list it builds passes `chars`,
or on any template error. The template is compiled on its first render, so a broken template only
breaks chat, never plain generation.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from typing import Any

from qlora_rt.errors import QloraError

SECONDS = 2.0          # a chat template renders in milliseconds; this is a bound, not a budget
CHARS = 4_000_000      # far past any context window (~4 characters per token), far below harm
# a field width or precision of a million or more, or one taken from the arguments: "%9999999s", "{:9999999}"
_WIDE = re.compile(r"%[-#0 +]*(\d{7,}|\*)|%[-#0 +]*\d*\.(\d{7,}|\*)|\{[^{}]*:[^{}]*\d{7,}")


class _Stop(Exception):
    """Raised inside the render to stop it; becomes a QloraError outside."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, bytes)) else 0


class ChatTemplate:
    def __init__(self, source: str, where: str, seconds: float = SECONDS, chars: int = CHARS) -> None:
        self.source, self.where, self.seconds, self.chars = source, where, seconds, chars
        self._template = None

    def render(self, **variables: Any) -> str:
        template = self._compiled()
        deadline = time.monotonic() + self.seconds
        previous = sys.gettrace()

        def trace(frame, event, arg):  # every line of the compiled template (and what it calls) checks the clock
            if time.monotonic() > deadline:
                raise _Stop(f"rendering took over {self.seconds:g} s (a loop without end?)")
            return trace

        parts, total = [], 0
        sys.settrace(trace)
        try:
            for part in template.generate(**variables):
                total += len(part)
                if total > self.chars:
                    raise _Stop(f"the rendered prompt passed {self.chars:,} characters")
                parts.append(part)
        except _Stop as e:
            raise QloraError(f"{self.where}: {e}") from None
        except QloraError:
            raise
        except Exception as e:  # TemplateError, SecurityError, TypeError, ... from the template's own code
            raise QloraError(f"{self.where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                             ) from None
        finally:
            sys.settrace(previous)
        return "".join(parts)

    def _compiled(self):
        if self._template is None:
            from jinja2 import TemplateSyntaxError

            try:
                self._template = _environment(self.chars, self.where).from_string(self.source)
            except TemplateSyntaxError as e:
                raise QloraError(f"{self.where}: line {e.lineno}: {e.message}") from None
        return self._template


def _environment(chars: int, where: str):
    from jinja2 import pass_eval_context
    from jinja2.environment import Template
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def too_big() -> _Stop:
        return _Stop(f"a value it builds passed {chars:,} characters")

    def check(value: Any) -> Any:
        if _size(value) > chars:
            raise too_big()
        return value

    def check_format(fmt: Any) -> None:  # "%9999999999s" and "{:9999999999}" allocate before any check after
        if isinstance(fmt, str) and _WIDE.search(fmt):
            raise too_big()

    def bounded_join(join: Callable) -> Callable:
        def joined(seq):
            seq = list(seq)
            if sum(len(str(s)) for s in seq) > chars:
                raise too_big()
            return join(seq)
        return joined

    class BoundedTemplate(Template):
        @classmethod
        def from_code(cls, environment, code, globals, uptodate=None):
            # as jinja's own, but the compiled code's `~` concatenations join through bounded functions
            namespace = {"environment": environment, "__file__": code.co_filename}
            exec(code, namespace)
            for name in ("str_join", "markup_join"):
                if name in namespace:
                    namespace[name] = bounded_join(namespace[name])
            rv = cls._from_namespace(environment, namespace, globals)
            rv._uptodate = uptodate
            return rv

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "*", "**", "%"})
        template_class = BoundedTemplate

        def call_binop(self, context, op, left, right):
            if op == "*" and (isinstance(right, int) and _size(left) * max(right, 0) > chars
                              or isinstance(left, int) and _size(right) * max(left, 0) > chars):
                raise too_big()
            if op == "+" and _size(left) + _size(right) > chars:
                raise too_big()
            if op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and right * abs(left).bit_length() > 4096:
                raise _Stop("a number it builds passed 4096 bits")
            if op == "%":
                check_format(left)
            return check(super().call_binop(context, op, left, right))

        def format_string(self, s, args, kwargs, format_func=None):
            check_format(s)
            return check(super().format_string(s, args, kwargs, format_func))

    env = Bounded(trim_blocks=True, lstrip_blocks=True)
    original = dict(env.filters)

    def after(name: str, before: Callable[[tuple], None] = lambda args: None) -> None:
        f = original[name]

        def bounded(*args, **kw):
            before(args + tuple(kw.values()))
            return check(f(*args, **kw))
        bounded.__dict__.update(f.__dict__)  # keep jinja's pass_environment / pass_eval_context marks
        env.filters[name] = bounded

    def no_wide_ints(args: tuple) -> None:  # center(width), indent(width), wordwrap(width), tojson(indent)
        if any(isinstance(a, int) and a > chars for a in args):
            raise too_big()

    def no_wide_format(args: tuple) -> None:
        for a in args:
            check_format(a)

    @pass_eval_context
    def replace(eval_ctx, value, old, new, count=None):
        s, o, n = str(value), str(old), str(new)
        if len(s) + (s.count(o) if o else len(s) + 1) * max(len(n) - len(o), 0) > chars:
            raise too_big()
        return check(original["replace"](eval_ctx, value, old, new, count))

    for name in ("center", "indent", "wordwrap", "tojson"):
        after(name, no_wide_ints)
    after("format", no_wide_format)
    for name in ("join", "string", "list"):
        after(name)
    env.filters["replace"] = replace

    def raise_exception(message: str):
        raise QloraError(f"{where}: {message}")

    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: time.strftime(fmt))
    return env
