"""The workflow's DAG construction: the grid it plans and the config errors it must stop on (snakemake -n)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from analysis.target_settings import runs_alone

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _relocate(obj, root: Path):
    """Point every `results...` path of a config into `root`, so existing results/ cannot change the plan."""
    if isinstance(obj, dict):
        return {k: _relocate(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relocate(v, root) for v in obj]
    if isinstance(obj, str) and (obj == "results" or obj.startswith("results/")):
        return str(root / obj)
    return obj


def _dry_run(tmp_path: Path, cfg: dict) -> subprocess.CompletedProcess:
    cfg = _relocate(cfg, tmp_path)
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [*SNAKEMAKE, "-n", "--cores", "1", "--configfile", str(cfg_path), "--quiet", "rules"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def default_cfg() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_dry_run_plans_one_pretraining_job_per_dataset_variant_pair(tmp_path, default_cfg):
    res = _dry_run(tmp_path, default_cfg)
    assert res.returncode == 0, res.stderr
    pairs = {(d, v) for e in default_cfg["experiments"].values() for d in e["datasets"] for v in e["variants"]}
    used = {d for d, _ in pairs}
    counts = _job_counts(res.stdout)
    assert counts["pretrain"] == len(pairs)
    assert counts["shards"] == counts["subset"] == counts["stats"] == len(used)
    assert counts["synthetic_world"] == 1


@pytest.mark.parametrize(
    "section, key, root",
    [("datasets", "syn_coco", "/nonexistent/coco2017"), ("targets", "syn_voc_svm", "/nonexistent/VOCdevkit")],
)
def test_missing_root_fails_at_dag_construction_naming_key_and_path(tmp_path, default_cfg, section, key, root):
    cfg = copy.deepcopy(default_cfg)
    cfg[section][key].update(synthetic=False, root=root)
    res = _dry_run(tmp_path, cfg)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert f"{section}.{key}.root" in out and root in out


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda c: c["datasets"]["syn_in"].update(format="imagenet21k"), "imagenet21k"),
        (lambda c: c["datasets"]["syn_in"]["subset"].update(rule="pareto"), "pareto"),
        (lambda c: c["experiments"]["iou"]["variants"].append("no_such_variant"), "no_such_variant"),
        (lambda c: c["shards"].pop("max_per_shard"), "max_per_shard"),
        (lambda c: c["pretrain"]["monitor"].update(target="no_such_target"), "pretrain.monitor.target"),
    ],
    ids=["unknown-format", "unknown-subset-rule", "unknown-variant", "missing-key", "unknown-monitor-target"],
)
def test_bad_config_is_rejected_with_the_offending_value(tmp_path, default_cfg, mutate, needle):
    cfg = copy.deepcopy(default_cfg)
    mutate(cfg)
    res = _dry_run(tmp_path, cfg)
    assert res.returncode != 0
    assert needle in res.stdout + res.stderr


def _job_counts(stdout: str) -> dict[str, int]:
    counts = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def test_paper_config_plans_every_experiment_with_its_transfer_jobs_once_roots_exist(tmp_path):
    cfg = yaml.safe_load((REPO / "workflow/configs/paper.yaml").read_text())
    for section in ("datasets", "targets"):
        for name, entry in cfg[section].items():
            root = tmp_path / "roots" / section / name
            root.mkdir(parents=True)
            entry["root"] = str(root)
    res = _dry_run(tmp_path, cfg)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "synthetic_world" not in res.stdout  # the paper grid does not inherit the embedded datasets
    counts = _job_counts(res.stdout)
    pairs = {(d, v) for e in cfg["experiments"].values() for d in e["datasets"] for v in e["variants"]}
    assert counts["pretrain"] == len(pairs)
    # built once, with COCO: Tables 4 and 9 fine-tune it beside their COCO models (the paper's Rand. init. rows)
    assert [p for p in pairs if p[1] == "random_init"] == [("coco", "random_init")]
    batched, alone = set(), set()
    for exp, spec in cfg["experiments"].items():
        assert spec.get("targets"), f"experiments.{exp} evaluates nothing"
        for d in spec["datasets"]:
            for v in spec["variants"]:
                for t in spec["targets"]:
                    (alone.add((d, v, t)) if runs_alone(cfg["targets"][t], cfg) else batched.add((d, v)))
    assert counts["transfer"] == len(batched)  # one job per checkpoint for its frozen-feature targets
    sgd = {(d, v, t) for d, v, t in alone if cfg["targets"][t].get("recipe") == "moco_sgd"}
    assert sgd and counts["linear_sgd"] == len(sgd)  # ImageNet linear on GPUs: a job of its own per checkpoint
    ft = {(d, v, t) for e in cfg["experiments"].values() for d in e["datasets"] for v in e["variants"]
          for t in e["targets"] if cfg["targets"][t]["protocol"].startswith("finetune_")}  # fmt: skip
    assert {t for _, _, t in ft} == {"voc_seg_ft", "cityscapes_seg_ft", "nyud_seg_ft", "voc_det_ft", "nyud_depth_ft"}
    assert counts["finetune"] == len(ft)  # on GPUs: one job per checkpoint x fine-tuning target
    assert counts["tables"] == counts["figures"] == 1


def test_finetune_jobs_get_the_gpu_launcher_and_their_own_state(tmp_path, default_cfg):
    """transfer.finetune_resources.gpu > 1 runs a fine-tuning job under torchrun (DDP), as pretraining does."""
    cfg = copy.deepcopy(default_cfg)
    cfg["transfer"]["finetune_resources"] = {"threads": 8, "gpu": 4}
    cfg = _relocate(cfg, tmp_path)
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "results" / "transfer" / "syn_in" / "moco_v2_long" / "syn_voc_det_ft.json"
    res = subprocess.run([*SNAKEMAKE, str(out), "-n", "-p", "--cores", "8", "--configfile", str(cfg_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    cmd = next(line for line in res.stdout.splitlines() if "-m analysis.finetune" in line)
    assert "torchrun --standalone --nproc_per_node=4" in cmd and "OMP_NUM_THREADS=2" in cmd
    assert "--state-dir " + str(tmp_path / "results" / "finetune" / "syn_in" / "moco_v2_long" / "syn_voc_det_ft") in cmd


def test_one_transfer_rule_takes_resources_for_every_checkpoint_and_writes_a_manifest(tmp_path, default_cfg):
    """`--set-resources transfer:...` reaches every frozen-feature job (they were 22 rules with 22 names)."""
    cfg = _relocate(copy.deepcopy(default_cfg), tmp_path)
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([*SNAKEMAKE, "-n", "-p", "--cores", "2", "--configfile", str(cfg_path), "--set-resources",
                          "transfer:mem_mb=1234"], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    blocks = [b for b in res.stdout.split("\n\n") if "rule transfer:" in b]
    pairs = {(d, v) for e in cfg["experiments"].values() for d in e["datasets"] for v in e["variants"]
             if any(not runs_alone(cfg["targets"][t], cfg) for t in e.get("targets", []))}  # fmt: skip
    assert len(blocks) == len(pairs) == _job_counts(res.stdout)["transfer"]
    assert all("mem_mb=1234" in b and "frozen-targets.json" in b and "--manifest " in b for b in blocks)


def test_only_experiments_plans_one_experiment_and_names_unknown_ones(tmp_path, default_cfg):
    cfg = copy.deepcopy(default_cfg)
    cfg["only_experiments"] = "augmentation"
    res = _dry_run(tmp_path, cfg)
    assert res.returncode == 0, res.stdout + res.stderr
    counts = _job_counts(res.stdout)
    variants = default_cfg["experiments"]["augmentation"]["variants"]
    assert counts["pretrain"] == len(variants) and counts["shards"] == 1
    assert counts["transfer"] == len(variants)  # one job per checkpoint
    cfg["only_experiments"] = ["augmentation", "table7"]
    res = _dry_run(tmp_path, cfg)
    assert res.returncode != 0 and "only_experiments: ['table7']" in res.stdout + res.stderr


def test_unfair_comparison_stops_the_dry_run_naming_experiment_and_key(tmp_path, default_cfg):
    cfg = copy.deepcopy(default_cfg)
    cfg["variants"]["mochi_128_1024_512"].append("epochs=5")
    res = _dry_run(tmp_path, cfg)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "experiments.mochi" in out and "'epochs'" in out and "mochi_128_1024_512: epochs=5" in out


SCHEMA_FAULTS = {
    "unknown-format": (
        lambda c: c["datasets"]["syn_in"].update(format="imagenet21k"),
        "config key datasets.syn_in.format: 'imagenet21k' is not one of "
        "['imagenet', 'coco', 'openimages', 'bdd100k']",
    ),
    "top-level-typo": (
        lambda c: c.update(only_experiment="iou"),
        "config key only_experiment: unknown key (value 'iou'); did you mean 'only_experiments'?",
    ),
    "wrong-type": (
        lambda c: c["shards"].update(workers="two"),
        "config key shards.workers: 'two' is not of type 'integer'",
    ),
    "subset-rule-missing-key": (
        lambda c: c["datasets"]["syn_in"]["subset"].pop("per_class"),
        "config key datasets.syn_in.subset: 'per_class' is required for rule uniform",
    ),
}


def _error_text(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]


@pytest.mark.parametrize("fault", list(SCHEMA_FAULTS))
def test_schema_error_is_one_line_naming_the_key_without_a_schema_dump(tmp_path, default_cfg, fault):
    mutate, line = SCHEMA_FAULTS[fault]
    cfg = copy.deepcopy(default_cfg)
    mutate(cfg)
    res = _dry_run(tmp_path, cfg)
    out = _error_text(res)
    assert res.returncode != 0
    text = "\n".join(out)
    assert [x for x in out if x.startswith("config key")] == [line], text
    assert len(out) < 15 and "Failed validating" not in text and "schema[" not in text, text


def test_every_schema_error_is_reported_at_once(tmp_path, default_cfg):
    cfg = copy.deepcopy(default_cfg)
    for mutate, _line in SCHEMA_FAULTS.values():
        mutate(cfg)
    res = _dry_run(tmp_path, cfg)
    out = _error_text(res)
    assert res.returncode != 0
    want = sorted(line for _mutate, line in SCHEMA_FAULTS.values())
    assert sorted(x for x in out if x.startswith("config key")) == want
    assert "(4 problems)" in res.stdout + res.stderr and len(out) < 15, "\n".join(out)


TARGET_FAULTS = {
    "target-without-size": (
        lambda c: c["targets"]["syn_cls_knn"].pop("image_size"),
        "config key targets.syn_cls_knn.image_size: required for protocol 'knn': the input size depends on the data",
    ),
    "misspelt-target-key": (
        lambda c: c["targets"]["syn_voc_seg_ft"].update(head_chanels=32),
        "config key targets.syn_voc_seg_ft.head_chanels: unknown key for protocol 'finetune_seg'; did you mean "
        "'head_channels'?",
    ),
}


@pytest.mark.parametrize("fault", list(TARGET_FAULTS))
def test_a_bad_target_spec_stops_the_plan_in_one_line(tmp_path, default_cfg, fault):
    """A target that would silently run at 224 px (or ignore a misspelt key) never reaches a job."""
    mutate, line = TARGET_FAULTS[fault]
    cfg = copy.deepcopy(default_cfg)
    mutate(cfg)
    res = _dry_run(tmp_path, cfg)
    out = _error_text(res)
    assert res.returncode != 0
    hits = [x for x in out if x.startswith("config key")]
    assert len(hits) == 1 and hits[0].startswith(line), "\n".join(out)
    assert len(out) < 10 and "Traceback" not in res.stderr, "\n".join(out)


def test_schema_defaults_are_still_set_in_the_config(tmp_path, default_cfg):
    cfg = copy.deepcopy(default_cfg)
    for key in ("workers", "shuffle_seed"):
        cfg["shards"].pop(key, None)
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(_relocate(cfg, tmp_path)))
    probe = tmp_path / "Snakefile"  # the real Snakefile, then print the config it left
    probe.write_text(
        f'import json\n\n\ninclude: "{REPO / "Snakefile"}"\n\n\n'
        'print("SHARDS=" + json.dumps(config["shards"]), flush=True)\n'
    )
    res = subprocess.run(
        [*SNAKEMAKE, "-s", str(probe), "--configfile", str(cfg_path), "--list-rules"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    printed = next(x for x in res.stdout.splitlines() if x.startswith("SHARDS="))
    shards = json.loads(printed.removeprefix("SHARDS="))
    assert shards["workers"] == 1 and shards["shuffle_seed"] == 0
