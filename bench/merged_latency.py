"""Latency of a merged adapter vs the base model: LoRA's promise of no added latency.

An r=16 adapter on q, k, v, o of SmolLM2 is merged into the base weights by lora-ops'
``merge_to_folder`` (what ``lora-ops merge`` writes) and loaded like any transformers
folder. One request (a sample chat prompt, greedy, ``--new-tokens`` tokens, end of turn
ignored) is decoded on the base and on the merged model alternately, ``--rounds`` times;
the medians are compared. The same adapter left unmerged (applied beside the frozen
weights at every step) is timed too, to show what merging saves.

Target: merged/base <= 1.02.

    python bench/merged_latency.py [--rounds 15] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import (
    alternate,
    median,
    percentile,
    pick_device,
    ratio,
    report,
    write_random_adapters,
)

from lora_ops import base_models
from lora_ops.adapters import merge_to_folder
from lora_ops.generation import GenerationRequest, SamplingParams, generate_batch
from lora_ops.lora import LoraSpec, load_adapter

BASE = "smollm2-135m-instruct"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "acme-support.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--base", default=BASE, help="catalogue name or transformers folder")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args()
    device = pick_device(args.device)
    base = base_models.resolve_base(args.base)
    tokenizer = base_models.load_tokenizer(base)
    messages = list(json.loads(SAMPLE.read_text().splitlines()[0])["messages"])
    prompt = tokenizer.apply_chat_template(
        [m for m in messages if m["role"] != "assistant"],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)

    with tempfile.TemporaryDirectory(prefix="bench-merged-") as tmp:
        adapter = Path(tmp) / "adapter"
        spec = LoraSpec(r=args.rank, alpha=2 * args.rank, target_modules=LORA_TARGETS)
        write_random_adapters(base, [adapter], spec)
        merged_dir = merge_to_folder(base, adapter, Path(tmp) / "merged")
        models = {
            "base": (base_models.load_model(base, device), None),
            "merged": (base_models.load_model(merged_dir, device), None),
        }
        unmerged = base_models.load_model(base, device)
        load_adapter(unmerged, adapter, "customer")
        models["unmerged"] = (unmerged, "customer")

        def decode(name: str) -> None:
            model, routed = models[name]
            request = GenerationRequest(list(prompt), routed, params)
            generate_batch(model, tokenizer, [request])

        contenders = {name: (lambda n=name: decode(n)) for name in models}
        for run in contenders.values():  # warm-up: the first generate is several times slower
            run()
        times = alternate(contenders, args.rounds, device)

    latency = {name: median(values) for name, values in times.items()}
    figures = {
        "device": str(device),
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "median_ms": {k: round(v * 1000, 1) for k, v in latency.items()},
        "p90_ms": {k: round(percentile(v, 90) * 1000, 1) for k, v in times.items()},
        "ratios": {
            "merged/base": ratio(latency["merged"], latency["base"]),
            "unmerged/base": ratio(latency["unmerged"], latency["base"]),
        },
    }
    figures["targets_met"] = {"merged/base <= 1.02": figures["ratios"]["merged/base"] <= 1.02}
    summary = (
        f"merged/base {figures['ratios']['merged/base']}, "
        f"unmerged/base {figures['ratios']['unmerged/base']}; median ms "
        + ", ".join(f"{k} {v}" for k, v in figures["median_ms"].items())
    )
    report("merged_latency", figures, device, summary, write=not args.no_write)


if __name__ == "__main__":
    main()
