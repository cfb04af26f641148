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


# Fine-tuning (protocols finetune_seg / finetune_det / finetune_depth): one job per checkpoint x target, with
# its own resources (transfer.finetune_resources; gpu > 1 -> the pretraining launcher, DDP + SyncBN). The run
# state in results/finetune/ lets a killed job resume where it stopped.
if FINETUNE_TARGETS:

    rule finetune:
        input:
            ckpt=f"{RES}/pretrain/{{dataset}}/{{variant}}/checkpoint.pt",
            world=lambda wc: [f"{SYN}/world.json"] if TARGETS[wc.target].get("synthetic") else [],
        output:
            f"{RES}/transfer/{{dataset}}/{{variant}}/{{target}}.json",
        wildcard_constraints:
            target="|".join(FINETUNE_TARGETS),
        params:
            target=lambda wc: quoted_json(target_spec(wc.variant, wc.target)),
            state=lambda wc: f"{RES}/finetune/{wc.dataset}/{wc.variant}/{wc.target}",
            launcher=lambda wc, resources: launcher(resources.gpu),
            omp=lambda wc, threads, resources: max(1, threads // max(1, int(resources.gpu))),
        threads: FT_RES.get("threads", 1)
        priority: finetune_priority
        resources:
            mem_mb=FT_RES.get("mem_mb", 4000),
            runtime=FT_RES.get("runtime", 60),
            gpu=FT_RES.get("gpu", 0),
            cpus_per_gpu=FT_RES.get("cpus_per_gpu", 0) or None,
        log:
            f"{RES}/logs/finetune/{{dataset}}/{{variant}}/{{target}}.log",
        benchmark:
            f"{RES}/benchmarks/finetune/{{dataset}}/{{variant}}/{{target}}.tsv"
        conda:
            ENV
        shell:
            "echo \"=== attempt started $(date -Is) on $(hostname)\" >> {log}; "
            "OMP_NUM_THREADS={params.omp} {params.launcher} -m analysis.finetune --checkpoint {input.ckpt} "
            "--name {wildcards.target} --target-json {params.target} --state-dir {params.state} --out {output} "
            "--no-progress >> {log} 2>&1"
