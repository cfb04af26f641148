"""Dataset-study pipeline for contrastive SSL: data -> shards -> pretraining grid -> transfer -> report.

`snakemake --cores N` runs the embedded study of config.yaml; `--configfile workflow/configs/paper.yaml` the
paper-scale one. Artefact paths (the contract between stages) are in ../shared/DESIGN.md and the README.
"""

import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("8.0")


# A complete study config given with --configfile (it has `datasets:`) replaces config.yaml instead of being
# deep-merged into it (Snakemake's default), so the paper grid does not inherit the synthetic datasets.
# Partial overrides (--config key=value, or a --configfile without `datasets:`) still apply on top.
if "datasets" not in config:

    configfile: "config.yaml"


# Every schema error at once, one line per offending key (snakemake's validate stops at the first and buries
# it in a schema dump); validate then only applies the schema's `default:` values.
if workflow.basedir not in sys.path:
    sys.path.insert(0, workflow.basedir)
from analysis.config_errors import ConfigSchemaError, check_config

try:
    check_config(config)  # against workflow/schemas/config.schema.yaml
except ConfigSchemaError as exc:
    raise WorkflowError(str(exc)) from None
validate(config, "workflow/schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/transfer.smk"
include: "rules/report.smk"
include: "rules/inspect.smk"


report: "workflow/report/workflow.rst"


rule all:
    input:
        stats_targets(),
        pretrain_targets(),
        transfer_targets(),
        report_targets(),
    default_target: True
