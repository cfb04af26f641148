"""Where a job runs and how it splits the CPUs it holds: the site's one SLURM knob and the per-GPU CPU layout.

Torch-free; the rules call it at plan time (rules/common.smk), the tests call it directly.

*Routing.* A site names its partitions and account once, in the study config's ``slurm:`` section (the file
it already edits for its dataset roots; ``--config`` on the command line would replace a profile's
``config:``, so the profile is not the place)::

    slurm:
      gpu_partition: gpu      # every job that holds a GPU: pretrain, transfer, finetune, linear_sgd
      cpu_partition: cpu      # every other job: data, report, and untrained baselines (no GPU)
      account: proj123        # -A for every job

A job's partition follows the GPUs it really asks for (``random_init`` pretraining asks for none and goes to
the CPU partition), which a per-rule ``--set-resources`` cannot express. An unset key adds nothing, so the
cluster's default partition (or the profile's ``default-resources``) applies.

*CPU layout of a GPU job.* Each GPU has one training process (torchrun) that holds ``cpus_per_gpu`` CPUs:
its DataLoader workers (each one CPU: torch sets one thread per worker) and the process itself, whose
OpenMP threads get what the workers leave. So ``threads = gpu x cpus_per_gpu`` (Snakemake's count, and
``--cpus-per-gpu`` for SLURM), ``OMP_NUM_THREADS = cpus_per_gpu - workers``, and a worker count that does
not fit stops the plan instead of oversubscribing the node. A CPU-only job keeps its ``threads`` as OpenMP
threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SITE_KEYS = ("gpu_partition", "cpu_partition", "account")  # config section `slurm:`


class PlacementError(ValueError):
    """A resource request that cannot be laid out on the CPUs it asks for (message names the key and fix)."""


def site_resources(config: Mapping[str, Any], gpu: int) -> dict[str, str]:
    """The SLURM resources of a job holding ``gpu`` GPUs: its partition and account, where the site set them."""
    site = config.get("slurm") or {}
    out: dict[str, str] = {}
    part = site.get("gpu_partition" if int(gpu) > 0 else "cpu_partition")
    if part not in (None, ""):
        out["slurm_partition"] = str(part)
    account = site.get("account")
    if account not in (None, ""):
        out["slurm_account"] = str(account)
    return out


def job_threads(res: Mapping[str, Any], gpu: int) -> int:
    """CPUs a job asks for: ``gpu x cpus_per_gpu`` when it holds GPUs and the config names a per-GPU count,
    else the config's ``threads``."""
    cpg = int(res.get("cpus_per_gpu") or 0)
    if int(gpu) > 0 and cpg > 0:
        return int(gpu) * cpg
    return max(1, int(res.get("threads", 1) or 1))


def check_layout(threads: int, gpu: int, workers: int, where: str) -> None:
    """Refuse a GPU job whose loader workers do not fit the CPUs it asks for (plan time, requested ``threads``).

    ``where`` names the config key of the worker count, for the error.
    """
    threads, gpu, workers = max(1, int(threads)), int(gpu), int(workers)
    if workers < 0:
        raise PlacementError(f"{where}: num_workers must be >= 0, got {workers}")
    per_process = max(1, threads // gpu) if gpu > 0 else threads
    if gpu > 0 and workers + 1 > per_process:
        raise PlacementError(
            f"{where}: {workers} loader workers per GPU process plus the process itself need {workers + 1} CPUs, "
            f"but the job holds {per_process} per GPU ({threads} CPUs for {gpu} GPU(s)); set num_workers to at "
            f"most {per_process - 1} or raise the resources' cpus_per_gpu to {workers + 1}")


def omp_threads(threads: int, gpu: int, workers: int) -> int:
    """OMP_NUM_THREADS of each process: a GPU job's per-GPU CPUs less its loader workers, a CPU job's threads.

    ``threads`` is what the job really got (Snakemake caps it at ``--cores`` on a workstation; there the
    layout may not fit, which the plan-time check on the requested count cannot see).
    """
    threads, gpu = max(1, int(threads)), int(gpu)
    if gpu <= 0:
        return threads
    return max(1, threads // gpu - max(0, int(workers)))
