"""The demo's longest job, `moco_v2_long`, through the real trainer: its old execution settings vs config.yaml's.

`benchmarks/scale_step.py` times the step's arithmetic on random tensors; this runs `python -m study.train` on
the demo's syn_in shards with exactly the overrides config.yaml gives `moco_v2_long`, for ``--steps`` steps
(monitor off), two ways in the same run, alternating:

- ``before``: the execution settings the demo had (one loader worker, contiguous tensors);
- ``now``: config.yaml's (no loader worker, channels_last).

Both read the same batches (num_workers changes no batch: the weights are byte-identical, see the README); the
memory format changes float rounding only. Reported per variant (median of ``--repeats``): the training loop's
seconds per step (metrics.csv ``wall_s`` between the first and the last logged step) and the process tree's CPU
seconds per step (user + sys, start-up included, so a loader worker's cost shows), and the ratios.

    python benchmarks/demo_pretrain.py [--steps 200] [--repeats 2]

Needs the syn_in shards (built here with the workflow if missing: `snakemake results/data/syn_in/shards`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"before": ["num_workers=1", "channels_last=false"], "now": []}


def _overrides(cfg: dict, shards: Path) -> list[str]:
    return [*cfg["pretrain"]["overrides"], *cfg["variants"]["moco_v2_long"], f"data.shards={shards}"]


def _run(args: list[str], out: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "study.train", *args, f"out_dir={out}", "progress=false"],
                         cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        sys.exit(f"study.train failed:\n{res.stderr[-3000:]}")
    with open(out / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["loss"]]
    first, last = rows[0], rows[-1]
    steps = int(last["step"]) - int(first["step"])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"step_s": (float(last["wall_s"]) - float(first["wall_s"])) / steps, "cpu_s_per_step": cpu / int(last["step"]),
            "wall_s": wall}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shards", type=Path, default=REPO / "results" / "data" / "syn_in" / "shards")
    args = ap.parse_args(argv)
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    if not (args.shards / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--quiet", "all", str(args.shards)],
                       cwd=REPO, check=True)  # fmt: skip
    base = [*_overrides(cfg, args.shards), f"max_steps={args.steps}", "monitor.every=0", "log_every=10"]
    got: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    tmp = Path(tempfile.mkdtemp(prefix="demo_pretrain_"))
    try:
        for r in range(args.repeats):
            for name, extra in VARIANTS.items():
                got[name].append(_run(base + extra, tmp / f"{name}{r}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {n: {k: round(statistics.median(x[k] for x in runs), 4) for k in runs[0]} for n, runs in got.items()}
    res = {
        "before": med["before"], "now": med["now"], "steps": args.steps, "repeats": args.repeats,
        "step_speedup": round(med["before"]["step_s"] / med["now"]["step_s"], 3),
        "cpu_speedup": round(med["before"]["cpu_s_per_step"] / med["now"]["cpu_s_per_step"], 3),
        "spread": {n: [round(x["step_s"], 4) for x in runs] for n, runs in got.items()},
    }  # fmt: skip
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
