"""Constrained decoding for `response_format` (JSON object / JSON schema), with llguidance's numpy API.

llguidance compiles a JSON schema to a grammar and, at each step, gives the bitmask of the tokens that
keep the output inside it; masked-out tokens get -inf before sampling. It reads the export's own
tokenizer.json, so the masks are over exactly the tokens the model produces. llguidance is an optional
dependency (the `serve` extra); it is imported only when a request asks for a format.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from qlora_rt.errors import QloraError

# The JSON's layout: one space after ':' and ',', none elsewhere (as json.dumps writes it). Left free
# (llguidance's default), a small model decoding greedily fills the reply with newlines between tokens and
# runs out of max_tokens before the closing brace. A schema's own "x-guidance" overrides this.
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """Matchers for one export's tokenizer (built once, on the first constrained request: ~0.3 s)."""

    def __init__(self, folder: Path, vocab: int, eos: list[int]) -> None:
        self.folder, self.vocab, self.eos = folder, vocab, eos
        self._tokenizer = None
        self._lock = threading.Lock()

    def _tok(self):
        with self._lock:
            if self._tokenizer is None:
                try:
                    import llguidance
                except ModuleNotFoundError:
                    raise QloraError("response_format needs llguidance: pip install 'qlora-rt[serve]' (in a clone: "
                                     "pip install '.[serve]')") from None
                self._tokenizer = llguidance.LLTokenizer((self.folder / "tokenizer.json").read_text(),
                                                         n_vocab=self.vocab, eos_token=self.eos)
            return self._tokenizer

    def json(self, schema: dict | None) -> JsonConstraint:
        """A matcher for one reply: any JSON object (schema None) or one that fits `schema`."""
        import llguidance

        return self._constraint(lambda: llguidance.LLMatcher.grammar_from_json_schema(
            schema if schema is not None else {"type": "object"}, defaults=LAYOUT), "the JSON schema")


    def lark(self, grammar: str) -> JsonConstraint:
        """A matcher for one reply under a Lark grammar (llguidance's dialect; tool calls)."""
        import llguidance

        return self._constraint(lambda: llguidance.LLMatcher.grammar_from_lark(grammar), "the tools' schemas")

    def _constraint(self, compile_grammar, what: str) -> JsonConstraint:
        import llguidance

        tok = self._tok()
        try:
            grammar = compile_grammar()
        except (ValueError, TypeError, RuntimeError) as e:
            raise QloraError(f"{what} cannot be used: {str(e).splitlines()[0][:200]}") from None
        matcher = llguidance.LLMatcher(tok, grammar)
        if matcher.is_error():
            raise QloraError(f"{what} cannot be used: {matcher.get_error()[:200]}")
        return JsonConstraint(matcher, tok.vocab_size)


class JsonConstraint:
    def __init__(self, matcher, vocab: int) -> None:
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = matcher
        self.bitmask = allocate_token_bitmask(1, vocab)

    def mask(self, logits: np.ndarray) -> None:
        """In place: logits (V,) of tokens the grammar does not allow next become -inf."""
        from llguidance.numpy import apply_token_bitmask_inplace, fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self.bitmask)
        apply_token_bitmask_inplace(logits[None], self.bitmask)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The output is complete: only the end of text may follow."""
        return self.matcher.is_stopped()


def schema_of(response_format: dict) -> dict | None:
    """OpenAI's response_format → the schema to enforce (None: any JSON object)."""
    if response_format.get("type") == "json_object":
        return None
    spec = response_format.get("json_schema")
    if not spec:
        raise QloraError("response_format.json_schema: required with type json_schema ({\"name\", \"schema\"})")
    schema = spec.get("schema", spec) if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise QloraError("response_format.json_schema.schema: expected a JSON schema object")
    json.dumps(schema)  # must be plain JSON
    return schema
