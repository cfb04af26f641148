# On-demand inspection in FiftyOne; not part of `rule all`. A persistent dataset per subset lives in the
# project's MongoDB under {RES}/fiftyone/db (docs/fiftyone.md):
#   snakemake --cores 1 results/fiftyone/syn_coco.done                     dataset from subset.csv + shards
#   snakemake --cores 1 results/fiftyone/syn_coco/moco_v2.embeddings.done  + checkpoint embeddings, 2-D map
#   python -m data_prep.inspect app --name syn_coco                        serve the App, print the ssh tunnel

# FiftyOne runs one MongoDB per user: `--resources fiftyone_db=1` stops parallel jobs racing to start it.


rule fiftyone_dataset:
    input:
        subset=f"{RES}/data/{{dataset}}/subset.csv",
        shards=f"{RES}/data/{{dataset}}/shards",
    output:
        f"{RES}/fiftyone/{{dataset}}.done",
    params:
        py=PY,
        db=FO_DB,
    resources:
        **site(0),
        fiftyone_db=1,
    log:
        f"{RES}/logs/fiftyone/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/fiftyone/{{dataset}}.tsv"
    conda:
        ENV
    shell:
        "{params.py} -m data_prep.inspect --db-dir {params.db} build --subset {input.subset} --name {wildcards.dataset} "
        "--shards {input.shards} --overwrite --done {output} 2> {log}"


rule fiftyone_embeddings:
    input:
        dataset=f"{RES}/fiftyone/{{dataset}}.done",
        checkpoint=f"{RES}/pretrain/{{dataset}}/{{variant}}/checkpoint.pt",
    output:
        f"{RES}/fiftyone/{{dataset}}/{{variant}}.embeddings.done",
    params:
        py=PY,
        db=FO_DB,
    resources:
        **site(0),
        fiftyone_db=1,
    log:
        f"{RES}/logs/fiftyone/{{dataset}}/{{variant}}.log",
    benchmark:
        f"{RES}/benchmarks/fiftyone/{{dataset}}/{{variant}}.tsv"
    conda:
        ENV
    shell:
        "{params.py} -m data_prep.inspect --db-dir {params.db} embed --name {wildcards.dataset} "
        "--checkpoint {input.checkpoint} --brain-key {wildcards.variant} --done {output} 2> {log}"
