# Data stage: (synthetic world) -> subset list -> webdataset shards + Table-1 statistics.

rule synthetic_world:
    output:
        f"{SYN}/world.json",
    params:
        py=PY,
        out=lambda wc, output: os.path.dirname(output[0]),
        spec=quoted_json(config.get("synthetic", {}).get("spec", {})),
    resources:
        **site(0),  # the site's CPU partition and account (analysis/placement.py)
    log:
        f"{RES}/logs/synthetic_world.log",
    benchmark:
        f"{RES}/benchmarks/synthetic_world.tsv"
    conda:
        ENV
    shell:
        "{params.py} -m data_prep.synthetic --out {params.out} --spec-json {params.spec} 2> {log}"


rule subset:
    input:
        dataset_inputs,
    output:
        f"{RES}/data/{{dataset}}/subset.csv",
    params:
        py=PY,
        fmt=lambda wc: DATASETS[wc.dataset]["format"],
        root=lambda wc: shlex.quote(DATASETS[wc.dataset]["root"]),
        split=lambda wc: DATASETS[wc.dataset].get("split", "train"),
        rule=lambda wc: quoted_json(DATASETS[wc.dataset]["subset"]),
        files=lambda wc: quoted_json(DATASETS[wc.dataset].get("files", {})),
    resources:
        **site(0),  # the site's CPU partition and account (analysis/placement.py)
    log:
        f"{RES}/logs/subset/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/subset/{{dataset}}.tsv"
    conda:
        ENV
    shell:
        "{params.py} -m data_prep.subsets --format {params.fmt} --root {params.root} --split {params.split} "
        "--rule-json {params.rule} --files-json {params.files} --out {output} 2> {log}"


rule shards:
    input:
        f"{RES}/data/{{dataset}}/subset.csv",
    output:
        directory(f"{RES}/data/{{dataset}}/shards"),
    params:
        py=PY,
        max_per_shard=config["shards"]["max_per_shard"],
        min_shards=config["shards"]["min_shards"],
        max_side=(f"--max-side {config['shards']['max_side']}" if config["shards"].get("max_side") else ""),
        workers=config["shards"].get("workers", 1),
        shuffle_seed=config["shards"].get("shuffle_seed", 0),
    threads: config["shards"].get("workers", 1)
    resources:
        **site(0),  # the site's CPU partition and account (analysis/placement.py)
    log:
        f"{RES}/logs/shards/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/shards/{{dataset}}.tsv"
    conda:
        ENV
    shell:
        "{params.py} -m data_prep.shards --subset {input} --out {output} --name {wildcards.dataset} "
        "--max-per-shard {params.max_per_shard} --min-shards {params.min_shards} {params.max_side} "
        "--workers {params.workers} --shuffle-seed {params.shuffle_seed} 2> {log}"


rule stats:
    # Counted from the shards (what training reads: the shard step skips empty/corrupt images); subset.csv
    # names the skipped images.
    input:
        subset=f"{RES}/data/{{dataset}}/subset.csv",
        shards=f"{RES}/data/{{dataset}}/shards",
    output:
        f"{RES}/data/{{dataset}}/stats.json",
    params:
        py=PY,
        many=config.get("stats", {}).get("shots", {}).get("many", 100),
        few=config.get("stats", {}).get("shots", {}).get("few", 20),
    resources:
        **site(0),  # the site's CPU partition and account (analysis/placement.py)
    log:
        f"{RES}/logs/stats/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/stats/{{dataset}}.tsv"
    conda:
        ENV
    shell:
        "{params.py} -m data_prep.stats --shards {input.shards} --subset {input.subset} "
        "--name {wildcards.dataset} --many {params.many} "
        "--few {params.few} --out {output} 2> {log}"
