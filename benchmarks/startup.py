"""Start-up cost of every job entry point: CPU seconds from process start to the first useful work.

Every Snakemake job is a fresh ``python -m <entry point>`` process, so what an entry point imports before it does
anything is paid once per job (~83 jobs in the embedded demo, ~150 in the test suite's scale-model DAG). For each
entry point that a rule runs (rules/*.smk: data, pretrain, transfer, report, inspect) this measures, as the CPU
time (user + sys, ``resource.getrusage(RUSAGE_CHILDREN)`` deltas around each child) of a fresh interpreter:

* ``help_s``: ``python -m X --help``: parsing the command line (what a usage error or ``--help`` costs);
* ``ready_s``: ``python -c "import X; import <work imports>"``: the entry point's module plus every module its
  job loads before (or at) its first unit of work, wherever in the code it is imported (module top or inside a
  function): ``WORK_IMPORTS`` below names them per entry point, taken from the code path of the job as the
  rules run it. Jobs that take a ``torch.optim`` step (pretraining, fine-tuning, and the linear probes: LBFGS or
  SGD, which every frozen-target job of the demo fits) list ``torch._dynamo``: torch imports it at an
  optimiser's first ``add_param_group`` / ``step`` whatever this project does, so it is counted, not hidden;
  modules that only some targets need (scipy.ndimage for DAVIS boundary F, torchvision's detection models for
  ``finetune_det``, scikit-learn for ``voc07_svm``) are not.

next to the floor, ``python -c "import torch"``, measured in the same run, interleaved with the entry points, and
``optim_floor_s``, ``python -c "import torch, torch._dynamo"``: what any job that takes a ``torch.optim`` step
pays at least (``ratio_to_optim_floor``), so a ratio above the target can be told apart from this project's cost.
Each child runs ``--repeat`` times (after one warm-up run that also fills the byte-code caches) and the median
is reported. ``ratio`` = max(help_s, ready_s) / floor; ``pass``: ratio <= ``--target`` (1.5, issue 22).
The children run with ``OMP_NUM_THREADS=1`` in the repository root given by ``--root`` (its folder first on
``PYTHONPATH``), so another checkout can be measured with this script, e.g. the code before a change::

    python benchmarks/startup.py [--repeat 3] [--root /path/to/checkout] [--only analysis.transfer]

Prints one JSON object: {floor_s, target, entry_points: [{module, help_s, ready_s, ratio, pass, ...}], pass}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.5

# entry point -> modules its job imports on its way to the first unit of work (besides the module itself)
WORK_IMPORTS: dict[str, list[str]] = {
    # data.smk
    "data_prep.synthetic": ["yaml", "h5py", "scipy.io", "analysis.dense_targets"],  # the world has NYUD (.mat/.h5)
    "data_prep.subsets": [],
    "data_prep.shards": [],
    "data_prep.stats": ["data_prep.shards"],
    # pretrain.smk: the model, the loader, the batched colour pipeline, TensorBoard, the SGD step
    "study.train": ["study.models", "study.mechanisms", "study.data", "study.colour", "study.augment", "tqdm",
                    "torch.utils.tensorboard", "torch._dynamo"],
    # transfer.smk (rules transfer and linear_sgd): the backbone and the targets' readers, then a linear probe
    "analysis.transfer": ["study.models", "analysis.targets", "PIL.Image", "tqdm", "torch._dynamo"],
    # transfer.smk (rule finetune): backbone, dense readers and models, SGD / Adam
    "analysis.finetune": ["study.models", "analysis.dense_targets", "analysis.dense_models", "torch._dynamo"],
    # report.smk
    "analysis.tables": ["analysis.tables_sec4", "analysis.mechanism_k"],
    "analysis.figures": ["matplotlib", "seaborn", "matplotlib.figure", "matplotlib.patches", "PIL.Image",
                         "analysis.mechanism_k"],
    "analysis.embedding_stats": ["torch", "torchvision.transforms", "PIL.Image", "tqdm", "study.models",
                                 "analysis.tables"],
    # inspect.smk (on demand, not part of the demo): FiftyOne is the work itself
    "data_prep.inspect": ["fiftyone"],
}
OPTIONAL = {"torch.utils.tensorboard": "tensorboard", "fiftyone": "fiftyone", "h5py": "h5py"}  # extras


def _cpu_of(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    """User + sys CPU seconds of one child process; raises if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()[-2000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module.split(".")[0]) is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per child (the median is reported)")
    ap.add_argument("--root", type=Path, default=REPO, help="checkout whose entry points are measured")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the children")
    ap.add_argument("--target", type=float, default=TARGET, help="largest passing ratio to `import torch`")
    ap.add_argument("--only", nargs="*", default=None, help="entry points to measure (default: all)")
    args = ap.parse_args(argv)

    root = args.root.resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    modules = [m for m in WORK_IMPORTS if args.only is None or m in args.only]
    children: dict[tuple[str, str], list[str]] = {
        ("floor", "torch"): [args.python, "-c", "import torch"],
        ("floor", "torch._dynamo"): [args.python, "-c", "import torch, torch._dynamo"],
    }
    skipped: dict[str, list[str]] = {}
    for mod in modules:
        extra = [m for m in WORK_IMPORTS[mod] if m not in OPTIONAL or _installed(OPTIONAL[m])]
        skipped[mod] = [m for m in WORK_IMPORTS[mod] if m not in extra]
        children[("help", mod)] = [args.python, "-m", mod, "--help"]
        children[("ready", mod)] = [args.python, "-c", "; ".join(f"import {m}" for m in [mod, *extra])]

    for cmd in children.values():  # warm-up: byte-code caches, page cache
        _cpu_of(cmd, root, env)
    samples: dict[tuple[str, str], list[float]] = {k: [] for k in children}
    for _ in range(args.repeat):  # interleaved, so drifting load hits every child alike
        for key, cmd in children.items():
            samples[key].append(_cpu_of(cmd, root, env))

    med = {k: statistics.median(v) for k, v in samples.items()}
    floor, optim_floor = med[("floor", "torch")], med[("floor", "torch._dynamo")]
    rows = []
    for mod in modules:
        help_s, ready_s = med[("help", mod)], med[("ready", mod)]
        ratio = max(help_s, ready_s) / floor
        rows.append({
            "module": mod, "help_s": round(help_s, 3), "ready_s": round(ready_s, 3),
            "help_ratio": round(help_s / floor, 2), "ready_ratio": round(ready_s / floor, 2), "ratio": round(ratio, 2),
            "ratio_to_optim_floor": round(max(help_s, ready_s) / optim_floor, 2), "pass": ratio <= args.target, "work_imports": WORK_IMPORTS[mod], "not_installed": skipped[mod],
            "help_samples": [round(x, 3) for x in samples[("help", mod)]],
            "ready_samples": [round(x, 3) for x in samples[("ready", mod)]],
        })  # fmt: skip
    out = {
        "root": str(root), "python": args.python, "repeat": args.repeat, "floor": "python -c 'import torch'",
        "floor_s": round(floor, 3), "floor_samples": [round(x, 3) for x in samples[("floor", "torch")]],
        "optim_floor": "python -c 'import torch, torch._dynamo'", "optim_floor_s": round(optim_floor, 3),
        "target": args.target, "entry_points": rows, "pass": all(r["pass"] for r in rows),
    }  # fmt: skip
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
