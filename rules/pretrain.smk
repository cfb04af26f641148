# Pretraining stage: one study.train run per (dataset, variant) of the experiments.
# gpu x pretrain.resources.cpus_per_gpu (else `threads`); refused when the loader workers do not fit
PRETRAIN_THREADS = placed_threads(PRE_RES, pretrain_gpu, pretrain_workers,
                                  lambda wc: f"num_workers of variant {wc.variant!r} (pretrain.overrides, variants)")

rule pretrain:
    input:
        shards=f"{RES}/data/{{dataset}}/shards",
        conf=HYDRA_CONF,
        monitor=monitor_inputs,
    output:
        f"{RES}/pretrain/{{dataset}}/{{variant}}/checkpoint.pt",
    params:
        overrides=lambda wc: " ".join(shlex.quote(o) for o in PRE["overrides"] + MONITOR + VARIANTS[wc.variant]),
        out_dir=lambda wc: f"{RES}/pretrain/{wc.dataset}/{wc.variant}",
        launcher=lambda wc, resources: launcher(resources.gpu),
        omp=lambda wc, threads, resources: placement.omp_threads(threads, resources.gpu, pretrain_workers(wc)),
    threads: PRETRAIN_THREADS
    priority: pretrain_priority
    resources:
        mem_mb=PRE_RES.get("mem_mb", 4000),
        runtime=pretrain_runtime,  # minutes, or `runtime: auto`: estimated from epochs x images (job_cost.py)
        gpu=pretrain_gpu,  # none for the untrained baseline
        cpus_per_gpu=lambda wc: (PRE_RES.get("cpus_per_gpu", 0) or None) if pretrain_gpu(wc) else None,
        nodes=1,  # torchrun --standalone: every process of the job on one node
        **site(pretrain_gpu),  # the site's partition (GPU or CPU, by what the job asks for) and account
    log:
        f"{RES}/logs/pretrain/{{dataset}}/{{variant}}.log",
    benchmark:
        f"{RES}/benchmarks/pretrain/{{dataset}}/{{variant}}.tsv"
    conda:
        ENV
    shell:
        # appended, not overwritten: an earlier attempt's errors (e.g. a trainer refused by the run-folder lock)
        # stay readable; the trainer's own train.log is rotated to train.log.N
        "echo \"=== attempt started $(date -Is) on $(hostname)\" >> {log}; "
        # exec: the trainer replaces the shell, so SIGTERM (time limit, preemption) reaches it and not a bash
        # that would die at once and let the job end before the trainer's save
        "OMP_NUM_THREADS={params.omp} exec {params.launcher} -m study.train {params.overrides} "
        "data.shards={input.shards} out_dir={params.out_dir} progress=false >> {log} 2>&1"
