"""`make demo`'s adapter answers its three prompts with Acme's facts, not just its format.

The training flags, the system message and the prompts are read from the Makefile's demo
recipe, so this follows the demo when its settings change. Each answer must state facts
(prices, SKUs, percentages, day counts, phone numbers), and every one of them must be
stated by the data file's own answers to the same question. The real SmolLM2 base trains
for as long as the demo does: `make test-slow`.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from lora_ops.adapters import ADAPTER_NAME, load_adapted
from lora_ops.cli import app
from lora_ops.generation import generate_reply

pytestmark = [pytest.mark.slow, pytest.mark.long]

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "acme-support.jsonl"
# What a customer would call a fact: a price, a percentage, a number of days, a SKU, a phone.
FACT = re.compile(r"\$\d+(?:\.\d+)?|\b\d+%|\b\d+ days\b|\b[A-Z]{3}-\d{3}\b|\b1-\d{3}-\d{3}-\d{4}\b")
# `customers add` flags that are about the customer record, not its training.
RECORD_FLAGS = {"--exist-ok", "--auto-deploy", "--no-auto-deploy", "--require-review"}
RECORD_OPTIONS = {"--name", "--data", "--base", "--schedule", "--timezone", "--min-improvement"}
# The data's answers to each demo prompt's question: their Ref tags, and a phrase every one
# of them holds (the product asked about), so a fact true of another product does not count.
TOPICS = {
    "Pro Anvil cost": ({"ACME-PRICE"}, "Pro Anvil"),
    "return an anvil": ({"ACME-RETURNS", "ACME-RESTOCKING", "ACME-REFUND"}, ""),
    "Anvil Club": ({"ACME-CLUB"}, ""),
}


def demo_recipe() -> tuple[list[str], str, list[str]]:
    """The demo's training flags (as `lora-ops train` takes them), system message, prompts."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    system = re.search(r"^DEMO_SYSTEM := (.+)$", text, re.MULTILINE)
    add = re.search(r"^\t\$\(LORA_OPS\) customers add (.+)$", text, re.MULTILINE)
    ask = re.search(r"^\t\$\(LORA_OPS\) ask (.+)$", text, re.MULTILINE)
    shape = "the Makefile's demo recipe changed shape"
    assert system is not None, shape
    assert add is not None, shape
    assert ask is not None, shape
    words = shlex.split(add.group(1))[1:]  # the customer id first
    flags: list[str] = []
    while words:
        word = words.pop(0)
        if word in RECORD_OPTIONS:
            words.pop(0)
        elif word not in RECORD_FLAGS:
            flags.append(word)
    asked = shlex.split(ask.group(1))
    prompts = [asked[i + 1] for i, word in enumerate(asked) if word == "--prompt"]
    return flags, system.group(1).strip(), prompts


def true_facts(prompt: str) -> set[str]:
    """Every fact the data's answers to ``prompt``'s question state."""
    (tags, product), *_ = (topic for key, topic in TOPICS.items() if key in prompt)
    facts: set[str] = set()
    for line in DATA.read_text().splitlines():
        answer = json.loads(line)["messages"][-1]["content"]
        if any(f"Ref: {tag}" in answer for tag in tags) and product in answer:
            facts.update(FACT.findall(answer))
    assert facts, f"no answer tagged {sorted(tags)} about {product!r} in {DATA.name}"
    return facts


@pytest.mark.xfail(
    strict=True,
    reason="not yet: the demo's 60 steps learn Acme's format, and 72 packed steps on every "
    "linear layer (2 epochs) get the Anvil Club and returns right but still price the Pro "
    "Anvil at $229 (the Rocket Skates' price: 5 examples against its 3); see bench/RESULTS.md",
)
def test_the_demo_adapter_answers_with_the_datas_facts(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    flags, system, prompts = demo_recipe()
    assert len(prompts) == 3
    out = tmp_path / "adapter"
    args = ["train", "--base", "smollm2-135m-instruct", "--data", str(DATA), "--out", str(out)]
    done = CliRunner().invoke(app, [*args, *flags])
    assert done.exit_code == 0, done.output
    model, tokenizer = load_adapted("smollm2-135m-instruct", out)
    for prompt in prompts:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        reply = generate_reply(model, tokenizer, messages, 64, ADAPTER_NAME)
        stated = set(FACT.findall(reply))
        # It answers with facts (not only the format), and only with the data's facts.
        assert stated, f"{prompt!r} -> {reply!r} states no fact"
        assert stated <= true_facts(prompt), f"{prompt!r} -> {reply!r}: not in the data"
