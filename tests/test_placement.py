"""Routing with one knob and CPU layouts that fit (issue 19, part 2): analysis/placement.py and the plan.

The same behaviour on a real SLURM (partitions, --nodes, GPU counts from scontrol) is tests/test_slurm.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from analysis import placement
from analysis.scale_model import derive

REPO = Path(__file__).resolve().parents[1]
SITE = {"slurm": {"gpu_partition": "gpu", "cpu_partition": "cpu", "account": "proj123"}}


def test_site_resources_follow_the_gpus_a_job_asks_for():
    assert placement.site_resources(SITE, 4) == {"slurm_partition": "gpu", "slurm_account": "proj123"}
    assert placement.site_resources(SITE, 0) == {"slurm_partition": "cpu", "slurm_account": "proj123"}
    # unset keys add nothing: the cluster's default partition, the plugin's account guess
    assert placement.site_resources({"slurm": {"gpu_partition": "gpu"}}, 0) == {}
    assert placement.site_resources({}, 2) == {}
    assert placement.site_resources({"slurm": {"account": 123456}}, 1) == {"slurm_account": "123456"}


def test_gpu_job_holds_cpus_per_gpu_for_each_gpu_and_workers_must_fit():
    assert placement.job_threads({"threads": 32, "cpus_per_gpu": 8}, 4) == 32
    assert placement.job_threads({"threads": 32, "cpus_per_gpu": 8}, 1) == 8  # gpu: auto chose one GPU
    assert placement.job_threads({"threads": 3, "cpus_per_gpu": 8}, 0) == 3  # a CPU job keeps its threads
    placement.check_layout(32, 4, 7, "k")  # 7 workers + the process = 8 CPUs per GPU
    with pytest.raises(placement.PlacementError) as err:
        placement.check_layout(32, 4, 10, "pretrain num_workers")
    msg = str(err.value)
    assert msg.startswith("pretrain num_workers:") and "need 11 CPUs" in msg and "at most 7" in msg
    placement.check_layout(1, 0, 10, "k")  # a CPU-only job: workers are the user's business
    # OpenMP threads per process: the per-GPU CPUs less the workers; a CPU job's threads
    assert placement.omp_threads(32, 4, 7) == 1
    assert placement.omp_threads(32, 4, 0) == 8
    assert placement.omp_threads(8, 4, 0) == 2
    assert placement.omp_threads(3, 0, 5) == 3
    assert placement.omp_threads(4, 4, 7) == 1  # capped by --cores on a workstation: never below one


def _dry_run(cfg: dict, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "64", "--configfile",
                           str(path), *extra], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip


def _blocks(stdout: str) -> list[tuple[str, str, str]]:
    """(rule, resources line, shell command) of each planned job."""
    out = []
    for block in stdout.split("\n\n"):
        lines = block.strip().splitlines()
        rule = next((ln.split()[1].rstrip(":") for ln in lines if ln.startswith(("rule ", "localrule "))), None)
        if rule is None or rule == "all":
            continue
        res = next((ln for ln in lines if ln.strip().startswith("resources:")), "")
        cmd = "\n".join(ln for ln in lines if not ln.startswith((" ", "rule ", "localrule ", "[")))
        out.append((rule, res, cmd))
    return out


@pytest.fixture(scope="module")
def paper() -> dict:
    return yaml.safe_load((REPO / "workflow/configs/paper.yaml").read_text())


def test_paper_scale_model_routes_every_gpu_job_to_the_gpu_partition_on_one_node(paper, tmp_path):
    """One `slurm:` section routes the whole paper grid: jobs that hold GPUs to `gpu` with --nodes=1 and the
    paper's CPU layout (4 x 8 CPUs, 7 decoders + 1 OpenMP thread per process), every other job to `cpu`."""
    cfg = derive(paper, tmp_path / "results")
    cfg["slurm"] = dict(SITE["slurm"])
    cfg["only_experiments"] = ["mechanism", "mochi", "finetune"]
    cfg["pretrain"]["resources"] = dict(paper["pretrain"]["resources"], runtime=60)
    keep = [o for o in cfg["pretrain"]["overrides"] if not o.startswith(("num_workers=", "batch_size="))]
    cfg["pretrain"]["overrides"] = [*keep, "num_workers=7", "batch_size=4"]  # 4 GPUs x 4 = the tuned 16
    cfg["shards"]["min_shards"] = 28  # 7 workers x 4 GPUs read one subset
    for key in ("finetune_resources", "sgd_resources"):
        cfg["transfer"][key] = dict(paper["transfer"][key], runtime=60, gpu=2)
    cfg["transfer"]["resources"] = dict(paper["transfer"]["resources"])
    res = _dry_run(cfg, tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs = _blocks(res.stdout)
    rules = {r for r, _, _ in jobs}
    assert {"pretrain", "transfer", "finetune", "linear_sgd", "shards", "tables"} <= rules, rules
    for rule, resources, cmd in jobs:
        gpu = next((int(w.split("=")[1].rstrip(",")) for w in resources.split() if w.startswith("gpu=")), 0)
        assert ("slurm_account=proj123" in resources), (rule, resources)
        if gpu:
            assert "slurm_partition=gpu" in resources and "nodes=1" in resources, (rule, resources)
        else:
            assert "slurm_partition=cpu" in resources, (rule, resources)
        if rule == "pretrain" and gpu:
            assert gpu == 4 and "cpus_per_gpu=8" in resources
            assert "OMP_NUM_THREADS=1 exec torchrun --standalone --nproc_per_node=4" in cmd, cmd[:300]
            assert "num_workers=7" in cmd
        if rule == "pretrain" and "random_init" in cmd:
            assert gpu == 0  # the untrained baseline holds no GPU and goes to the CPU partition
        if rule in ("finetune", "linear_sgd"):
            assert gpu == 2 and "cpus_per_gpu=8" in resources
        if rule == "linear_sgd":  # its target sets no num_workers: 8 CPUs per process = 7 decoders + itself
            assert '"num_workers": 7' in cmd and "OMP_NUM_THREADS=1 exec torchrun" in cmd, cmd[:300]
    assert any(r == "pretrain" and "gpu=0" in res for r, res, _ in jobs)


def test_loader_workers_that_do_not_fit_the_cpus_per_gpu_stop_the_plan(paper, tmp_path):
    cfg = derive(paper, tmp_path / "results")
    cfg["only_experiments"] = "mechanism"
    cfg["pretrain"]["resources"] = {"threads": 1, "gpu": 2, "cpus_per_gpu": 4, "mem_mb": 1000, "runtime": 10}
    cfg["pretrain"]["overrides"] += ["num_workers=6", "batch_size=8"]
    res = _dry_run(cfg, tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert ("num_workers of variant 'moco_v2' (pretrain.overrides, variants): 6 loader workers per GPU process "
            "plus the process itself need 7 CPUs, but the job holds 4 per GPU") in out, out[-3000:]
