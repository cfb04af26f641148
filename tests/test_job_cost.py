"""Cluster requests come from the work (analysis/job_cost.py): hand-checked estimates, the untrained baseline
asks for no GPU, and the paper grid's requests stay close to its estimated work."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from analysis import job_cost

REPO = Path(__file__).resolve().parents[1]
PAPER = yaml.safe_load((REPO / "workflow/configs/paper.yaml").read_text())


def test_pretraining_estimate_by_hand():
    cfg = {"datasets": {"coco": {"format": "coco", "subset": {"rule": "all"}}}, "estimate": {"safety": 1.0}}
    s = {"epochs": 200, "crop.size": 224, "model.arch": "resnet50"}
    req = job_cost.pretrain_request(cfg, "coco", s, gpus=4)
    v100_s = 200 * 118_287 / (200 * 1_281_167 / (53 * 3600) / 8)  # MoCo's anchor: ~168 img/s per V100
    assert req["gpu_hours"] == pytest.approx(v100_s / 3600)
    assert req["runtime"] == math.ceil(v100_s / 4 / 60 + 20) and req["attempts"] == 1 and req["gpu"] == 4
    # multi-crop 2 x 160 + 4 x 96: five queries (forward + backward, ~3 passes) and one key (1 pass)
    mc = job_cost.pretrain_request(cfg, "coco", {**s, "crop.size": 160, "crop.n_small": 4}, gpus=4)
    assert mc["gpu_hours"] / req["gpu_hours"] == pytest.approx((3 * (160**2 + 4 * 96**2) + 160**2) / (4 * 224**2))
    assert 1.05 < mc["gpu_hours"] / req["gpu_hours"] < 1.07
    assert job_cost.pretrain_request(cfg, "coco", {**s, "random_init": True}, gpus=4)["gpu"] == 0


def test_a_job_longer_than_the_partition_limit_runs_over_several_attempts():
    cfg = {"estimate": {"max_runtime": 600, "safety": 1.0, "overhead_min": 0}}
    assert job_cost.minutes(25 * 3600, 1, cfg) == (600, 3)  # 1,500 minutes at a 600-minute cap


def test_gpu_auto_takes_the_fewest_gpus_that_finish_in_time_and_divide_the_batch():
    cfg = {"estimate": {"target_hours": 10}}
    assert job_cost.choose_gpus(5 * 3600, 4, 16, cfg) == 1
    assert job_cost.choose_gpus(15 * 3600, 4, 16, cfg) == 2
    assert job_cost.choose_gpus(100 * 3600, 4, 16, cfg) == 4  # at most max_gpu
    assert job_cost.choose_gpus(15 * 3600, 4, 6, cfg) == 2 and job_cost.choose_gpus(35 * 3600, 4, 6, cfg) == 2


def test_image_counts_follow_the_subset_rule_or_ask_for_them():
    assert job_cost.dataset_images("a", {"format": "imagenet", "subset": {"rule": "uniform", "per_class": 118}}) == 118_000
    assert job_cost.dataset_images("a", {"format": "imagenet", "subset": {"rule": "long_tailed", "total": 9}}) == 9
    assert job_cost.dataset_images("a", {"format": "coco", "subset": {"rule": "all"}, "images": 5}) == 5
    with pytest.raises(job_cost.EstimateError, match="datasets.x.images"):
        job_cost.dataset_images("x", {"format": "custom", "subset": {"rule": "all"}})


def test_the_paper_grid_asks_for_about_what_it_needs():
    rows = job_cost.plan_requests(PAPER)
    by_rule = {r["rule"] for r in rows}
    assert by_rule == {"pretrain", "transfer", "finetune", "linear_sgd"}
    untrained = [r for r in rows if r["rule"] == "pretrain" and r["job"].endswith("/random_init")]
    assert untrained and all(r["gpu"] == 0 for r in untrained)
    cap = PAPER["estimate"]["max_runtime"]
    assert all(r["runtime"] <= cap for r in rows)
    trained = [r for r in rows if r["rule"] != "transfer" and r["gpu"]]
    work = sum(r["gpu_hours"] for r in trained)
    requested = sum(r["requested_gpu_hours"] for r in trained)
    assert work < requested < 2.0 * work  # the margin (safety 1.5, start-up) and no more
    sgd = [r for r in rows if r["rule"] == "linear_sgd"]
    assert 1_500 < sum(r["gpu_hours"] for r in sgd) < 2_500  # ImageNet linear: ~60 V100-hours per checkpoint
    depth = [r for r in rows if r["job"].endswith("/nyud_depth_ft")]
    assert depth and all(r["gpu"] == 1 for r in depth)  # 20 epochs of 795 images: one GPU, not four


def test_the_workflow_submits_the_estimates(tmp_path):
    cfg = yaml.safe_load((REPO / "workflow/configs/paper.yaml").read_text())
    for section in ("datasets", "targets"):
        for name, entry in cfg[section].items():
            (tmp_path / "roots" / section / name).mkdir(parents=True)
            entry["root"] = str(tmp_path / "roots" / section / name)
    cfg["results"] = str(tmp_path / "res")
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rows = {r["job"]: r for r in job_cost.plan_requests(cfg) if r["rule"] == "pretrain"}
    untrained = next(j for j in rows if j.endswith("/random_init"))  # the one dataset it is built for
    jobs = [untrained, "coco/moco_v2"]
    wanted = [f"{tmp_path}/res/pretrain/{j}/checkpoint.pt" for j in jobs]
    res = subprocess.run([sys.executable, "-m", "snakemake", *wanted, "-n", "--configfile", str(path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    jobs_text = re.split(r"(?m)^rule ", res.stdout)  # one chunk per planned job
    blocks = {b.split("wildcards: ")[1].split("\n")[0]: b for b in jobs_text if b.startswith("pretrain:")}
    for job in jobs:
        block = blocks["dataset={}, variant={}".format(*job.split("/"))]
        assert f"runtime={rows[job]['runtime']}," in block and f"gpu={rows[job]['gpu']}," in block
    assert rows[untrained]["gpu"] == 0 and rows["coco/moco_v2"]["gpu"] == 4
