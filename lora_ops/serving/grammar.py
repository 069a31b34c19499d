"""Constrained decoding: a grammar (a JSON schema, or tool calls) as a per-row token mask.

llguidance computes, from a grammar and the text so far, which tokens may come next. It
was picked over xgrammar and outlines-core because it installs as one dependency-free
wheel (xgrammar pulls triton, ~300 MB, on Linux), it builds the mask lazily with an Earley
parser instead of compiling a table up front (a new schema costs milliseconds, not
seconds, so a customer's first request with a schema does not stall), and a mask takes
0.03-0.2 ms here on SmolLM2's 49,152-token vocabulary. vLLM ships it as its ``guidance``
backend.

A :class:`Grammar` is compiled and checked once (cached by its text); each row gets its
own :class:`GrammarConstraint`, which keeps that row's parse state. Constrained and free
rows, on any adapters, share a batch: the mask is applied to the row's own logits when it
picks its token.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lora_ops.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from lora_ops.errors import InputError

if TYPE_CHECKING:
    import llguidance
    from transformers import PreTrainedTokenizerBase

GRAMMAR_CACHE_SIZE = 256
# JSON's free-form whitespace would let a model pad forever; one space after separators
# is what OpenAI's structured outputs produce, and what clients' examples show.
_JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_BIT = torch.arange(32, dtype=torch.int32)


@dataclass(frozen=True)
class Grammar:
    """A checked grammar in llguidance's serialized form; shared by every row that uses it."""

    text: str


class GrammarCompiler:
    """Compiles and checks grammars against one tokenizer; cached by grammar text.

    The tokenizer is read lazily (0.4 s for a 49k vocabulary), on the first request that
    asks for structure: a replica nobody asks pays nothing.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: Sequence[int]
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._checked: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def json_schema(self, schema: Mapping[str, Any], field: str) -> Grammar:
        """A grammar for JSON text matching ``schema``; ``field`` names it in errors."""
        import llguidance

        if not isinstance(schema, Mapping):
            raise InputError("must be a JSON schema object", field=field)
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(
                dict(schema), overrides=_JSON_OPTIONS
            )
        except ValueError as e:
            raise InputError(f"not a usable JSON schema: {e}", field=field) from e
        return self._checked_grammar(text, field)

    def tool_calls(
        self, tools: Sequence[Mapping[str, Any]], parallel: bool, field: str = "tools"
    ) -> Grammar:
        """One ``<tool_call>`` block (or several, when ``parallel``) calling one of ``tools``.

        Each call's arguments are held to its function's ``parameters`` schema.
        """
        import llguidance

        calls = [_call_schema(tool) for tool in tools]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        schema = {**schema, "x-guidance": _JSON_OPTIONS}
        opening, closing = json.dumps(TOOL_CALL_OPEN + "\n"), json.dumps("\n" + TOOL_CALL_CLOSE)
        more = f'("\\n" {opening} call {closing})*' if parallel else ""
        lark = f"start: {opening} call {closing} {more}\ncall: %json {json.dumps(schema)}\n"
        return self._checked_grammar(llguidance.LLMatcher.grammar_from_lark(lark), field)

    def constraint(self, grammar: Grammar) -> GrammarConstraint:
        """A fresh parse state for one row."""
        import llguidance

        matcher = llguidance.LLMatcher(self._tokenizer_for_grammars(), grammar.text, log_level=0)
        return GrammarConstraint(matcher, self.vocab_size, self._eos_ids)

    def _checked_grammar(self, text: str, field: str) -> Grammar:
        import llguidance

        with self._lock:
            if text in self._checked:
                self._checked.move_to_end(text)
                return self._checked[text]
        error = llguidance.LLMatcher.validate_grammar(text, self._tokenizer_for_grammars())
        if error and not error.startswith("WARNING"):
            reason = " ".join(error.split())[:300]
            raise InputError(f"cannot be enforced: {reason}", field=field)
        grammar = Grammar(text)
        with self._lock:
            self._checked[text] = grammar
            while len(self._checked) > GRAMMAR_CACHE_SIZE:
                self._checked.popitem(last=False)
        return grammar

    def _tokenizer_for_grammars(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                # Any fast tokenizer; the wheel's hint names one class of them.
                fast: Any = self._tokenizer
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    fast, n_vocab=self.vocab_size, eos_token=self._eos_ids
                )
            return self._ll_tokenizer


class GrammarConstraint:
    """One row's parse state: which tokens may come next, advanced token by token."""

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab_size: int, eos_ids: Sequence[int]
    ) -> None:
        self._matcher = matcher
        self._eos_ids = list(eos_ids)
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> None:
        bits = self._bits
        self._matcher.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * bits.element_size())
        allowed = ((bits[:, None] >> _BIT) & 1).flatten()[: logits.shape[-1]].bool()
        if not bool(allowed.any()):  # a broken parse: end the row rather than pick noise
            allowed[self._eos_ids] = True
        logits.masked_fill_(~allowed.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)

    def finished(self) -> bool:
        return bool(self._matcher.is_stopped() or self._matcher.is_error())

    def failed(self) -> bool:
        """A token the grammar does not allow was accepted (only by a caller's mistake)."""
        return bool(self._matcher.is_error())


def _call_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    # No parameters means none (OpenAI's reading), not any object.
    parameters = function.get("parameters") or {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
