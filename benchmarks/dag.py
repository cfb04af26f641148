"""Planning cost: CPU seconds of `snakemake -n` at about 250, 500 and 1,000 jobs, with and without the cache.

Builds study configs from workflow/configs/paper.yaml with stand-in roots in a temp folder (as
tests/test_workflow.py plans it) plus one experiment ``grid``: ``n`` extra variants on ``--grid-datasets`` of
the paper's datasets and two frozen-feature targets, so each extra variant adds a pretraining and a transfer
job per dataset. Every variant is a distinct override list (three methods, so three config-group choices,
times distinct IoU ceilings), the case where composition costs most. Each size is planned
(``snakemake -n --quiet rules`` in a subprocess) twice, back to back: with the plan's composition cache
(analysis/compose.py) and with ``SSL_PLAN_NO_COMPOSE_CACHE=1``, the composition as it was before (the baseline,
same run). Planning CPU = user + sys of the child (``RUSAGE_CHILDREN``), which the load of a shared machine
moves far less than wall time.

Prints JSON {sizes: [{jobs, variants, cpu_s, baseline_cpu_s, speedup, same_plan, ...}], target_cpu_s, pass};
pass: the largest plan (~1,000 jobs) takes at most ``--target`` CPU seconds with the cache, and every size
plans the same jobs (per-rule counts) both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.compose import NO_CACHE_ENV  # noqa: E402

METHODS = ("moco_v2", "knn_moco", "mochi")
GRID_TARGETS = ("cifar10_linear", "voc07_svm")


def study_config(root: Path, n_variants: int, n_datasets: int = 5) -> dict:
    """paper.yaml, stand-in roots under ``root``, and ``n_variants`` distinct variants on ``n_datasets``."""
    cfg = yaml.safe_load((REPO / "workflow" / "configs" / "paper.yaml").read_text())
    for section in ("datasets", "targets"):
        for name, entry in cfg[section].items():
            stand_in = root / "roots" / section / name
            stand_in.mkdir(parents=True, exist_ok=True)
            entry["root"] = str(stand_in)
    cfg["results"] = str(root / "results")
    cfg["transfer"]["cache"] = str(root / "results" / "features")
    names = [f"grid{i:04d}" for i in range(n_variants)]
    for i, name in enumerate(names):
        cfg["variants"][name] = [f"method={METHODS[i % len(METHODS)]}", "epochs=200",
                                 f"crop.max_iou={0.05 + 0.9 * i / max(1, n_variants):.4f}"]  # fmt: skip
    if names:
        cfg["experiments"]["grid"] = {"datasets": list(cfg["datasets"])[:n_datasets], "variants": names,
                                      "targets": list(GRID_TARGETS)}  # fmt: skip
    return cfg


def plan(cfg_path: Path, cached: bool) -> tuple[float, float, str]:
    """(CPU s, wall s, per-rule job counts) of one `snakemake -n` in a subprocess."""
    env = {**os.environ, NO_CACHE_ENV: "" if cached else "1"}
    before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile", str(cfg_path)]
    cmd += ["--quiet", "rules"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        raise SystemExit(f"snakemake -n failed for {cfg_path}:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rows = [ln.split() for ln in res.stdout.splitlines()]
    counts = "\n".join(" ".join(r) for r in rows if len(r) == 2 and r[1].isdigit())
    return cpu, wall, counts


def total_jobs(counts: str) -> int:
    return next(int(ln.split()[1]) for ln in counts.splitlines() if ln.split()[0] == "total")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="250,500,1000", help="approximate plan sizes (jobs), comma-separated")
    ap.add_argument("--grid-datasets", type=int, default=5, help="paper datasets the extra variants train on")
    ap.add_argument("--target", type=float, default=10.0, help="CPU seconds allowed for the largest plan")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the uncached plans")
    a = ap.parse_args(argv)

    sizes = []
    with tempfile.TemporaryDirectory(prefix="bench_dag_") as tmp:
        root = Path(tmp)
        paper = root / "paper.yaml"
        paper.write_text(yaml.safe_dump(study_config(root, 0)))
        base_jobs = total_jobs(plan(paper, cached=True)[2])  # also warms the page cache and imports
        per_variant = 2 * a.grid_datasets  # a pretraining and a transfer job per dataset
        for want in (int(x) for x in a.jobs.split(",")):
            n = max(1, round((want - base_jobs) / per_variant))
            cfg_path = root / f"study_{want}.yaml"
            cfg = study_config(root, n, a.grid_datasets)
            cfg_path.write_text(yaml.safe_dump(cfg))
            cpu, wall, counts = plan(cfg_path, cached=True)
            row = {"jobs": total_jobs(counts), "variants": len(cfg["variants"]), "cpu_s": round(cpu, 2),
                   "wall_s": round(wall, 2)}  # fmt: skip
            if a.baseline:
                base_cpu, base_wall, base_counts = plan(cfg_path, cached=False)
                row.update(baseline_cpu_s=round(base_cpu, 2), baseline_wall_s=round(base_wall, 2),
                           speedup=round(base_cpu / cpu, 2), same_plan=base_counts == counts)  # fmt: skip
            sizes.append(row)
    largest = max(sizes, key=lambda r: r["jobs"])
    result = {
        "paper_jobs": base_jobs,
        "grid_datasets": a.grid_datasets,
        "sizes": sizes,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
        "target_cpu_s": a.target,
        "pass": largest["jobs"] >= 1000 * 0.95 and largest["cpu_s"] <= a.target
        and all(r.get("same_plan", True) for r in sizes),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
