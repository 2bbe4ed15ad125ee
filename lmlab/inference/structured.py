"""Structured outputs: a grammar (a JSON schema, a regular expression, a Lark or GBNF grammar) that every generated
token must keep the output inside, enforced by masking the tokens that would leave it.

The grammar engine is llguidance (MIT; measured against xgrammar and outlines-core by bench/grammar_engines.py,
docs/results/structured-outputs): it compiles a request's schema in about a millisecond, so that every request may
bring its own, and computes the allowed-token mask of a 49k vocabulary in a few hundred microseconds, against tens
of milliseconds for a decode step. The engine keeps one Matcher per constrained choice; rows without a constraint
never reach this module.

    grammars = Grammars(tokenizer, vocab_size, eos_id)
    constraint = grammars.constraint(json_schema_grammar(schema), "response_format")  # ConstraintError if bad
    matcher = constraint.matcher()
    logits = matcher.mask(logits); token = ...; finished = matcher.consume(token)
"""

from __future__ import annotations

import json
import threading

import llguidance
import numpy as np
import torch

from lmlab.errors import LmlabError

# JSON as json.dumps writes it ("a": 1, "b": 2): no free whitespace, so that a model cannot spend its tokens on
# blank lines before closing the object, and the text is what models saw most in training.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(LmlabError):
    """A grammar the engine cannot compile; `param` names the request field it came from."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def json_schema_grammar(schema: dict) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)


def regex_grammar(pattern: str) -> str:
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def lark_grammar(text: str, param: str = "grammar") -> str:
    """A Lark grammar (llguidance's syntax, with %json {schema} for JSON inside) or llama.cpp's GBNF."""
    try:
        return llguidance.grammar_from("grammar", text)
    except ValueError as e:
        raise ConstraintError(f"'{param}' is neither a Lark nor a GBNF grammar: {e}", param) from None


def choice_grammar(options: list[str]) -> str:
    return llguidance.grammar_from("choice", options)


class Grammars:
    """The served tokenizer as llguidance sees it (built once: about 2 s for a 49k vocabulary), and grammars checked
    against it."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._lltok = None
        self._lock = threading.Lock()

    @property
    def lltok(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.LLTokenizer(self.tokenizer.to_str(), n_vocab=self.vocab_size,
                                                     eos_token=self.eos_id)
            return self._lltok

    def constraint(self, grammar: str, param: str) -> Constraint:
        """The grammar, checked: a ConstraintError names `param` and says what llguidance could not compile."""
        error = llguidance.LLMatcher.validate_grammar(grammar, self.lltok)
        if error:
            first = error.strip().splitlines()[0]
            raise ConstraintError(f"'{param}' cannot be compiled into a grammar: {first}", param)
        return Constraint(self, grammar)


class Constraint:
    """A checked grammar of one request; each choice of the request walks it with its own Matcher."""

    def __init__(self, grammars: Grammars, grammar: str):
        self.grammars = grammars
        self.grammar = grammar

    def matcher(self) -> Matcher:
        return Matcher(llguidance.LLMatcher(self.grammars.lltok, self.grammar, log_level=0),
                       self.grammars.vocab_size, self.grammars.eos_id)


class Matcher:
    """One choice's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_id: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of (1, V) logits where every token the grammar does not allow next is -inf."""
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)
        # numpy unpacks the bits (token t is bit t % 32 of word t // 32) several times faster than torch shifts
        allowed = np.unpackbits(self.bitmask.numpy().view(np.uint8), bitorder="little", count=logits.shape[-1])
        if not allowed.any():  # the matcher failed (a parser limit): end the answer rather than sample from nothing
            allowed[self.eos_id] = 1
        return torch.where(torch.from_numpy(allowed.view(bool)).to(logits.device), logits, float("-inf"))

    def consume(self, token: int) -> bool:
        """Advance by the sampled token; True when the output is complete (the grammar took its end token, or
        allows nothing more)."""
        self.matcher.consume_token(token)
        return self.matcher.is_stopped() or self.matcher.is_error()
