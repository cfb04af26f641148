# Transfer stage. Frozen-feature targets: one job per checkpoint evaluates all of its experiments' targets in
# one process (start-up paid once), writing one JSON per target and then the checkpoint's manifest, the job's
# declared output (the target list differs per checkpoint, so it cannot be the rule's outputs); features are
# cached per checkpoint. One rule for every checkpoint, so `--set-resources transfer:...` reaches all of them.
# On a CPU-only config (analysis.target_settings.runs_alone) the same job also runs the checkpoint's training
# targets (fine-tuning, SGD linear), last, each with the state directory, threads and result file of the job it
# would otherwise have had (rules finetune / linear_sgd below), so a killed job resumes them; the job's request
# is then the larger threads / memory and the summed runtime (analysis.job_cost.batched_request).
rule transfer:
    input:
        ckpt=f"{RES}/pretrain/{{dataset}}/{{variant}}/checkpoint.pt",
        world=batch_inputs,
    output:
        f"{RES}/transfer/{{dataset}}/{{variant}}/{MANIFEST}",
    params:
        py=PY,
        targets=batch_targets_json,
        training=lambda wc, threads: batch_training_json(wc, threads),
        out_dir=lambda wc, output: os.path.dirname(output[0]),
        cache=TR.get("cache", f"{RES}/features"),
    threads: lambda wc: batch_request(wc)["threads"]
    priority: batch_priority
    resources:
        mem_mb=lambda wc: batch_request(wc)["mem_mb"],
        runtime=lambda wc: batch_request(wc)["runtime"],
        gpu=TR_RES.get("gpu", 0),
        nodes=1,
        **site(TR_RES.get("gpu", 0)),
    log:
        f"{RES}/logs/transfer/{{dataset}}/{{variant}}.log",
    benchmark:
        f"{RES}/benchmarks/transfer/{{dataset}}/{{variant}}.tsv"
    conda:
        ENV
    shell:
        "echo \"=== attempt started $(date -Is) on $(hostname)\" >> {log}; "
        "OMP_NUM_THREADS={threads} exec {params.py} -m analysis.transfer --checkpoint {input.ckpt} "
        "--targets-json {params.targets} {params.training} --cache-dir {params.cache} --out-dir {params.out_dir} "
        "--manifest {output} --no-progress 2>> {log}"


# Fine-tuning (protocols finetune_seg / finetune_det / finetune_depth) on GPUs: one job per checkpoint x target,
# with its own resources (transfer.finetune_resources; gpu > 1 -> the pretraining launcher, DDP + SyncBN). The
# run state in results/finetune/ lets a killed job resume where it stopped. With `gpu: 0` (and a CPU transfer
# job) these targets run in rule transfer instead and this rule is not defined.
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
            omp=lambda wc, threads, resources: placement.omp_threads(threads, resources.gpu, target_workers(wc)),
        threads: placed_threads(FT_RES, finetune_gpu, target_workers, lambda wc: f"targets.{wc.target}.num_workers")
        priority: finetune_priority
        resources:
            mem_mb=FT_RES.get("mem_mb", 4000),
            runtime=finetune_runtime,
            gpu=finetune_gpu,  # `gpu: auto`: the fewest GPUs that finish within estimate.target_hours
            cpus_per_gpu=lambda wc: (FT_RES.get("cpus_per_gpu", 0) or None) if finetune_gpu(wc) else None,
            nodes=1,
            **site(finetune_gpu),
        log:
            f"{RES}/logs/finetune/{{dataset}}/{{variant}}/{{target}}.log",
        benchmark:
            f"{RES}/benchmarks/finetune/{{dataset}}/{{variant}}/{{target}}.tsv"
        conda:
            ENV
        shell:
            "echo \"=== attempt started $(date -Is) on $(hostname)\" >> {log}; "
            "OMP_NUM_THREADS={params.omp} exec {params.launcher} -m analysis.finetune --checkpoint {input.ckpt} "
            "--name {wildcards.target} --target-json {params.target} --state-dir {params.state} --out {output} "
            "--no-progress >> {log} 2>&1"


# MoCo's SGD linear recipe (ImageNet linear: 100 augmented epochs through the frozen backbone) on GPUs: one job
# per checkpoint x target, with its own resources (transfer.sgd_resources; gpu > 1 -> the pretraining launcher,
# DDP) and a per-epoch resumable state in results/linear_sgd/, so a job killed at its time limit resumes. With
# `gpu: 0` (and a CPU transfer job) these targets run in rule transfer instead.
if SGD_TARGETS:

    rule linear_sgd:
        input:
            ckpt=f"{RES}/pretrain/{{dataset}}/{{variant}}/checkpoint.pt",
            world=lambda wc: [f"{SYN}/world.json"] if TARGETS[wc.target].get("synthetic") else [],
        output:
            f"{RES}/transfer/{{dataset}}/{{variant}}/{{target}}.json",
        wildcard_constraints:
            target="|".join(SGD_TARGETS),
        params:
            target=lambda wc, threads, resources: sgd_target_json(wc, threads, resources.gpu),
            state=lambda wc: f"{RES}/linear_sgd/{wc.dataset}/{wc.variant}/{wc.target}",
            cache=TR.get("cache", f"{RES}/features"),
            launcher=lambda wc, resources: launcher(resources.gpu),
            omp=lambda wc, threads, resources: placement.omp_threads(threads, resources.gpu, sgd_workers(wc, threads, resources.gpu)),
        threads: placed_threads(SGD_RES, sgd_gpu, target_workers, lambda wc: f"targets.{wc.target}.num_workers")
        resources:
            mem_mb=SGD_RES.get("mem_mb", 4000),
            runtime=sgd_runtime,
            gpu=sgd_gpu,
            cpus_per_gpu=lambda wc: (SGD_RES.get("cpus_per_gpu", 0) or None) if sgd_gpu(wc) else None,
            nodes=1,
            **site(sgd_gpu),
        log:
            f"{RES}/logs/linear_sgd/{{dataset}}/{{variant}}/{{target}}.log",
        benchmark:
            f"{RES}/benchmarks/linear_sgd/{{dataset}}/{{variant}}/{{target}}.tsv"
        conda:
            ENV
        shell:
            "echo \"=== attempt started $(date -Is) on $(hostname)\" >> {log}; "
            "OMP_NUM_THREADS={params.omp} exec {params.launcher} -m analysis.transfer --checkpoint {input.ckpt} "
            "--name {wildcards.target} --target-json {params.target} --cache-dir {params.cache} --out {output} "
            "--state-dir {params.state} --no-progress >> {log} 2>&1"
