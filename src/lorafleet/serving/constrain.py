"""Constrained decoding: a request's output is held to a grammar (a JSON schema, any JSON object), per row.

The grammar library is `llguidance <https://github.com/guidance-ai/llguidance>`_ (the Rust engine behind
Guidance, also used by vLLM and SGLang). A request carries its grammar as an llguidance grammar string
(``SamplingParams.grammar``, made by :func:`json_grammar`: plain data, so it travels to cluster replicas too);
the engine compiles it into one :class:`Constraint` per request against its own tokenizer.

In the engine's batch, constrained and unconstrained rows share every decode step: before sampling,
:func:`mask_logits` sets the logits of every token the row's grammar does not allow to ``-inf`` (only the
constrained rows are touched), greedy or temperature sampling then picks from what is left, and the row's
matcher advances on the token it got. End-of-sequence is allowed only where the grammar accepts, and a row whose
grammar is complete (no token but EOS could follow) finishes there.
"""

from __future__ import annotations

import json
import threading
import time

import llguidance
import llguidance.hf
import torch
from torch import Tensor

from lorafleet.errors import LorafleetError

__all__ = ["Constraint", "GrammarCompiler", "GrammarError", "check_schema", "json_grammar", "mask_logits"]

# JSON as compact as OpenAI's: flexible whitespace lets a small model ramble blanks forever (and it cannot be
# told where to stop); this keeps one space after ':' and ',' optional only.
_JSON_OPTIONS = {"whitespace_flexible": False, "whitespace_pattern": r"[ ]?"}


class GrammarError(LorafleetError, ValueError):
    """A schema or grammar that cannot constrain decoding (invalid, or a feature the grammar library lacks)."""


def json_grammar(schema: dict | None = None) -> str:
    """The llguidance grammar for JSON valid against ``schema`` (``None``: any JSON object). The schema is
    checked first against the JSON Schema meta-schema (``jsonschema``), then compiled: an unsupported feature
    or a bad ``pattern`` raises :class:`GrammarError` naming it."""
    schema = check_schema({"type": "object"} if schema is None else schema)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"invalid JSON schema: {exc}") from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise GrammarError(f"JSON schema not supported for constrained decoding: {problem.strip()}")
    return grammar


def check_schema(schema) -> dict:
    """``schema`` if it is a valid JSON Schema (checked against its meta-schema, draft 2020-12 unless it names
    another in ``$schema``); else :class:`GrammarError` naming where and what is wrong."""
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    import jsonschema  # noqa: PLC0415 - only requests with a schema need the validator

    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise GrammarError(f"invalid JSON schema at {where}: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. a "$schema" that is not a string: the validator cannot start
        raise GrammarError(f"invalid JSON schema: {type(exc).__name__}: {exc}") from None
    return schema


class GrammarCompiler:
    """Compiles grammars for one tokenizer (the llguidance tokenizer is built once, on first use: ~0.5 s for
    SmolLM2's 49k tokens). ``vocab_size`` is the width of the model's logits; ``eos_ids`` the tokens that end a
    sequence (allowed only where the grammar accepts). Thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids) -> None:
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, int(vocab_size), sorted(eos_ids)
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                try:
                    self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                            eos_token=self.eos_ids or None)
                except ValueError as exc:  # a slow (non-Rust) tokenizer
                    raise GrammarError(f"constrained decoding needs a fast tokenizer: {exc}") from None
            return self._ll

    def compile(self, grammar: str) -> Constraint:
        if not isinstance(grammar, str) or not grammar:
            raise GrammarError(f"a grammar is a non-empty llguidance grammar string, got {grammar!r}")
        matcher = llguidance.LLMatcher(self._lltokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"grammar does not compile: {matcher.get_error().strip()}")
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One request's grammar state: which tokens may come next, advanced by each accepted token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size

    def fill(self, bitmask: Tensor, row: int) -> None:
        """Write the allowed-token bitmask (one bit per token, int32 words) into ``bitmask[row]`` (CPU)."""
        v = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

    def advance(self, token: int) -> bool:
        """Consume the sampled token; False when the grammar refused it (then :attr:`error` says why)."""
        return self.matcher.consume_token(int(token))

    @property
    def error(self) -> str:
        return self.matcher.get_error().strip() or "the grammar reached a dead end"

    @property
    def accepting(self) -> bool:
        """The output so far is complete under the grammar (EOS may come now)."""
        return self.matcher.is_accepting()

    @property
    def complete(self) -> bool:
        """Nothing but EOS may follow: the row is done."""
        return self.matcher.is_stopped()


def mask_logits(logits: Tensor, constraints: list[Constraint | None]) -> tuple[Tensor, float]:
    """``logits (n, V)`` with every token a row's constraint forbids set to ``-inf`` (rows whose constraint is
    None are returned as they are). Returns the masked logits and the seconds spent computing the masks."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits, 0.0
    t0 = time.perf_counter()
    vocab = logits.shape[1]
    words = (constraints[rows[0]].vocab_size + 31) // 32
    bitmask = torch.empty((len(rows), words), dtype=torch.int32)
    for j, i in enumerate(rows):
        constraints[i].fill(bitmask, j)
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().reshape(len(rows), words * 32)  # (m, words * 32)
    if allowed.shape[1] < vocab:  # logits wider than the tokenizer: the extra ids are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    allowed = allowed[:, :vocab]
    allowed[~allowed.any(dim=1)] = True  # a dead-end grammar allows nothing: sample freely, advance() fails the row
    allowed = allowed.to(logits.device)
    index = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, index, sub), time.perf_counter() - t0
