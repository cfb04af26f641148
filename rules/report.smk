# Report stage: the paper's tables and figures, rebuilt from results/ files and registered in the Snakemake
# report (`snakemake --report results/report.html`). Which tables / figures exist follows the config's
# experiments (and its optional `report:` section); their inputs are listed by the same package code that
# reads them (analysis.tables / analysis.figures), so the DAG and the builders cannot disagree.
localrules:
    tables,
    figures,


rule tables:
    input:
        dag_files(report_tables.table_inputs(config, RES, TABLE_NAMES)),
    output:
        [p for n in TABLE_NAMES for p in table_files(n)],
    params:
        py=PY,
        res=lambda wc: RES,
        out=lambda wc, output: os.path.dirname(output[0]),
        cfg=lambda wc: quoted_json(config),  # a function: braces in the config are not wildcards
        only=",".join(TABLE_NAMES),
    resources:
        **site(0),  # the site's CPU partition and account (analysis/placement.py)
    log:
        f"{RES}/logs/report/tables.log",
    benchmark:
        f"{RES}/benchmarks/report/tables.tsv"
    conda:
        ENV
    shell:
        "{params.py} -m analysis.tables --config-json {params.cfg} --results {params.res} --out {params.out} "
        "--only {params.only} 2> {log}"


# Figure 1 depends on the crop sampler only, not on any training run.
rule fig1:
    input:
        os.path.join(SRC, "study/crops.py"),
    output:
        figure_files("fig1"),
    params:
        py=PY,
        res=lambda wc: RES,
        out=lambda wc, output: os.path.dirname(output[0]),
        cfg=quoted_json({"report": config.get("report") or {}}),
    resources:
        **site(0),  # the site's CPU partition and account (analysis/placement.py)
    log:
        f"{RES}/logs/report/fig1.log",
    benchmark:
        f"{RES}/benchmarks/report/fig1.tsv"
    conda:
        ENV
    shell:
        "{params.py} -m analysis.figures --config-json {params.cfg} --results {params.res} --out {params.out} --only fig1 2> {log}"


rule figures:
    input:
        dag_files(report_figures.figure_inputs(config, RES, FIGURE_NAMES)),
    output:
        [p for n in FIGURE_NAMES for p in figure_files(n)],
    params:
        py=PY,
        res=lambda wc: RES,
        out=lambda wc, output: os.path.dirname(output[0]),
        cfg=lambda wc: quoted_json(config),  # a function: braces in the config are not wildcards
        only=",".join(FIGURE_NAMES),
    resources:
        **site(0),  # the site's CPU partition and account (analysis/placement.py)
    log:
        f"{RES}/logs/report/figures.log",
    benchmark:
        f"{RES}/benchmarks/report/figures.tsv"
    conda:
        ENV
    shell:
        "{params.py} -m analysis.figures --config-json {params.cfg} --results {params.res} --out {params.out} "
        "--only {params.only} 2> {log}"


# Alignment / uniformity / false-negative share of one checkpoint on a labelled image set (MoCHi analysis).
rule embedding_stats:
    input:
        ckpt=f"{RES}/pretrain/{{dataset}}/{{variant}}/checkpoint.pt",
        source=lambda wc: report_emb.job_source(config, RES, wc.dataset)[0],
    output:
        f"{RES}/analysis/{{dataset}}/{{variant}}/embedding_stats.json",
    params:
        py=PY,
        source=lambda wc: report_emb.job_source(config, RES, wc.dataset)[1],
        settings=lambda wc: quoted_json(report_emb.job_settings(config, wc.variant)),
    threads: 1
    resources:
        **site(0),  # the site's CPU partition and account (analysis/placement.py)
    log:
        f"{RES}/logs/embedding_stats/{{dataset}}/{{variant}}.log",
    benchmark:
        f"{RES}/benchmarks/embedding_stats/{{dataset}}/{{variant}}.tsv"
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} {params.py} -m analysis.embedding_stats --checkpoint {input.ckpt} {params.source} "
        "--settings-json {params.settings} --out {output} --no-progress 2> {log}"
