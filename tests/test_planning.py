"""Planning composes each variant's study config once (analysis.compose.composed_settings), with Hydra's result.

Hydra's ``compose`` costs ~0.09 s CPU, and a plan asks for a variant's settings from the grid checks and from
the table and figure inputs, so analysis.tables.variant_settings composes through a per-process cache that also
shares Hydra's work between variants with the same config-group choices. These tests check that each distinct
override list is composed once, and that the cache changes nothing: the same settings (or the same error) as
Hydra for every variant of the shipped configs and for unusual overrides, and the same dry-run, job for job
and command for command, as planning without it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from test_workflow import _relocate  # results paths moved under tmp_path, as the workflow tests do

from analysis import compose, tables

REPO = Path(__file__).resolve().parents[1]
CONF = str(tables.STUDY_CONF.resolve())
# Prints, after the plan, how often each override list was composed and how often Hydra's compose ran.
COUNTING_PLAN = """
import atexit, collections, json, sys
from analysis import compose, tables
composed, asked = collections.Counter(), collections.Counter()
split, cached = compose._compose_split, compose.composed_settings
compose._compose_split = lambda d, o: (composed.update([o]), split(d, o))[1]
tables.composed_settings = lambda d, o: (asked.update([tuple(o)]), cached(d, o))[1]
atexit.register(lambda: print("COUNTS " + json.dumps({"composed": [[list(k), n] for k, n in composed.items()],
    "asked": sum(asked.values()), "hydra": compose.COMPOSE_CALLS["hydra"]})))
from snakemake.cli import main
sys.argv = ["snakemake", *sys.argv[1:]]
main()
"""


def _variant_overrides(path: str) -> list[tuple[str, ...]]:
    cfg = yaml.safe_load((REPO / path).read_text())
    pre = [str(o) for o in cfg["pretrain"]["overrides"]]
    return [tuple(pre + [str(o) for o in v]) for v in cfg["variants"].values()]


# adds, deletions, dict values, group switches, repeats, interpolations, a hydra key; then errors: a typo, an
# unknown group option, a sweep, adding a key that exists
UNUSUAL = [(), ("+foo=1",), ("~knn",), ("crop={max_iou: 0.2}",),
           ("method=mochi", "optim=sgd_step", "mochi.n=3"),
           ("epochs=3", "method=knn_moco", "epochs=5"), ("model=resnet50", "~model"), ("++crop.max_iou=0.4",),
           ("crop.size=${crop.small_size}",), ("seed=null",), ("batch_size='64'",), ("hydra.job.name=x",),
           ("crop.max_iuo=0.3",), ("method=nope",), ("knn.k=1,5",), ("+crop.max_iou=0.4",)]  # fmt: skip


def _outcome(fn, overrides: tuple[str, ...]):
    try:
        return fn(CONF, overrides)
    except Exception as exc:  # compared: the same error type and message, or the same settings
        return type(exc).__name__, str(exc)


def test_cached_composition_equals_hydra_for_every_shipped_variant_and_unusual_overrides(monkeypatch):
    for name in ("_SETTINGS", "_BASES", "_PARSED"):
        monkeypatch.setattr(compose, name, {})
    lists = _variant_overrides("config.yaml") + _variant_overrides("workflow/configs/paper.yaml") + UNUSUAL
    for overrides in lists:
        assert _outcome(compose.composed_settings, overrides) == _outcome(compose.hydra_settings, overrides), overrides


def _jobs(dry_run: str) -> list[str]:
    """The dry-run's job blocks without job ids, sorted: snakemake's print order (and so its ids) follows
    object hashes, which move with any change of allocations in the process."""
    return sorted(re.sub(r"(?m)^\s*jobid: \d+$", "", block).strip() for block in dry_run.split("\n\n"))


def _dry_run(cfg_path: Path, cached: bool, counting: bool = False) -> str:
    # a fixed hash seed: snakemake lists a job's reasons (sets of files) in their hash order
    env = {**os.environ, compose.NO_CACHE_ENV: "" if cached else "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-c", COUNTING_PLAN] if counting else [sys.executable, "-m", "snakemake"]
    res = subprocess.run([*cmd, "-n", "-p", "--cores", "1", "--configfile", str(cfg_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # the run's date, id and command line, and each job's timestamp, differ between any two runs
    return re.sub(r"(?m)^(\s*(Date|Workflow ID|Command):.*|\[\w{3} \w{3} .*\])$", "", res.stdout)


def test_plan_composes_each_variant_once_and_plans_the_same_jobs_as_without_the_cache(tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["variants"]["iou030_twin"] = copy.deepcopy(cfg["variants"]["iou030"])  # the same override list
    cfg["experiments"]["iou"]["variants"].append("iou030_twin")
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(_relocate(cfg, tmp_path)))

    cached = _dry_run(cfg_path, cached=True, counting=True)
    counts = json.loads(cached.rsplit("COUNTS ", 1)[1])
    composed = {tuple(k): n for k, n in counts["composed"]}
    assert set(composed.values()) == {1}  # every override list composed once
    used = {v for e in cfg["experiments"].values() for v in e["variants"]}
    pre = tuple(cfg["pretrain"]["overrides"])
    assert set(composed) == {pre + tuple(cfg["variants"][v]) for v in used}  # the twins share one
    assert counts["asked"] > len(composed)  # asked again (the twin, the report's inputs): the cache answers
    groups = {tuple(o for o in k if o.split("=")[0] in ("method", "model", "optim")) for k in composed}
    assert counts["hydra"] == len(groups)  # Hydra composes once per config-group choice

    plain = _dry_run(cfg_path, cached=False)
    assert _jobs(cached.rsplit("COUNTS ", 1)[0]) == _jobs(plain)
    assert "iou030_twin" in plain
