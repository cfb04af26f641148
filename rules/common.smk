# Shared helpers: config checks that must fail at DAG construction, quoting, the experiment grid.
import json
import os
import shlex
import sys
from argparse import Namespace
from pathlib import Path

from snakemake.exceptions import WorkflowError

PY = shlex.quote(sys.executable)
# The checkout, for inputs that are source files: `--directory elsewhere` must not turn them into missing files
# (fig1's crop sampler) or into an empty list (the trainer's Hydra configs).
SRC = os.path.dirname(os.path.abspath(workflow.main_snakefile))
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
from analysis import job_cost
from analysis import placement
from analysis.target_settings import FINETUNE_PROTOCOLS, MANIFEST, TargetSpecError, check_targets, runs_alone, trains
from analysis.target_settings import resolve as resolve_target

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


# Targets that train (fine-tuning; MoCo's SGD linear recipe) get a job of their own when it would hold a GPU, and
# run inside their checkpoint's transfer job on a CPU-only config: analysis.target_settings.runs_alone decides.
FINETUNE_TARGETS = sorted(
    t for t, c in TARGETS.items() if c.get("protocol") in FINETUNE_PROTOCOLS and runs_alone(c, config)
)
SGD_TARGETS = sorted(t for t, c in TARGETS.items() if runs_alone(c, config) and t not in FINETUNE_TARGETS)


def transfer_batches():
    """(dataset, variant) -> the targets its one transfer job evaluates, in a stable order: the frozen-feature
    targets, then (CPU-only config) the training ones, which the transfer CLI runs last. Training targets that
    hold a GPU get one job each (rules finetune / linear_sgd: they train for hours and may ask for several)."""
    batches = {}
    for d, v, t in transfer_triples():
        if not runs_alone(TARGETS[t], config):
            batches.setdefault((d, v), []).append(t)
    return {k: sorted(ts, key=lambda t: trains(TARGETS[t])) for k, ts in batches.items()}  # stable: frozen first


BATCHES = transfer_batches()


def transfer_targets():
    """What `all` asks of the transfer stage: each checkpoint's manifest, and the targets that run alone."""
    return [f"{RES}/transfer/{d}/{v}/{MANIFEST}" for d, v in BATCHES] + [
        f"{RES}/transfer/{d}/{v}/{t}.json" for d, v, t in transfer_triples() if runs_alone(TARGETS[t], config)
    ]


def dag_files(paths):
    """Report inputs as the files jobs declare: a batched target's result JSON is made by its checkpoint's
    transfer job, whose declared output is the manifest beside it."""
    return [report_tables.transfer_dag_file(config, p) for p in paths]


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


def _untrained(variant):
    return bool(report_tables.variant_settings(config, variant).get("random_init"))


def pretrain_gpu(wildcards):
    """The configured GPUs, none for the untrained baseline (it builds a network and trains nothing)."""
    return 0 if _untrained(wildcards.variant) else int(PRE_RES.get("gpu", 0))


def _runtime(res, estimate):
    """`runtime: auto` -> the estimate of the work (analysis/job_cost.py); a number of minutes is kept."""
    value = res.get("runtime", 60)
    if value != "auto":
        return int(value)
    try:
        return int(estimate()["runtime"])
    except job_cost.EstimateError as exc:
        raise WorkflowError(str(exc)) from None


def pretrain_runtime(wildcards):
    s = report_tables.variant_settings(config, wildcards.variant)
    return _runtime(PRE_RES, lambda: job_cost.pretrain_request(config, wildcards.dataset, s, pretrain_gpu(wildcards)))


def _alone_request(res, estimate, wildcards):
    """A fine-tuning / SGD linear job's request: `gpu: auto` and `runtime: auto` from its work estimate."""
    t = wildcards.target
    s = resolve_target(t, target_spec(wildcards.variant, t))[0]
    try:
        return estimate(config, t, TARGETS[t], s, res.get("gpu", 0), int(res.get("max_gpu", 8)))
    except job_cost.EstimateError as exc:
        raise WorkflowError(str(exc)) from None


def finetune_gpu(wildcards):
    g = FT_RES.get("gpu", 0)
    return _alone_request(FT_RES, job_cost.finetune_request, wildcards)["gpu"] if g == "auto" else int(g)


def finetune_runtime(wildcards):
    return _runtime(FT_RES, lambda: _alone_request(FT_RES, job_cost.finetune_request, wildcards))


def sgd_gpu(wildcards):
    g = SGD_RES.get("gpu", 0)
    return _alone_request(SGD_RES, job_cost.sgd_linear_request, wildcards)["gpu"] if g == "auto" else int(g)


def sgd_runtime(wildcards):
    return _runtime(SGD_RES, lambda: _alone_request(SGD_RES, job_cost.sgd_linear_request, wildcards))


# ------------------------------------------------------------------ placement (analysis/placement.py)
def site(gpu):
    """The site's SLURM partition and account for a job with `gpu` GPUs (a number or a wildcards function):
    the three `slurm_*` config keys the slurm profile sets once. Splat into a rule's resources."""
    if not callable(gpu):
        return placement.site_resources(config, int(gpu))
    out = {}
    for key in ("slurm_partition", "slurm_account"):
        if any(key in placement.site_resources(config, g) for g in (0, 1)):
            out[key] = lambda wc, key=key: placement.site_resources(config, gpu(wc)).get(key) or None
    return out


def placed_threads(res, gpu_fn, workers_fn, where_fn):
    """A GPU rule's `threads`: gpu x cpus_per_gpu (else the config's threads), refused at plan time when the
    loader workers per GPU process do not fit (placement.check_layout)."""

    def threads(wildcards):
        gpu = gpu_fn(wildcards)
        n = placement.job_threads(res, gpu)
        try:
            placement.check_layout(n, gpu, workers_fn(wildcards), where_fn(wildcards))
        except placement.PlacementError as exc:
            raise WorkflowError(str(exc)) from None
        return n

    return threads


def pretrain_workers(wildcards):
    return int(report_tables.variant_settings(config, wildcards.variant).get("num_workers", 0) or 0)


def target_workers(wildcards):
    return int(resolve_target(wildcards.target, target_spec(wildcards.variant, wildcards.target))[0]["num_workers"])


def sgd_workers(wildcards, threads, gpu):
    """The SGD linear job's loader workers per process: the target's `num_workers`; a GPU job whose target leaves
    it unset decodes with every CPU it holds per process but one (the process itself)."""
    if int(gpu) > 0 and "num_workers" not in TARGETS[wildcards.target]:
        return max(0, int(threads) // int(gpu) - 1)
    return target_workers(wildcards)


def sgd_target_json(wildcards, threads, gpu):
    """The SGD linear target's JSON, with the worker count of sgd_workers."""
    spec = target_spec(wildcards.variant, wildcards.target)
    spec["num_workers"] = sgd_workers(wildcards, threads, gpu)
    return quoted_json(spec)


def _batch(wildcards):
    return BATCHES.get((wildcards.dataset, wildcards.variant), [])


def batch_targets_json(wildcards):
    """The batched targets of one checkpoint, as the transfer CLI's --targets-json word (an SGD linear target
    with the worker count its own job would pass: sgd_workers)."""
    specs = {t: target_spec(wildcards.variant, t) for t in _batch(wildcards)}
    for t in specs:
        if TARGETS[t].get("protocol") not in FINETUNE_PROTOCOLS and trains(TARGETS[t]):
            specs[t]["num_workers"] = sgd_workers(Namespace(variant=wildcards.variant, target=t), 1, 0)
    return quoted_json(specs)


def batch_request(wildcards):
    """The transfer job's threads, mem_mb and runtime (analysis.job_cost.batched_request)."""
    try:
        return job_cost.batched_request(config, _batch(wildcards))
    except job_cost.EstimateError as exc:
        raise WorkflowError(str(exc)) from None


def batch_training_json(wildcards, threads):
    """The training targets a CPU-only config runs in this transfer job, as the --training-json option (empty
    when there are none): each one's state directory (the one its own job would use: results/finetune/ or
    results/linear_sgd/) and the threads its own job would have got (its resources' threads, capped by what this
    job got), so its numbers are the same. The frozen targets use the job's threads, as before."""
    out = {}
    for t in _batch(wildcards):
        if trains(TARGETS[t]):
            kind = "finetune" if TARGETS[t]["protocol"] in FINETUNE_PROTOCOLS else "linear_sgd"
            res = FT_RES if kind == "finetune" else SGD_RES
            out[t] = {"state_dir": f"{RES}/{kind}/{wildcards.dataset}/{wildcards.variant}/{t}",
                      "threads": min(int(threads), placement.job_threads(res, 0))}  # fmt: skip
    return f"--training-json {quoted_json(out)}" if out else ""


def batch_priority(wildcards):
    """A transfer job that fine-tunes starts as soon as its checkpoint exists, the longest (steps) first, as the
    finetune jobs do (finetune_priority)."""
    return max([float(TARGETS[t].get("steps") or 0) for t in _batch(wildcards) if trains(TARGETS[t])], default=0)


def batch_inputs(wildcards):
    """The synthetic world, when a batched target of this checkpoint reads it."""
    ts = _batch(wildcards)
    return [f"{SYN}/world.json"] if any(TARGETS[t].get("synthetic") for t in ts) else []


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
HYDRA_CONF = sorted(glob(os.path.join(SRC, "study/conf/**/*.yaml"), recursive=True))


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
SGD_RES = TR.get("sgd_resources", FT_RES)


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
