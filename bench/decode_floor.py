"""How close decoding comes to the machine: the engine's step time over what the hardware allows.

Measured in one run on the same device:

- memory bandwidth (reading 1 GiB, far more than the caches: by a matrix-vector product,
  the batch-1 step's own operation, and by a plain reduction) and matmul throughput (a
  large GEMM in the model's dtype);
- the weight-read floor of a batch-1 decoding step: the base model's weight bytes over
  the matrix-vector rate (every weight is read once per step);
- the floor of a ``--rows``-row step: the larger of that read and 2 x parameters x rows
  FLOPs over the matmul throughput;
- the engine's time per token at batch 1 and per step at ``--rows`` rows, from the gaps
  between a request's first text piece and its end (prefill left out);
- transformers' own ``generate`` at batch 1 on the same prompt, the peer users would try.

Target: batch-1 time per token / weight-read floor <= 2. The ``--rows`` step over its floor
is reported.

    python bench/decode_floor.py [--rounds 3] [--new-tokens 64] [--rows 16]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import median, pick_device, ratio, report, sync
from workload import Request, Timing, sample_messages, submit_timed

from lora_ops import base_models
from lora_ops.serving.engine import Engine, EngineConfig

BASE = "smollm2-135m-instruct"
TARGET = 2.0


def timed(
    run: Callable[[], object], device: torch.device, rounds: int, *, best: bool = False
) -> float:
    """Median seconds of ``run`` after one warm-up; the fastest with ``best``.

    What the hardware can do is taken at its best round (a floor; a busy moment only
    makes a round slower), what software does at its median.
    """
    run()
    times = []
    for _ in range(rounds):
        sync(device)
        started = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - started)
    return min(times) if best else median(times)


def bandwidth(device: torch.device, dtype: torch.dtype, rounds: int) -> dict[str, float]:
    """Bytes per second read from 1 GiB: by a reduction, and by a matrix-vector product.

    The product is what a batch-1 step is made of (each weight matrix times one vector), so
    its rate is the floor's; the reduction shows what the memory gives at best.
    """
    side = int((2**30 // (torch.finfo(dtype).bits // 8)) ** 0.5)
    matrix = torch.ones(side, side, dtype=dtype, device=device)
    vector = torch.ones(side, dtype=dtype, device=device)
    reduce_s = timed(lambda: matrix.sum(), device, rounds, best=True)
    gemv_s = timed(lambda: torch.mv(matrix, vector), device, rounds, best=True)
    return {"reduction": matrix.nbytes / reduce_s, "gemv": matrix.nbytes / gemv_s}


def model_weight_read(model: torch.nn.Module, device: torch.device, rounds: int) -> float:
    """Seconds to multiply one vector by each of the model's own weight matrices in turn.

    The reads of a batch-1 step and nothing else: no attention, no cache, no Python
    beyond the loop. Matrices of the model's shapes stream slower than one huge one.
    """
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    vectors = {w.shape[1]: torch.ones(1, w.shape[1], dtype=w.dtype, device=device) for w in weights}

    def read_all() -> None:
        with torch.no_grad():
            for weight in weights:
                torch.nn.functional.linear(vectors[weight.shape[1]], weight)

    return timed(read_all, device, rounds, best=True)


def matmul_flops(device: torch.device, dtype: torch.dtype, rounds: int) -> float:
    size = 2048
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    seconds = timed(lambda: a @ b, device, rounds, best=True)
    return 2 * size**3 / seconds


def engine_step_seconds(engine: Engine, prompt: list[int], rows: int, tokens: int) -> float:
    """Median gap between decoded tokens of ``rows`` requests decoding together."""
    timings = [Timing(0.0) for _ in range(rows)]
    futures = [submit_timed(engine, Request(prompt, "base", tokens), timing) for timing in timings]
    for future in futures:
        future.result()
    return median([(t.e2e - t.ttft) / (t.tokens - 1) for t in timings])


def hf_token_seconds(
    model: torch.nn.Module, prompt: list[int], tokens: int, device: torch.device, rounds: int
) -> float:
    """transformers' generate at batch 1: (time for ``tokens`` - time for 1) / (tokens - 1)."""
    ids = torch.tensor([prompt], device=device)

    def generate(n: int) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad(), base_models.autocast_for(device):
                return model.generate(  # type: ignore[operator]
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )

        return run

    return (timed(generate(tokens), device, rounds) - timed(generate(1), device, rounds)) / (
        tokens - 1
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--base", default=BASE, help="catalogue name or transformers folder")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args()
    device = pick_device(args.device)
    base = base_models.resolve_base(args.base)
    engine = Engine(EngineConfig(base, max_batch_size=args.rows))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weights = {id(p): p for p in engine.model.parameters()}.values()  # tied weights once
    weight_bytes = sum(p.numel() * p.element_size() for p in weights)
    parameters = sum(p.numel() for p in weights)
    prompt = engine.encode_chat(sample_messages()[0])

    # The engine first, alone: it computes on its own thread, and the main thread's own
    # measurements below would otherwise keep a second OpenMP pool alive (bench/common.py).
    one = median(
        [engine_step_seconds(engine, prompt, 1, args.new_tokens) for _ in range(args.rounds)]
    )
    many = median(
        [
            engine_step_seconds(engine, prompt, args.rows, args.new_tokens)
            for _ in range(args.rounds)
        ]
    )
    engine.close()
    hardware_rounds = max(args.rounds, 5)
    rates = bandwidth(device, dtype, hardware_rounds)
    read_per_s = rates["gemv"]
    flops = matmul_flops(device, dtype, hardware_rounds)
    model = base_models.load_model(base, device)
    hf = hf_token_seconds(model, prompt, args.new_tokens, device, args.rounds)
    model_read = model_weight_read(model, device, hardware_rounds)

    floor_one = weight_bytes / read_per_s
    floor_many = max(floor_one, 2 * parameters * args.rows / flops)
    figures = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "weight_mb": round(weight_bytes / 1024**2, 1),
        "bandwidth_gb_s": {k: round(v / 1e9, 2) for k, v in rates.items()},
        "weight_read_floor_at_best_ms": round(weight_bytes / rates["reduction"] * 1e3, 2),
        "matmul_gflop_s": round(flops / 1e9, 1),
        "batch1_ms_per_token": {
            "engine": round(one * 1e3, 2),
            "transformers_generate": round(hf * 1e3, 2),
            "weight_read_floor": round(floor_one * 1e3, 2),
            "model_weight_read": round(model_read * 1e3, 2),
        },
        f"batch{args.rows}_ms_per_step": {
            "engine": round(many * 1e3, 2),
            "floor": round(floor_many * 1e3, 2),
        },
        "batch1 engine/floor": ratio(one, floor_one),
        "batch1 engine/model_weight_read": ratio(one, model_read),
        "batch1 engine/transformers": ratio(one, hf),
        f"batch{args.rows} engine/floor": ratio(many, floor_many),
        "target": {"batch1 engine/floor": TARGET},
        "target_met": one / floor_one <= TARGET,
    }
    summary = (
        f"batch 1: {one * 1e3:.1f} ms/token, floor {floor_one * 1e3:.1f} "
        f"(x{ratio(one, floor_one)}), the model's own weight reads {model_read * 1e3:.1f} "
        f"(x{ratio(one, model_read)}), transformers {hf * 1e3:.1f}; batch {args.rows}: "
        f"{many * 1e3:.1f} ms/step, floor {floor_many * 1e3:.1f} (x{ratio(many, floor_many)})"
    )
    report("decode_floor", figures, device, summary, write=not args.no_write)


if __name__ == "__main__":
    main()
