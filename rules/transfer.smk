# Transfer stage: one job per checkpoint evaluates all of its experiments' targets in one process (start-up
# paid once), writing one JSON per target; features are cached per checkpoint. Snakemake needs the outputs of
# a job to follow from its wildcards, and the target list differs per checkpoint, so each checkpoint gets its
# own rule, transfer_<dataset>__<variant>.

for (_d, _v), _targets in transfer_batches().items():

    rule:
        name:
            f"transfer_{_d}__{_v}"
        input:
            ckpt=f"{RES}/pretrain/{_d}/{_v}/checkpoint.pt",
            world=[f"{SYN}/world.json"] if any(TARGETS[t].get("synthetic") for t in _targets) else [],
        output:
            [f"{RES}/transfer/{_d}/{_v}/{t}.json" for t in _targets],
        params:
            py=PY,
            targets=targets_json(_v, _targets),
            out_dir=lambda wc, output: os.path.dirname(output[0]),
            cache=TR.get("cache", f"{RES}/features"),
        threads: TR_RES.get("threads", 1)
        resources:
            mem_mb=TR_RES.get("mem_mb", 4000),
            runtime=TR_RES.get("runtime", 60),
            gpu=TR_RES.get("gpu", 0),
        log:
            f"{RES}/logs/transfer/{_d}/{_v}.log",
        benchmark:
            f"{RES}/benchmarks/transfer/{_d}/{_v}.tsv"
        conda:
            ENV
        shell:
            "OMP_NUM_THREADS={threads} {params.py} -m analysis.transfer --checkpoint {input.ckpt} "
            "--targets-json {params.targets} --cache-dir {params.cache} --out-dir {params.out_dir} --no-progress "
            "2> {log}"
