"""Prefix reuse: one customer's requests that share a long system prompt.

One engine and adapter (k and v projections adapted, so the KV is the adapter's), each
request run twice, the order alternating: ``cached`` reuses the KV blocks of a prefix the
engine has computed before for the same adapter, ``uncached`` (prefix caching switched
off for that request) computes the prompt whole. One engine, not two: each computes on
its own thread, and two alive at once slow each other on CPU (bench/common.py). The
requests, one at a time and alternated between the two: a ~``--system-tokens`` system
prompt, then a different short question each (``--new-tokens`` greedy tokens). The first
request warms the engine and is left out. Both must answer alike; a second adapter
with the same system prompt must find nothing cached (the key is adapter + tokens).

Target: uncached/cached time to first token >= 1.5.

    python bench/prefix_reuse.py [--requests 12] [--system-tokens 400]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import median, pick_device, ratio, report, write_random_adapters
from workload import Request, Timing, sample_messages, submit_timed

from lora_ops import base_models
from lora_ops.lora import LoraSpec
from lora_ops.serving.engine import AdapterSource, Engine, EngineConfig

BASE = "smollm2-135m-instruct"
TARGET = 1.5
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def system_prompt(engine: Engine, tokens: int) -> str:
    """Sentences of the sample data's system and user turns, repeated to ``tokens`` tokens."""
    sentences = [m["content"] for conversation in sample_messages() for m in conversation]
    text = ""
    for sentence in sentences * 100:
        if len(engine.encode_text(text)) >= tokens:
            break
        text += sentence + " "
    return text.strip()


def questions(count: int) -> list[str]:
    users = [m["content"] for c in sample_messages() for m in c if m["role"] == "user"]
    return [f"Question {i + 1}: {users[i % len(users)]}" for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--system-tokens", type=int, default=400)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--base", default=BASE, help="catalogue name or transformers folder")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    base = base_models.resolve_base(args.base)

    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp:
        folders = [Path(tmp) / "acme", Path(tmp) / "globex"]
        write_random_adapters(
            base, folders, LoraSpec(r=16, alpha=32, target_modules=TARGET_MODULES)
        )
        cached = Engine(EngineConfig(base, prefix_caching=True))
        for folder in folders:
            cached.load_adapter(folder.name, AdapterSource(str(folder)))
        system = system_prompt(cached, args.system_tokens)
        requests = [
            Request(
                cached.encode_chat(
                    [{"role": "system", "content": system}, {"role": "user", "content": q}]
                ),
                "acme",
                args.new_tokens,
            )
            for q in questions(args.requests + 1)
        ]
        modes = ("cached", "uncached")
        ttft: dict[str, list[float]] = {name: [] for name in modes}
        answers: dict[str, list[list[int]]] = {name: [] for name in modes}
        prompt_tokens = reused_tokens = 0  # of the cached requests
        for index, request in enumerate(requests):
            for mode in modes if index % 2 == 0 else tuple(reversed(modes)):
                cached.planner.prefix_caching = mode == "cached"
                timing = Timing(0.0)
                queried, hit = cached.stats.prefix_queries, cached.stats.prefix_hits
                result = submit_timed(cached, request, timing).result()
                if mode == "cached":
                    prompt_tokens += cached.stats.prefix_queries - queried
                    reused_tokens += cached.stats.prefix_hits - hit
                answers[mode].append(result.token_ids)
                if index > 0:  # the first request computes the prefix
                    ttft[mode].append(timing.ttft)
        cached.planner.prefix_caching = True
        hits_before = cached.stats.prefix_hits
        other = Request(requests[1].prompt_ids, "globex", args.new_tokens)
        submit_timed(cached, other, Timing(0.0)).result()
        other_adapter_hits = cached.stats.prefix_hits - hits_before
        hit_rate = reused_tokens / max(1, prompt_tokens)
        cached.close()

    if answers["cached"] != answers["uncached"]:
        raise SystemExit("reusing the prefix changed an answer")
    if other_adapter_hits:
        raise SystemExit(f"another adapter reused {other_adapter_hits} tokens of acme's KV")
    seconds = {name: median(values) for name, values in ttft.items()}
    gain = ratio(seconds["uncached"], seconds["cached"])
    figures = {
        "device": str(device),
        "prompt_tokens": len(requests[0].prompt_ids),
        "requests_timed": args.requests,
        "ttft_median_s": {k: round(v, 4) for k, v in seconds.items()},
        "ttft_mean_s": {k: round(sum(v) / len(v), 4) for k, v in ttft.items()},
        "uncached/cached ttft": gain,
        "prefix_hit_rate": round(hit_rate, 3),
        "other_adapter_hit_tokens": other_adapter_hits,
        "answers_equal": True,
        "target": TARGET,
        "target_met": gain >= TARGET,
    }
    summary = (
        f"uncached/cached TTFT {gain} on a {len(requests[0].prompt_ids)}-token prompt "
        f"(median s {seconds['uncached']:.3f} vs {seconds['cached']:.3f}), "
        f"hit rate {hit_rate:.2f}, other adapter's hits 0, answers equal"
    )
    report("prefix_reuse", figures, device, summary, write=not args.no_write)


if __name__ == "__main__":
    main()
