"""Mixed-adapter serving: 16 concurrent requests, each through its own adapter, in one engine.

Contenders on the same 16 prompts (greedy, exactly ``--new-tokens`` tokens each: end of
turn is ignored so every contender does equal work), alternated round by round within two
phases, the engine's and then PEFT's once the engine is closed (each computes on its own
thread; two alive at once slow each other on CPU, see bench/common.py):

- ``mixed``: lora-ops' engine, the 16 requests submitted at once, each naming a different
  adapter; they decode as one batch.
- ``base``: the same 16 requests on the base model alone, same engine.
- ``peft_mixed``: PEFT's mixed-batch inference, ``generate(..., adapter_names=[...])``.
- ``one_at_a_time``: what serving without mixed batches does: one request at a time, the
  adapter swapped in before each (PEFT's ``set_adapter``, then ``generate``).

Then over HTTP, against a real ``lora-ops serve`` replica with the same adapters: 16
streaming chat completions of ``--http-tokens`` tokens sent at once by 16 clients, each
through its own adapter (``http_mixed``) or all on the base (``http_base``), alternated;
the requests do not arrive inside one step, so this is where continuous batching shows.

Throughput is generated tokens per second. Targets: mixed/base >= 0.90 in process and
over HTTP, mixed/peft_mixed >= 1.5, mixed/one_at_a_time >= 7.

    python bench/serve_mixed.py [--rounds 3] [--requests 16] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from common import alternate, median, pick_device, ratio, report, write_random_adapters
from http_load import ChatRequest, closed_loop_http, lora_ops_replica
from peft import PeftModel
from transformers import PreTrainedModel
from workload import sample_messages

from lora_ops import base_models
from lora_ops.generation import SamplingParams
from lora_ops.lora import LoraSpec
from lora_ops.serving.engine import AdapterSource, Engine, EngineConfig

BASE = "smollm2-135m-instruct"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "acme-support.jsonl"
TARGETS = {
    "mixed/base": 0.90,
    "http mixed/base": 0.90,
    "mixed/peft_mixed": 1.5,
    "mixed/one_at_a_time": 7.0,
}


def sample_prompts(engine: Engine, count: int) -> list[list[int]]:
    """Chat prompts from the sample data: the system and user turns of ``count`` examples."""
    prompts = []
    for line in SAMPLE.read_text().splitlines()[:count]:
        messages = [m for m in json.loads(line)["messages"] if m["role"] != "assistant"]
        prompts.append(engine.encode_chat(messages))
    return prompts


def engine_contender(
    engine: Engine, prompts: list[list[int]], models: list[str], new_tokens: int
) -> Callable[[], int]:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)

    def run() -> int:
        futures = [engine.submit(p, m, params) for p, m in zip(prompts, models, strict=True)]
        return sum(len(f.result().token_ids) for f in futures)

    return run


def engine_one_by_one(
    engine: Engine, prompts: list[list[int]], models: list[str], new_tokens: int
) -> Callable[[], int]:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)

    def run() -> int:
        return sum(
            len(engine.submit(p, m, params).result().token_ids)
            for p, m in zip(prompts, models, strict=True)
        )

    return run


def left_padded(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def peft_generate(
    model: PeftModel,
    prompts: list[list[int]],
    pad_id: int,
    new_tokens: int,
    adapter_names: list[str] | None,
) -> int:
    device = next(model.parameters()).device
    ids, mask = left_padded(prompts, pad_id, device)
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    with torch.no_grad(), _autocast(device):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            **extra,
        )
    return int((out.shape[1] - ids.shape[1]) * out.shape[0])


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def peft_model(
    base: Path, folders: list[Path], names: list[str], device: torch.device
) -> PeftModel:
    model: PreTrainedModel = base_models.load_model(base, device)
    peft = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=names[0])
    for folder, name in zip(folders[1:], names[1:], strict=True):
        peft.load_adapter(str(folder), adapter_name=name)
    peft.eval()
    return peft


def timed_phase(
    contenders: dict[str, Callable[[], int]], expected: int, rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Warm each contender up (checking it generates ``expected`` tokens), then time them."""
    tokens = {name: run() for name, run in contenders.items()}
    if any(count != expected for count in tokens.values()):
        raise SystemExit(f"contenders generated unequal work: {tokens} (wanted {expected})")
    return alternate(contenders, rounds, device)


def over_http(
    base: Path, folders: list[Path], names: list[str], args: argparse.Namespace
) -> dict[str, list[float]]:
    """Tokens per second of ``http_mixed`` and ``http_base``, one figure per round."""
    chats = sample_messages()[: len(names)]
    mixed = [ChatRequest(c, n, args.http_tokens) for c, n in zip(chats, names, strict=True)]
    on_base = [ChatRequest(c, "base", args.http_tokens) for c in chats]
    serve_args = ["--max-batch-size", str(len(names)), "--max-adapters", str(len(names))]
    rates: dict[str, list[float]] = {"http_mixed": [], "http_base": []}
    with lora_ops_replica(
        base, dict(zip(names, folders, strict=True)), serve_args=serve_args
    ) as replica:
        closed_loop_http(replica.url, mixed, len(mixed))  # warm-up
        for round_ in range(args.rounds):
            order = [("http_mixed", mixed), ("http_base", on_base)]
            for name, requests in order if round_ % 2 == 0 else reversed(order):
                run = closed_loop_http(replica.url, requests, len(requests))
                if run.failures:
                    raise SystemExit(f"requests failed over HTTP: {run.failures[:3]}")
                rates[name].append(run.figures()["tokens_per_second"])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--http-tokens", type=int, default=32)
    parser.add_argument("--no-http", action="store_true", help="skip the replica over HTTP")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--base", default=BASE, help="catalogue name or transformers folder")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    base = base_models.resolve_base(args.base)
    names = [f"customer-{i:02d}" for i in range(args.requests)]

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folders = [Path(tmp) / name for name in names]
        spec = LoraSpec(r=args.rank, alpha=2 * args.rank, target_modules=LORA_TARGETS)
        write_random_adapters(base, folders, spec)
        config = EngineConfig(base, max_adapters=args.requests, max_batch_size=args.requests)
        engine = Engine(config)
        for name, folder in zip(names, folders, strict=True):
            engine.load_adapter(name, AdapterSource(str(folder)))
        prompts = sample_prompts(engine, args.requests)
        pad_id = int(engine.tokenizer.pad_token_id)
        expected = args.requests * args.new_tokens
        # The engine's contenders, then PEFT's, each alternated within its phase: the
        # engine computes on its own thread, and PEFT on this one while it is alive would
        # slow both (two OpenMP pools on CPU, bench/common.py).
        times = timed_phase(
            {
                "mixed": engine_contender(engine, prompts, names, args.new_tokens),
                "base": engine_contender(engine, prompts, ["base"] * len(names), args.new_tokens),
            },
            expected,
            args.rounds,
            device,
        )
        engine.close()
        peft = peft_model(base, folders, names, device)

        def one_at_a_time() -> int:
            total = 0
            for prompt, name in zip(prompts, names, strict=True):
                peft.set_adapter(name)
                total += peft_generate(peft, [prompt], pad_id, args.new_tokens, None)
            return total

        peft_contenders: dict[str, Callable[[], int]] = {
            "peft_mixed": lambda: peft_generate(peft, prompts, pad_id, args.new_tokens, names),
            "one_at_a_time": one_at_a_time,
        }
        times.update(timed_phase(peft_contenders, expected, args.rounds, device))
        http = {} if args.no_http else over_http(base, folders, names, args)

    seconds = {name: median(values) for name, values in times.items()}
    throughput = {name: round(expected / s, 1) for name, s in seconds.items()}
    throughput.update({name: round(median(values), 1) for name, values in http.items()})
    ratios = {
        "mixed/base": ratio(throughput["mixed"], throughput["base"]),
        "mixed/peft_mixed": ratio(throughput["mixed"], throughput["peft_mixed"]),
        "mixed/one_at_a_time": ratio(throughput["mixed"], throughput["one_at_a_time"]),
        "peft_mixed/base": ratio(throughput["peft_mixed"], throughput["base"]),
        "peft_mixed/one_at_a_time": ratio(throughput["peft_mixed"], throughput["one_at_a_time"]),
    }
    if http:
        ratios["http mixed/base"] = ratio(throughput["http_mixed"], throughput["http_base"])
    met = {name: ratios[name] >= target for name, target in TARGETS.items() if name in ratios}
    figures = {
        "device": str(device),
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "rank": args.rank,
        "rounds": args.rounds,
        "median_seconds": {k: round(v, 3) for k, v in seconds.items()},
        "tokens_per_second": throughput,
        "ratios": ratios,
        "targets": {name: t for name, t in TARGETS.items() if name in ratios},
        "targets_met": met,
    }
    summary = ", ".join(f"{k} {v}" for k, v in ratios.items() if k in TARGETS)
    summary += "; tok/s " + ", ".join(f"{k} {v}" for k, v in throughput.items())
    report("serve_mixed", figures, device, summary, write=not args.no_write)


if __name__ == "__main__":
    main()
