# Report stage: the paper's tables and figures, rebuilt from results/ files and registered in the Snakemake
# report (`snakemake --report results/report.html`). Which tables / figures exist follows the config's
# experiments (and its optional `report:` section); their inputs are listed by the same package code that
# reads them (analysis.tables / analysis.figures), so the DAG and the builders cannot disagree.
if workflow.basedir not in sys.path:
    sys.path.insert(0, workflow.basedir)

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


localrules:
    tables,
    figures,


rule tables:
    input:
        report_tables.table_inputs(config, RES, TABLE_NAMES),
    output:
        [p for n in TABLE_NAMES for p in table_files(n)],
    params:
        cfg=quoted_json(config),
        only=",".join(TABLE_NAMES),
    log:
        f"{RES}/logs/report/tables.log",
    benchmark:
        f"{RES}/benchmarks/report/tables.tsv"
    conda:
        ENV
    shell:
        "{PY} -m analysis.tables --config-json {params.cfg} --results {RES} --out {TAB} "
        "--only {params.only} 2> {log}"


# Figure 1 depends on the crop sampler only, not on any training run.
rule fig1:
    input:
        "study/crops.py",
    output:
        figure_files("fig1"),
    params:
        cfg=quoted_json({"report": config.get("report") or {}}),
    log:
        f"{RES}/logs/report/fig1.log",
    benchmark:
        f"{RES}/benchmarks/report/fig1.tsv"
    conda:
        ENV
    shell:
        "{PY} -m analysis.figures --config-json {params.cfg} --results {RES} --out {FIG} --only fig1 2> {log}"


rule figures:
    input:
        report_figures.figure_inputs(config, RES, FIGURE_NAMES),
    output:
        [p for n in FIGURE_NAMES for p in figure_files(n)],
    params:
        cfg=quoted_json(config),
        only=",".join(FIGURE_NAMES),
    log:
        f"{RES}/logs/report/figures.log",
    benchmark:
        f"{RES}/benchmarks/report/figures.tsv"
    conda:
        ENV
    shell:
        "{PY} -m analysis.figures --config-json {params.cfg} --results {RES} --out {FIG} "
        "--only {params.only} 2> {log}"


# Alignment / uniformity / false-negative share of one checkpoint on a labelled image set (MoCHi analysis).
rule embedding_stats:
    input:
        ckpt=f"{RES}/pretrain/{{dataset}}/{{variant}}/checkpoint.pt",
        source=lambda wc: report_emb.job_source(config, RES, wc.dataset)[0],
    output:
        f"{RES}/analysis/{{dataset}}/{{variant}}/embedding_stats.json",
    params:
        source=lambda wc: report_emb.job_source(config, RES, wc.dataset)[1],
        settings=lambda wc: quoted_json(report_emb.job_settings(config, wc.variant)),
    threads: 1
    log:
        f"{RES}/logs/embedding_stats/{{dataset}}/{{variant}}.log",
    benchmark:
        f"{RES}/benchmarks/embedding_stats/{{dataset}}/{{variant}}.tsv"
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m analysis.embedding_stats --checkpoint {input.ckpt} {params.source} "
        "--settings-json {params.settings} --out {output} --no-progress 2> {log}"
