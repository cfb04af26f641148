"""Time one MoCo-v2 training step: reference style (fp32, NCHW) vs ours (channels_last + bf16 autocast).

Both variants run the same ``study.moco.MoCo`` forward (momentum update, split-batch shuffle BN, InfoNCE, enqueue),
the same SGD step, the same initial weights and the same batch, so the ratio isolates memory format and precision.
The two are timed alternately, step by step, after warm-up steps, so that load drifting on a shared machine hits
both alike. ``ref_step_s`` / ``ours_step_s`` are the fastest step of each (timeit's convention: slower repeats
measure other processes, not the code); the medians are printed too. Prints one JSON line per device:

    python benchmarks/train_step.py --batch 32 --size 64 [--device cpu|cuda|all]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from contextlib import nullcontext

import torch

from study.moco import MoCo

TARGET = 1.3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(model: MoCo, views: list[torch.Tensor], ours: bool, device: torch.device):
    """A closure running one optimiser step; ``ours`` switches channels_last + bf16 autocast on."""
    model = model.to(device)
    fmt = torch.channels_last if ours else torch.contiguous_format
    model = model.to(memory_format=fmt)
    views = [v.to(device).contiguous(memory_format=fmt) for v in views]
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.03, momentum=0.9, weight_decay=1e-4
    )
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if ours else nullcontext()

    def step() -> float:
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with amp:
            out = model(views)
        out["loss"].backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - t0

    return step


def bench(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    base = MoCo(
        {"arch": args.arch, "small_input": False},
        {"dim": 128, "K": args.K, "m": 0.999, "T": 0.2, "mlp": True, "shuffle_bn": "split"},
        {"enabled": False},
        {"enabled": False},
    ).train()
    gen = torch.Generator().manual_seed(args.seed)
    views = [torch.randn(args.batch, 3, args.size, args.size, generator=gen) for _ in range(2)]
    ref_step = _make_step(copy.deepcopy(base), views, ours=False, device=device)
    our_step = _make_step(copy.deepcopy(base), views, ours=True, device=device)
    for _ in range(args.warmup):
        ref_step()
        our_step()
    ref_t, our_t = [], []
    for _ in range(args.iters):
        ref_t.append(ref_step())
        our_t.append(our_step())
    ref_s, our_s = min(ref_t), min(our_t)
    speedup = ref_s / our_s
    ref_med, our_med = statistics.median(ref_t), statistics.median(our_t)
    return {
        "ref_step_s": round(ref_s, 5),
        "ours_step_s": round(our_s, 5),
        "speedup": round(speedup, 3),
        "ref_median_s": round(ref_med, 5),
        "ours_median_s": round(our_med, 5),
        "speedup_median": round(ref_med / our_med, 3),
        "target": TARGET,
        "pass": bool(speedup >= TARGET),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "arch": args.arch,
        "batch": args.batch,
        "size": args.size,
        "iters": args.iters,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--K", type=int, default=4096, help="queue length (a multiple of --batch)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.K % args.batch:
        parser.error(f"--K {args.K} must be a multiple of --batch {args.batch}")
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif args.device == "cuda":
        parser.error("--device cuda requested but CUDA is not available")
    results = []
    for device in devices:
        res = bench(args, device)
        print(json.dumps(res), flush=True)
        results.append(res)
    return results


if __name__ == "__main__":
    main()
