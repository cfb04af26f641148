# Transfer stage: every checkpoint of an experiment x each of its targets; features are cached per checkpoint.

rule transfer:
    input:
        ckpt=f"{RES}/pretrain/{{dataset}}/{{variant}}/checkpoint.pt",
        target=target_inputs,
    output:
        f"{RES}/transfer/{{dataset}}/{{variant}}/{{target}}.json",
    params:
        py=PY,
        target=target_json,
        cache=TR.get("cache", f"{RES}/features"),
    threads: TR_RES.get("threads", 1)
    resources:
        mem_mb=TR_RES.get("mem_mb", 4000),
        runtime=TR_RES.get("runtime", 60),
        gpu=TR_RES.get("gpu", 0),
    log:
        f"{RES}/logs/transfer/{{dataset}}/{{variant}}/{{target}}.log",
    benchmark:
        f"{RES}/benchmarks/transfer/{{dataset}}/{{variant}}/{{target}}.tsv"
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} {params.py} -m analysis.transfer --checkpoint {input.ckpt} --name {wildcards.target} "
        "--target-json {params.target} --cache-dir {params.cache} --out {output} --no-progress 2> {log}"
