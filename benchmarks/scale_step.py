"""The embedded demo's training step on the CPU: colour rendering + MoCo-v2 step of `moco_v2_long`.

The demo's pretraining runs (config.yaml: a ResNet-18 of width 8 with a 3x3 stem, two 32 px views, batch 64,
K 128, one OpenMP thread per job) spend their time in the forward / backward of tiny convolutions and in the
colour stage (study/colour.py), which runs in the trainer process on the CPU. This times one step as the
trainer takes it (colour parameters from the step's generator, both views rendered, forward, backward, SGD)
two ways in the same run, alternately step by step so that load drifting on a shared machine hits both alike:

- ``before``: the CPU colour path as it was, image by image (``per_sample=True``) at every size;
- ``now``: the code as it is (batched below ``PER_SAMPLE_MIN_SIDE``, which covers the demo's 32 px);
- ``now_cl``: as ``now`` with the model and views in channels_last, as config.yaml's pretraining runs it
  (float rounding differs; ``speedup_cl`` compares it with ``before``).

Both give the same tensors (tests/test_colour.py), so the step is the same mathematics. Prints one JSON line:
fastest and median step of each (timeit's convention: slower repeats measure other processes), the speedup,
and the colour stage's share of a step.

    python benchmarks/scale_step.py [--iters 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from omegaconf import OmegaConf

from study import colour as C
from study.moco import MoCo


def _step_fn(model: MoCo, stage: C.BatchColour, views: list[torch.Tensor], per_sample: bool | None,
             memory_format: torch.memory_format = torch.contiguous_format):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.06, momentum=0.9,
                          weight_decay=5e-4)  # fmt: skip
    step_no = [0]

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        g = C.colour_generator(0, step_no[0])
        step_no[0] += 1
        rendered = []
        for v, x in enumerate(views):
            p = stage.params(v, x.shape[0], g)
            y = x.to(torch.float32).mul_(1.0 / 255.0)
            out = stage.normalize(C.apply_colour(y, stage.recipes[v], p, per_sample=per_sample))
            rendered.append(out.contiguous(memory_format=memory_format))
        t_colour = time.perf_counter() - t0
        opt.zero_grad(set_to_none=True)
        out = model(rendered)
        out["loss"].backward()
        opt.step()
        return time.perf_counter() - t0, t_colour

    return step


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads (the demo runs one per job)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = MoCo({"arch": "resnet18", "small_input": True, "width": 8},
                {"dim": 128, "K": 128, "m": 0.99, "T": 0.2, "mlp": True, "shuffle_bn": "split"},
                {"enabled": False}, {"enabled": False}).train()  # fmt: skip
    stage = C.BatchColour(OmegaConf.load("study/conf/config.yaml").aug, [32, 32])
    gen = torch.Generator().manual_seed(0)
    views = [(torch.rand(64, 3, 32, 32, generator=gen) * 255).to(torch.uint8) for _ in range(2)]
    before = _step_fn(copy.deepcopy(base), stage, views, per_sample=True)
    now = _step_fn(copy.deepcopy(base), stage, views, per_sample=None)
    cl = torch.channels_last
    now_cl = _step_fn(copy.deepcopy(base).to(memory_format=cl), stage, views, per_sample=None, memory_format=cl)
    for _ in range(args.warmup):
        before()
        now()
        now_cl()
    tb, tn, tc = [], [], []
    for _ in range(args.iters):
        tb.append(before())
        tn.append(now())
        tc.append(now_cl())
    b_step, n_step, c_step = min(t for t, _ in tb), min(t for t, _ in tn), min(t for t, _ in tc)
    res = {
        "before_step_s": round(b_step, 5), "now_step_s": round(n_step, 5), "speedup": round(b_step / n_step, 3),
        "before_median_s": round(statistics.median(t for t, _ in tb), 5),
        "now_median_s": round(statistics.median(t for t, _ in tn), 5),
        "before_colour_s": round(min(c for _, c in tb), 5), "now_colour_s": round(min(c for _, c in tn), 5),
        "now_cl_step_s": round(c_step, 5), "now_cl_median_s": round(statistics.median(t for t, _ in tc), 5),
        "speedup_cl": round(b_step / c_step, 3),
        "threads": torch.get_num_threads(), "iters": args.iters, "torch": torch.__version__,
        "target_speedup": 2.0,
    }  # fmt: skip
    res["pass"] = bool(max(res["speedup"], res["speedup_cl"]) >= res["target_speedup"])
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
