"""Does the trainer learn? MoCo-v2 on syn_in against the untrained baseline, under the paper's protocol.

The demo's grid runs are a few dozen steps each (the 10-minute budget), too short to learn; its `mechanism`
runs do 1008 steps. This check repeats that recipe on its own, for 1224 steps and any seed (``--seed``), so the
gap can be measured without the grid. It trains the embedded study's scale model (a ResNet-18 of width 8 with
a 3x3 stem, 32 px crops, batch 64, K 128, m 0.99, constant lr 0.06 (MoCo's step schedule with no step
inside the run), weight decay 5e-4; read from ``config.yaml``: ``pretrain.overrides`` + ``variants.moco_v2_long``,
with the epochs and seed of this run) with ``study.train`` on the syn_in shards, writes the untrained baseline
of the same architecture (``method=random_init``), and evaluates both with the transfer stage's own kNN and
linear-probe code on the classification target, at 32 px, *without* BN recalibration (the paper's protocol:
the untrained baseline keeps its initial BN statistics). Prints one JSON line:

    python benchmarks/learning.py [--epochs 136] [--results results] [--out results/benchmarks/learning]

``gap_*`` = MoCo-v2 minus random init, in points. The inputs are the demo's (``results/data/syn_in/shards``,
``results/synthetic/cls``); missing ones are made with ``snakemake`` first. ``--smoke`` runs two epochs (tests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.transfer import run_target, write_json_atomic  # noqa: E402

CONFIG = REPO / "config.yaml"
RECIPE_VARIANT = "moco_v2_long"  # the demo's mechanism run: this check uses its recipe, so the two cannot drift
RUN_KEYS = ["log_every=20", "ckpt_every=1000", "progress=false"]  # output only: same weights either way


def recipe(config: Path) -> tuple[list[str], list[str]]:
    """(MoCo-v2 overrides, untrained-baseline overrides) as the workflow composes them for the demo's
    ``mechanism`` experiment: ``pretrain.overrides``, then the variant's own (later keys win in study.train)."""
    cfg = yaml.safe_load(config.read_text())
    try:
        base, variants = list(cfg["pretrain"]["overrides"]), cfg["variants"]
        return base + list(variants[RECIPE_VARIANT]), base + list(variants["random_init"])
    except (KeyError, TypeError) as exc:
        raise SystemExit(f"{config}: needs pretrain.overrides and variants.{RECIPE_VARIANT} / variants.random_init "
                         f"(missing {exc})") from None


def targets(cls_root: Path, image_size: int) -> dict[str, dict]:
    """The demo's two classification targets at the scale model's size, with the paper's BN handling."""
    base = {"format": "imagefolder", "root": str(cls_root), "image_size": image_size, "bn_recalibrate": False}
    return {"syn_cls_knn": {**base, "protocol": "knn"}, "syn_cls_linear": {**base, "protocol": "linear"}}


def ensure_inputs(results: Path, cores: int) -> tuple[Path, Path]:
    """The demo's syn_in shards and classification target, made by the workflow when missing."""
    shards, cls_root = results / "data" / "syn_in" / "shards", results / "synthetic" / "cls"
    if not (shards / "manifest.json").is_file() or not cls_root.is_dir():
        if results.resolve() != (REPO / "results").resolve():
            raise SystemExit(f"{shards} or {cls_root} is missing: run the workflow for that results folder, or "
                             "pass --shards and --cls-root")
        cmd = [str(Path(sys.executable).with_name("snakemake")), "--cores", str(cores), "--profile",
               "workflow/profiles/default", "results/data/syn_in/shards", "results/synthetic/world.json"]
        print("making the inputs:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, cwd=REPO, check=True)
    return shards, cls_root


def train(out: Path, shards: Path, overrides: list[str], threads: int) -> float:
    """One ``study.train`` run in its own process, as the workflow starts it; returns its wall time."""
    cmd = [sys.executable, "-m", "study.train", f"out_dir={out}", f"data.shards={shards}", *overrides]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise SystemExit(f"study.train failed ({' '.join(cmd)}):\n{(res.stdout + res.stderr)[-3000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path("results"), help="the demo's results folder")
    ap.add_argument("--shards", type=Path, help="syn_in shards (default: <results>/data/syn_in/shards)")
    ap.add_argument("--cls-root", type=Path, help="the classification target (default: <results>/synthetic/cls)")
    ap.add_argument("--out", type=Path, default=None, help="default: <results>/benchmarks/learning")
    ap.add_argument("--epochs", type=int, default=136, help="136 epochs of 600 images at batch 64 = 1224 steps")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", type=Path, default=CONFIG, help=f"study config whose {RECIPE_VARIANT} recipe is used")
    ap.add_argument("--smoke", action="store_true", help="2 epochs, batch 16, K 32 (the tests)")
    args = ap.parse_args(argv)
    if args.shards and args.cls_root:
        shards, cls_root = args.shards, args.cls_root
    else:
        shards, cls_root = ensure_inputs(args.results, cores=2)
    out = args.out or args.results / "benchmarks" / "learning"
    moco, untrained = recipe(args.config)
    run_keys = [*RUN_KEYS, f"epochs={2 if args.smoke else args.epochs}", f"seed={args.seed}"]
    if args.smoke:
        run_keys += ["batch_size=16", "moco.K=32"]
    runs = {"moco_v2": [*moco, *run_keys], "random_init": [*untrained, *run_keys]}
    record: dict = {"benchmark": "learning", "overrides": runs["moco_v2"], "image_size": args.image_size,
                    "bn_recalibrate": False}
    for name, overrides in runs.items():
        run_dir = out / name
        wall = train(run_dir, shards, overrides, args.threads)
        ckpt = run_dir / "checkpoint.pt"
        scores = {}
        for tname, tcfg in targets(cls_root, args.image_size).items():
            res = run_target(ckpt, tname, tcfg, out / "features", progress=False)
            write_json_atomic(res, out / name / f"{tname}.json")
            scores[tname] = round(100 * res["value"], 1)
            record["n_test"] = res["n_test"]
        record[name] = {"train_s": round(wall, 1), **scores}
    for t in ("syn_cls_knn", "syn_cls_linear"):
        record[f"gap_{t}"] = round(record["moco_v2"][t] - record["random_init"][t], 1)
    steps = [ln for ln in (out / "moco_v2" / "metrics.csv").read_text().splitlines()[1:] if ln]
    record["steps"] = int(steps[-1].split(",")[0]) if steps else 0
    write_json_atomic(record, out / "learning.json")
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
