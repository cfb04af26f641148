"""Training targets in the batched transfer job (issue 22 part 3): on a CPU-only config, fine-tuning and MoCo's
SGD linear recipe run inside their checkpoint's `transfer` job (analysis.target_settings.runs_alone) instead of a
job each, with the result, state directory and numbers of the job they would have had; a signalled batch saves
the fine-tuning at its step and the retry resumes it exactly. GPU configs keep their own jobs (test_workflow).

The runs are tests/test_finetune.py's smallest (the synthetic VOC world, a width-8 ResNet-18) and
tests/test_linear_sgd_resume.py's recipe at toy size.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_finetune import make_checkpoint
from test_preemption import _step_of, _wait_for, one_thread  # noqa: F401  (one_thread: autouse fixture)
from test_workflow import SNAKEMAKE, _job_counts

from analysis import finetune, scale_model, transfer
from analysis import tables as T
from analysis.target_settings import MANIFEST, runs_alone, trains
from data_prep.synthetic import make_world, tiny_spec
from study.runstate import RETRY_EXIT

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # what the rules give a CPU job of `threads: 1`
STEPS = 40




@pytest.fixture(scope="module")
def bt(tmp_path_factory) -> dict:
    """A checkpoint, a frozen, a fine-tuning and an SGD linear target, and what their own jobs' CLIs write."""
    root = tmp_path_factory.mktemp("batched_training")
    world = make_world(root / "world", tiny_spec(), only=["voc", "cls"])
    ckpt = make_checkpoint(root / "c.pt")
    targets = {
        "svm": {"protocol": "voc07_svm", "format": "voc07", "root": str(world / "voc"), "image_size": 32},
        "seg": {"protocol": "finetune_seg", "format": "voc_seg", "root": str(world / "voc"), "steps": STEPS,
                "batch_size": 2, "crop_size": 32, "head_channels": 8, "head_dilation": 2, "save_every": 4},
        "sgd": {"protocol": "linear", "format": "imagefolder", "root": str(world / "cls"), "recipe": "moco_sgd",
                "image_size": 32, "epochs": 3, "milestones": [2], "batch_size": 4, "lr": 0.1, "num_workers": 0},
    }  # fmt: skip
    ref = root / "own_jobs"  # the commands of rules finetune and linear_sgd
    assert finetune.main(["--checkpoint", str(ckpt), "--name", "seg", "--target-json", json.dumps(targets["seg"]),
                          "--state-dir", str(ref / "finetune" / "seg"), "--out", str(ref / "seg.json"),
                          "--no-progress"]) == 0  # fmt: skip
    assert transfer.main(["--checkpoint", str(ckpt), "--name", "sgd", "--target-json", json.dumps(targets["sgd"]),
                          "--cache-dir", str(ref / "cache"), "--state-dir", str(ref / "linear_sgd" / "sgd"),
                          "--out", str(ref / "sgd.json"), "--no-progress"]) == 0  # fmt: skip
    return {"ckpt": ckpt, "targets": targets, "ref": ref,
            "results": {t: json.loads((ref / f"{t}.json").read_text()) for t in ("seg", "sgd")}}  # fmt: skip


def _argv(bt: dict, tmp: Path) -> list[str]:
    """The batched job's command (rule transfer on a CPU-only config)."""
    training = {"seg": {"state_dir": str(tmp / "finetune" / "seg"), "threads": 1},
                "sgd": {"state_dir": str(tmp / "linear_sgd" / "sgd"), "threads": 1}}  # fmt: skip
    return ["--checkpoint", str(bt["ckpt"]), "--targets-json", json.dumps(bt["targets"]), "--training-json",
            json.dumps(training), "--cache-dir", str(tmp / "cache"), "--out-dir", str(tmp / "out"), "--manifest",
            str(tmp / "out" / MANIFEST), "--no-progress"]  # fmt: skip


def _same_result(got: dict, want: dict, ignore: tuple[str, ...] = ()) -> None:
    """Equal records but for the run time and the batch's note (NaN-safe: compared as JSON text)."""
    assert got["batched"]["job"] == "transfer"
    drop = {"seconds", "batched", *ignore}
    a = {k: v for k, v in got.items() if k not in drop}
    b = {k: v for k, v in want.items() if k not in drop}
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_batched_training_targets_write_what_their_own_jobs_write(bt, tmp_path, caplog):
    # a process that drew from every global RNG before (as the batch's frozen targets may)
    torch.manual_seed(123), torch.rand(17), np.random.seed(7), np.random.rand(3), random.seed(5), random.random()
    argv = _argv(bt, tmp_path)
    with caplog.at_level("INFO", logger="analysis.transfer"):
        assert transfer.main(argv) == 0
    out = tmp_path / "out"
    for t in ("seg", "sgd"):
        _same_result(json.loads((out / f"{t}.json").read_text()), bt["results"][t])
    # the state where rule finetune keeps it, with the weights of the job of its own
    a = torch.load(tmp_path / "finetune" / "seg" / "state.pt", weights_only=True)
    b = torch.load(bt["ref"] / "finetune" / "seg" / "state.pt", weights_only=True)
    assert a["step"] == b["step"] == STEPS and all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert (tmp_path / "linear_sgd" / "sgd" / "state.pt").is_file()
    manifest = json.loads((out / MANIFEST).read_text())
    assert list(manifest["targets"]) == ["svm", "seg", "sgd"]  # the frozen target first, then the training ones
    assert manifest["targets"]["seg"]["value"] == bt["results"]["seg"]["value"]
    # a line per target: which starts, its state, its result
    assert re.search(r"\[2/3\] seg \(finetune_seg\) on .*\(training; state .*finetune/seg, 1 thread", caplog.text)
    assert re.search(r"seg mIoU = [0-9.]+ \(.*\) -> .*seg\.json", caplog.text)

    # the rerun (e.g. after a frozen target failed): finished training targets are not run again
    stamps = {t: (out / f"{t}.json").stat().st_mtime_ns for t in ("svm", "seg", "sgd")}
    caplog.clear()
    with caplog.at_level("INFO", logger="analysis.transfer"):
        assert transfer.main(argv) == 0
    for t in ("seg", "sgd"):
        assert f"{out / t}.json holds its result for this checkpoint and config; not run again" in caplog.text
        assert (out / f"{t}.json").stat().st_mtime_ns == stamps[t]
    assert (out / "svm.json").stat().st_mtime_ns != stamps["svm"]  # frozen targets are re-evaluated, as before
    assert json.loads((out / MANIFEST).read_text()) == manifest


def _batch_cli(bt: dict, tmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "analysis.transfer", *_argv(bt, tmp)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


@pytest.mark.slow  # two job processes (about 15 s here)
def test_a_batched_job_signalled_during_fine_tuning_resumes_it_exactly(bt, tmp_path):
    """SIGTERM (a time limit) while the batch fine-tunes: the state is saved at the current step, the job exits
    with the retry status, and the retry resumes the fine-tuning there and ends as the job of its own did."""
    state, out = tmp_path / "finetune" / "seg" / "state.pt", tmp_path / "out"
    proc = _batch_cli(bt, tmp_path)
    _wait_for(state.exists, proc, "the fine-tuning's first periodic save")
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == RETRY_EXIT, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    lines = [ln for ln in text.splitlines() if "received SIGTERM at step" in ln]
    assert len(lines) == 1, text[-3000:]
    stopped = int(re.search(rf"at step (\d+)/{STEPS}", lines[0]).group(1))
    assert 0 < stopped < STEPS and _step_of(state) == stopped
    assert (out / "svm.json").is_file()  # done before the signal
    assert not (out / "seg.json").exists() and not (out / "sgd.json").exists() and not (out / MANIFEST).exists()

    proc = _batch_cli(bt, tmp_path)  # Snakemake's retry
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, text[-3000:]
    assert f"resuming seg from step {stopped} of {STEPS}" in text
    seg = json.loads((out / "seg.json").read_text())
    assert seg["resumed_from_step"] == stopped
    _same_result(seg, bt["results"]["seg"], ignore=("resumed_from_step",))
    _same_result(json.loads((out / "sgd.json").read_text()), bt["results"]["sgd"])
    assert set(json.loads((out / MANIFEST).read_text())["targets"]) == {"svm", "seg", "sgd"}


# ------------------------------------------------------------------------------------------------- the plan


def _plan(cfg: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([*SNAKEMAKE, "-n", "-p", "--cores", "2", "--configfile", str(cfg_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_a_cpu_config_plans_training_targets_inside_the_transfer_jobs(tmp_path):
    """The scale model (gpu: 0 everywhere): no finetune or linear_sgd job; each checkpoint's transfer job carries
    its fine-tuning and SGD linear targets with the state directories of the rules they no longer get."""
    paper = yaml.safe_load((REPO / "workflow/configs/paper.yaml").read_text())
    cfg = scale_model.derive(paper, tmp_path / "results")
    cfg["only_experiments"] = "finetune"
    res = _plan(cfg, tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    counts = _job_counts(res.stdout)
    assert "finetune" not in counts and "linear_sgd" not in counts, counts
    spec = cfg["experiments"]["finetune"]
    assert counts["transfer"] == len(spec["datasets"]) * len(spec["variants"])
    trained = [t for t in spec["targets"] if trains(cfg["targets"][t])]
    assert not any(runs_alone(cfg["targets"][t], cfg) for t in trained)
    assert {cfg["targets"][t]["protocol"] for t in trained} >= {"finetune_seg", "finetune_depth", "linear"}
    blocks = [b for b in res.stdout.split("\n\n") if "rule transfer:" in b]
    assert len(blocks) == counts["transfer"]
    res_root = tmp_path / "results"
    for block in blocks:
        d, v = re.search(r"wildcards: dataset=(\S+), variant=(\S+)", block).groups()
        training = json.loads(re.search(r"--training-json '([^']*)'", block).group(1))
        targets = json.loads(re.search(r"--targets-json '([^']*)'", block).group(1))
        assert set(training) == set(trained) <= set(targets), block[-2000:]
        for t in trained:
            kind = "linear_sgd" if cfg["targets"][t].get("recipe") == "moco_sgd" else "finetune"
            assert training[t] == {"state_dir": str(res_root / kind / d / v / t), "threads": 1}
        assert "OMP_NUM_THREADS=1 exec" in block and "--manifest " in block


def test_cpu_and_gpu_configs_map_a_fine_tuning_result_to_its_job():
    """The tables' DAG files and hints follow the same switch: the manifest on CPU, the result itself on GPU."""
    paper = yaml.safe_load((REPO / "workflow/configs/paper.yaml").read_text())
    cpu = scale_model.derive(paper, "/r")
    path = T.transfer_path("/r", "coco", "moco_v2_800ep", "voc_det_ft")
    manifest = path.parent / MANIFEST
    assert T.transfer_dag_file(cpu, path) == str(manifest)
    assert T.make_hint(path, "/r", cpu).startswith(f"`snakemake -f {manifest}` (rule transfer")
    gpu = copy.deepcopy(paper)
    assert T.transfer_dag_file(gpu, path) == str(path)
    assert T.make_hint(path, "/r", gpu) == f"`snakemake {path}` (rule finetune)"
    sgd = T.transfer_path("/r", "coco", "moco_v2_800ep", "imagenet_linear")
    assert T.transfer_dag_file(cpu, sgd) == str(manifest) and T.transfer_dag_file(gpu, sgd) == str(sgd)
    # one GPU anywhere (the training job's or the transfer job's) keeps the job of its own
    for key in ("finetune_resources", "resources"):
        mixed = copy.deepcopy(cpu)
        mixed["transfer"][key] = dict(mixed["transfer"][key], gpu=1)
        assert runs_alone(mixed["targets"]["voc_det_ft"], mixed)
