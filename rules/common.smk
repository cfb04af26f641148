# Shared helpers: config checks that must fail at DAG construction, quoting, the experiment grid.
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

PY = shlex.quote(sys.executable)
RES = config["results"]
ENV = "../workflow/envs/study.yaml"
DATASETS = config["datasets"]
VARIANTS = config["variants"]
TARGETS = config.get("targets", {})


def quoted_json(obj):
    """One shell word holding `obj` as JSON: rule params pass config sections to the package CLIs."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


if workflow.basedir not in sys.path:
    sys.path.insert(0, workflow.basedir)

from analysis.grid import GridError, check_grid, select_experiments
from analysis.tables import ReportConfigError
from analysis.target_settings import TargetSpecError, check_targets

try:
    select_experiments(config, config.get("only_experiments"))  # e.g. --config only_experiments=davis
except GridError as exc:
    raise WorkflowError(str(exc)) from None


def check_config():
    """Catch what the schema cannot: roots on disk and names that refer to other config keys."""
    try:  # every target's keys, types, ranges and input size against its protocol (analysis/target_settings.py)
        check_targets(TARGETS)
    except TargetSpecError as exc:
        raise WorkflowError(str(exc)) from None
    if any(d.get("synthetic") for d in DATASETS.values()) and "synthetic" not in config:
        raise WorkflowError("config: a dataset has `synthetic: true` but there is no `synthetic:` section; "
                            "add `synthetic: {out: results/synthetic}` or set the dataset's real root.")
    missing = [
        f"  config key datasets.{name}.root: '{ds['root']}' does not exist ({ds['format']} layout expected)"
        for name, ds in DATASETS.items()
        if not ds.get("synthetic") and not Path(ds["root"]).exists()
    ] + [
        f"  config key targets.{name}.root: '{t['root']}' does not exist ({t['format']} layout expected)"
        for name, t in TARGETS.items()
        if not t.get("synthetic") and not Path(t["root"]).exists()
    ]
    if missing:
        raise WorkflowError("dataset / target roots missing:\n" + "\n".join(missing) + "\nPoint each at the dataset on "
                            "disk (layouts: README, 'Datasets') or pass a --configfile with the right roots.")
    for exp, spec in config["experiments"].items():
        for d in spec["datasets"]:
            if d not in DATASETS:
                raise WorkflowError(f"config key experiments.{exp}.datasets: unknown dataset '{d}'; "
                                    f"defined: {sorted(DATASETS)}.")
        for v in spec["variants"]:
            if v not in VARIANTS:
                raise WorkflowError(f"config key experiments.{exp}.variants: unknown variant '{v}'; "
                                    f"defined: {sorted(VARIANTS)}.")
        for t in spec.get("targets", []):
            if t not in TARGETS:
                raise WorkflowError(f"config key experiments.{exp}.targets: unknown target '{t}'; "
                                    f"defined: {sorted(TARGETS)}.")


check_config()

try:
    check_grid(config)  # fair comparisons (shared schedule) and one untrained baseline, before any job
except (GridError, ReportConfigError) as exc:
    raise WorkflowError(str(exc)) from None


def pretrain_pairs():
    """Every (dataset, variant) some experiment asks for, deduplicated and in a stable order."""
    pairs = []
    for spec in config["experiments"].values():
        for d in spec["datasets"]:
            for v in spec["variants"]:
                if (d, v) not in pairs:
                    pairs.append((d, v))
    return pairs


def used_datasets():
    return sorted({d for d, _ in pretrain_pairs()})


def stats_targets():
    return [f"{RES}/data/{d}/stats.json" for d in used_datasets()]


def pretrain_targets():
    return [f"{RES}/pretrain/{d}/{v}/checkpoint.pt" for d, v in pretrain_pairs()]


def transfer_triples():
    """Every (dataset, variant, target) of the experiments, deduplicated and in a stable order."""
    triples = []
    for spec in config["experiments"].values():
        for d in spec["datasets"]:
            for v in spec["variants"]:
                for t in spec.get("targets", []):
                    if (d, v, t) not in triples:
                        triples.append((d, v, t))
    return triples


def transfer_targets():
    return [f"{RES}/transfer/{d}/{v}/{t}.json" for d, v, t in transfer_triples()]


FINETUNE_PROTOCOLS = ("finetune_seg", "finetune_det", "finetune_depth")
FINETUNE_TARGETS = sorted(t for t, c in TARGETS.items() if c.get("protocol") in FINETUNE_PROTOCOLS)


def transfer_batches():
    """(dataset, variant) -> its frozen-feature targets, in a stable order: one transfer job evaluates one
    checkpoint. Fine-tuning targets get one job each from the finetune rule, since they train and may ask for
    GPUs."""
    batches = {}
    for d, v, t in transfer_triples():
        if t not in FINETUNE_TARGETS:
            batches.setdefault((d, v), []).append(t)
    return batches


def _last_override(overrides, key, default):
    value = default
    for o in overrides:
        if o.split("=", 1)[0] == key:
            value = o.split("=", 1)[1]
    return value


def pretrain_priority(wildcards):
    """Longest runs first (epochs): on a few cores, the jobs that wait on a long run then do not form a tail."""
    try:
        return float(_last_override(PRE["overrides"] + VARIANTS[wildcards.variant], "epochs", 0))
    except ValueError:
        return 0


def finetune_priority(wildcards):
    """A fine-tuning job as soon as its checkpoint exists, the longest (steps) first."""
    return float(TARGETS[wildcards.target].get("steps") or 0)


def expected_arch(variant):
    """The backbone a variant trains (last `model=` override wins), so transfer can reject a wrong checkpoint."""
    arch = "resnet18"
    for o in config["pretrain"]["overrides"] + VARIANTS[variant]:
        if o.startswith("model="):
            arch = o.split("=", 1)[1]
    return arch


wildcard_constraints:
    dataset="|".join(sorted(DATASETS)),
    variant="|".join(sorted(VARIANTS)),
    target="|".join(sorted(TARGETS)) or "NO_TARGETS",


# ---------------------------------------------------------------------------------------- data stage
SYN = config.get("synthetic", {}).get("out", f"{RES}/synthetic")


def dataset_inputs(wildcards):
    return [f"{SYN}/world.json"] if DATASETS[wildcards.dataset].get("synthetic") else []


# ------------------------------------------------------------------------------------ pretrain stage
from glob import glob

PRE = config["pretrain"]
PRE_RES = PRE["resources"]
HYDRA_CONF = sorted(glob("study/conf/**/*.yaml", recursive=True))


def monitor_overrides():
    """`pretrain.monitor` -> the trainer's `monitor.*` overrides: its target's format, root and size."""
    mon = PRE.get("monitor") or {}
    if not int(mon.get("every", 0) or 0):
        return []
    t = mon.get("target")
    if t not in TARGETS:
        raise WorkflowError(f"config key pretrain.monitor.target: {t!r} is not a key of `targets:` "
                            f"({', '.join(sorted(TARGETS)) or 'none'}); name a labelled classification target")
    tgt = TARGETS[t]
    out = [f"monitor.every={int(mon['every'])}", f"monitor.format={tgt['format']}", f"monitor.root={tgt['root']}",
           f"monitor.image_size={int(tgt.get('image_size', 224))}"]
    if tgt.get("splits"):
        out.append("monitor.splits={" + ",".join(f"{k}:{v}" for k, v in tgt["splits"].items()) + "}")
    return out + [f"monitor.{k}={mon[k]}" for k in ("n_train", "n_val", "n_pairs") if k in mon]


def monitor_inputs(wildcards):
    t = (PRE.get("monitor") or {}).get("target")
    return [f"{SYN}/world.json"] if monitor_overrides() and TARGETS[t].get("synthetic") else []


MONITOR = monitor_overrides()


def launcher(gpus):
    """`torchrun` for several GPUs (one process per GPU, DDP), plain python otherwise."""
    if gpus and int(gpus) > 1:
        return PRE.get("launcher", "torchrun --standalone --nproc_per_node={gpu}").format(gpu=gpus)
    return PY


# ------------------------------------------------------------------------------------ transfer stage
TR = config.get("transfer", {})
TR_RES = TR.get("resources", {})
FT_RES = TR.get("finetune_resources", TR_RES)


def target_spec(variant, target):
    """A target's config entry with the backbone the variant trains (transfer rejects another arch)."""
    spec = {k: v for k, v in TARGETS[target].items() if k != "synthetic"}
    spec.setdefault("arch", expected_arch(variant))
    return spec


def targets_json(variant, targets):
    """The targets' config entries as one JSON word."""
    return quoted_json({t: target_spec(variant, t) for t in targets})


# -------------------------------------------------------------------------------------- report stage
from analysis import embedding_stats as report_emb
from analysis import figures as report_figures
from analysis import tables as report_tables

TAB = f"{RES}/tables"
FIG = f"{RES}/figures"
REPORT_RS = report_tables.report_settings(config)
TABLE_NAMES = report_tables.enabled_tables(config, REPORT_RS)
FIGURE_NAMES = [n for n in report_figures.enabled_figures(config, REPORT_RS) if n != "fig1"]
CAPTIONS = "../workflow/report"


def table_files(name):
    """A table's four files; the HTML one (rendered inline) and the CSV are registered in the report."""
    spec = report_tables.TABLES[name]
    out = []
    for path in report_tables.table_outputs(TAB, name):
        if path.endswith((".html", ".csv")):
            kind = "table" if path.endswith(".html") else "data (CSV)"
            path = report(path, caption=f"{CAPTIONS}/{name}.rst", category=spec.category, subcategory="Tables",
                          labels={"item": spec.title, "file": kind})
        out.append(path)
    return out


def figure_files(name):
    """A figure's PNG (registered in the report), PDF and the CSV of the plotted data."""
    spec, stem = report_figures.FIGURES[name], report_figures.FIGURE_FILES[name]
    out = []
    for path in report_figures.figure_outputs(FIG, name):
        if path.endswith((".png", ".csv")):
            kind = "figure" if path.endswith(".png") else "data (CSV)"
            path = report(path, caption=f"{CAPTIONS}/{stem}.rst", category=spec.category, subcategory="Figures",
                          labels={"item": spec.title, "file": kind})
        out.append(path)
    return out


def report_targets():
    """Every table and figure file of this config (for `rule all`)."""
    out = [p for n in TABLE_NAMES for p in report_tables.table_outputs(TAB, n)]
    return out + [p for n in ["fig1"] + FIGURE_NAMES for p in report_figures.figure_outputs(FIG, n)]


# ------------------------------------------------------------------------------------- inspect stage
FO_DB = f"{RES}/fiftyone/db"
