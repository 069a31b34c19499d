"""Constrained decoding's cost per token against free decoding, side by side in one run.

One engine on SmolLM2, ``--rows`` customers' adapters, the same chat prompts. Three
contenders, alternated round by round: ``free`` (every row decodes freely), ``constrained``
(every row held to a JSON schema of an order list, through llguidance's per-row token
mask), ``mixed`` (half the rows constrained, half free, in one batch). Every row generates
exactly ``--new-tokens`` tokens (free rows ignore the end of turn; the schema asks for
more orders than fit), so the three do equal work and a round's time per generated token
compares them directly. The schema's strings and integers are where a mask costs most
(the lexer's widest states). Also reported: the first compile of a schema (the tokenizer
read once, then the grammar) and a compile of a new schema after that. Every constrained
output is checked to be a prefix of valid JSON by llguidance's own matcher.

Target: constrained/free time per token <= 1.10.

    python bench/structured_decoding.py [--rows 8] [--new-tokens 48] [--rounds 9]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from common import median, pick_device, ratio, report, write_random_adapters
from workload import sample_messages

from lora_ops import base_models
from lora_ops.generation import GenerationResult, SamplingParams
from lora_ops.lora import LoraSpec
from lora_ops.serving.engine import AdapterSource, Engine, EngineConfig
from lora_ops.serving.grammar import Grammar, GrammarConstraint

BASE = "smollm2-135m-instruct"
TARGET = 1.10
ORDERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "maxLength": 40},
        "orders": {
            "type": "array",
            "minItems": 200,  # more than fit: every row runs to --new-tokens
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 12},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
                    "express": {"type": "boolean"},
                },
                "required": ["sku", "quantity", "express"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["customer", "orders"],
    "additionalProperties": False,
}
MODES = ("free", "constrained", "mixed")


class GrammarClock:
    """Time spent in the grammar (masks computed and applied, tokens accepted), measured
    around GrammarConstraint's methods: what constraining adds to a row's token."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.masks = 0
        for name in ("mask", "accept"):
            self._wrap(name)

    def _wrap(self, name: str) -> None:
        method = getattr(GrammarConstraint, name)

        def timed(constraint: GrammarConstraint, *args: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(constraint, *args)
            finally:
                self.seconds += time.perf_counter() - started
                self.masks += name == "mask"

        setattr(GrammarConstraint, name, timed)


def run_round(
    engine: Engine,
    prompts: list[list[int]],
    customers: list[str],
    grammar: Grammar,
    mode: str,
    new_tokens: int,
) -> tuple[float, list[GenerationResult]]:
    """Seconds per generated token for one batch of every prompt, and the constrained rows."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    futures: list[tuple[bool, Future[GenerationResult]]] = []
    started = time.perf_counter()
    for index, (prompt, customer) in enumerate(zip(prompts, customers, strict=True)):
        constrained = mode == "constrained" or (mode == "mixed" and index % 2 == 0)
        future = engine.submit(prompt, customer, params, grammar=grammar if constrained else None)
        futures.append((constrained, future))
    results = [(constrained, future.result()) for constrained, future in futures]
    elapsed = time.perf_counter() - started
    tokens = sum(len(result.token_ids) for _, result in results)
    if tokens != new_tokens * len(prompts):
        raise SystemExit(f"{mode}: {tokens} tokens, not {new_tokens} a row: unequal work")
    return elapsed / tokens, [result for constrained, result in results if constrained]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--base", default=BASE, help="catalogue name or transformers folder")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    base = base_models.resolve_base(args.base)

    with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
        folders = [Path(tmp) / f"customer-{i}" for i in range(args.rows)]
        write_random_adapters(base, folders, LoraSpec(r=16, alpha=32))
        engine = Engine(EngineConfig(base, max_batch_size=max(16, args.rows)))
        for folder in folders:
            engine.load_adapter(folder.name, AdapterSource(str(folder)))
        customers = [folder.name for folder in folders]
        conversations = sample_messages()
        prompts = [
            engine.encode_chat(conversations[i % len(conversations)] + [_ask_json()])
            for i in range(args.rows)
        ]
        started = time.perf_counter()
        grammar = engine.grammars.json_schema(ORDERS, field="response_format")
        first_compile = time.perf_counter() - started
        other = {**ORDERS, "properties": {**ORDERS["properties"], "note": {"type": "string"}}}
        started = time.perf_counter()
        engine.grammars.json_schema(other, field="response_format")
        next_compile = time.perf_counter() - started

        run_round(engine, prompts, customers, grammar, "mixed", 4)  # warm-up, left out
        clock = GrammarClock()
        per_token: dict[str, list[float]] = {mode: [] for mode in MODES}
        outputs: list[list[int]] = []
        for round_index in range(args.rounds):
            order = MODES[round_index % 3 :] + MODES[: round_index % 3]
            for mode in order:
                seconds, constrained = run_round(
                    engine, prompts, customers, grammar, mode, args.new_tokens
                )
                per_token[mode].append(seconds)
                outputs += [result.token_ids for result in constrained]
        checked = _valid_prefixes(engine, grammar, outputs)
        engine.close()

    seconds = {mode: median(values) for mode, values in per_token.items()}
    cost = ratio(seconds["constrained"], seconds["free"])
    figures = {
        "device": str(device),
        "rows": args.rows,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "ms_per_token": {mode: round(1000 * s, 3) for mode, s in seconds.items()},
        "ms_per_token_rounds": {
            mode: [round(1000 * s, 2) for s in values] for mode, values in per_token.items()
        },
        "constrained/free": cost,
        "mixed/free": ratio(seconds["mixed"], seconds["free"]),
        "schema_compile_ms": {
            "first": round(1000 * first_compile, 1),
            "next": round(1000 * next_compile, 1),
        },
        "grammar_ms_per_constrained_token": round(1000 * clock.seconds / clock.masks, 3),
        "constrained_outputs_checked": checked,
        "target": TARGET,
        "target_met": cost <= TARGET,
    }
    summary = (
        f"constrained/free {cost} per token, mixed/free {figures['mixed/free']}, "
        f"{args.rows} rows x {args.new_tokens} tokens (ms/token free "
        f"{figures['ms_per_token']['free']}, constrained "
        f"{figures['ms_per_token']['constrained']}), grammar "
        f"{figures['grammar_ms_per_constrained_token']} ms a constrained token; "
        "schema compile first "
        f"{first_compile * 1000:.0f} ms, next {next_compile * 1000:.1f} ms"
    )
    report("structured_decoding", figures, device, summary, write=not args.no_write)


def _ask_json() -> dict[str, str]:
    return {"role": "user", "content": "List my recent orders as JSON."}


def _valid_prefixes(engine: Engine, grammar: Grammar, outputs: list[list[int]]) -> int:
    """Check each output is tokens the schema's grammar accepts so far; return how many."""
    for tokens in outputs:
        constraint = engine.grammars.constraint(grammar)
        for token in tokens:
            constraint.accept(token)
        if constraint.failed():
            raise SystemExit(f"a constrained output left the schema: {engine.decode(tokens)!r}")
    return len(outputs)


if __name__ == "__main__":
    main()
