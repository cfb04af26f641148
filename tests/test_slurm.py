"""The slurm profile against a real (single-node, throw-away) SLURM: jobs go through sbatch, run in the
workflow's directory with this interpreter, failures reach snakemake's exit status, and `sacct` is never
needed (the local cluster has no accounting, like many small clusters). The cluster has partitions `cpu` and
`gpu` and four GPUs (a GRES without devices): the paper's scale model is routed by the study's `slurm:`
section (partition by the GPUs a job holds, --nodes=1, the account), and a pretraining job that outlives its
one-minute limit saves at SLURM's SIGTERM, is retried and ends tensor-equal to an unbroken run.

workflow/scripts/local_slurm.sh installs (Debian, root) and starts munged + slurmctld + slurmd; the module
fixture always stops them. Deselect with `-m "not slurm"`.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "workflow" / "scripts" / "local_slurm.sh"
PROFILE = "workflow/profiles/slurm-local"
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
RUN_TIMEOUT = 170  # seconds per snakemake run; a hung status query must fail the test, not stall CI
ACCOUNT = "proj123"  # the study's slurm.account; the shim sacctmgr lists it, so the plugin accepts it


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "local SLURM needs Linux"
    if os.geteuid() != 0:
        return "local SLURM needs root (slurmd runs jobs as the submitting user, munged as user munge)"
    have_slurm = any(shutil.which("slurmctld", path=p) for p in (os.environ.get("PATH"), "/usr/sbin:/sbin"))
    if not have_slurm and not shutil.which("apt-get"):
        return "slurmctld is not installed and there is no apt-get to install it"
    if DEFAULT_CONF.exists() and not DEFAULT_CONF.is_symlink():
        return f"{DEFAULT_CONF} exists: this machine has a real SLURM; use workflow/profiles/slurm there"
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


@dataclass
class Cluster:
    state: Path
    env: dict[str, str]  # SLURM_CONF, PATH with this venv and a `sacct` that records being called
    sacct_calls: Path
    sbatch_calls: Path  # "<job id> <sbatch arguments>" per submission, written by a pass-through sbatch


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (slurmctld, slurmd), so a local SLURM on the defaults is not hit."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two consecutive free TCP ports on 127.0.0.1")


def _alive(name: str, pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


def _recorded_pids(state: Path) -> list[tuple[str, int]]:
    pids = state / "pids"
    if not pids.exists():
        return []
    return [(n, int(p)) for n, p in (line.split() for line in pids.read_text().splitlines() if line.strip())]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    # Not under pytest's 0700 tmp tree: munged runs as user munge and must reach its socket and key.
    state = Path(tempfile.mkdtemp(prefix="local-slurm-test-", dir="/tmp"))
    bin_dir = tmp_path_factory.mktemp("bin")
    sacct_calls = bin_dir / "sacct.calls"
    shim = bin_dir / "sacct"
    shim.write_text(f'#!/bin/sh\necho "$*" >> {sacct_calls}\necho "sacct: no accounting here" >&2\nexit 1\n')
    shim.chmod(0o755)
    # The plugin checks an account the study names with `sacctmgr list user`; this cluster has no accounting,
    # so a stand-in lists the one account the tests use (sbatch then records it: no enforcement here).
    (bin_dir / "sacctmgr").write_text(f"#!/bin/sh\necho {ACCOUNT}\n")
    (bin_dir / "sacctmgr").chmod(0o755)
    # sbatch as it is, recording each submission's arguments with the job id it got: what a job asked for
    # (--nodes) is in SLURM's records only while the job is pending.
    sbatch_calls = bin_dir / "sbatch.calls"
    real_sbatch = shutil.which("sbatch") or "/usr/bin/sbatch"
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\nout=$({real_sbatch} "$@")\nrc=$?\necho "$out $*" >> {sbatch_calls}\necho "$out"\nexit $rc\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {
        **os.environ,
        "LOCAL_SLURM_PORT": str(_free_port_pair()),
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    try:
        res = subprocess.run(["bash", str(SCRIPT), "start", str(state)], env=env, capture_output=True,
                             text=True, timeout=600)
        if res.returncode == 4:
            pytest.skip(f"SLURM cannot be installed here: {res.stderr.strip()[-500:]}")
        assert res.returncode == 0, f"local_slurm.sh start failed:\n{res.stderr}"
        export = [ln for ln in res.stdout.splitlines() if ln.startswith("export SLURM_CONF=")]
        assert export, f"start printed no SLURM_CONF:\n{res.stdout}"
        env["SLURM_CONF"] = export[-1].split("=", 1)[1]
        yield Cluster(state=state, env=env, sacct_calls=sacct_calls, sbatch_calls=sbatch_calls)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], env=env, capture_output=True, text=True,
                       timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def _sacct_status_queries(cluster: Cluster) -> list[str]:
    """sacct calls other than the account guess. Plugin 2.8.0 ignores `slurm-no-account` and runs
    `sacct -nu USER -o Account` once per run; that fails fast without accounting and the job is submitted
    without -A. A status query through sacct is what would make a run without accounting never finish."""
    if not cluster.sacct_calls.exists():
        return []
    return [c for c in cluster.sacct_calls.read_text().splitlines() if "Account" not in c]


def _snakemake(cluster: Cluster, *args: str, cwd: Path = REPO, timeout: int = RUN_TIMEOUT
               ) -> subprocess.CompletedProcess:  # fmt: skip
    cmd = [sys.executable, "-m", "snakemake", "--profile", str(REPO / PROFILE), *args]
    try:
        return subprocess.run(cmd, cwd=cwd, env=cluster.env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        pytest.fail(f"snakemake did not finish in {timeout}s (status query hanging?):\n{out[-3000:]}")


# A small world: the default spec renders ~2000 images (~40 s on 2 cores); this one ~60 in ~3 s.
SMALL_WORLD = {
    "seed": 0,
    "imagenet": {"splits": {"train": 8}},
    "coco": {"splits": {"train2017": 10}},
    "openimages": {"splits": {"train": 10}},
    "bdd100k": {"splits": {"train": 10}},
    "cls": {"splits": {"train": 2, "val": 2}},
    "voc": {"splits": {"trainval": 4, "test": 4}},
    "davis": {"splits": {"train": 1, "val": 1}, "n_frames": 3},
}
PER_CLASS = 5


def _study_config(tmp_path: Path) -> tuple[Path, dict]:
    """config.yaml with every output and synthetic root under tmp_path (it has `datasets:`, so it replaces
    config.yaml instead of being merged into it) and a small world."""
    cfg = copy.deepcopy(yaml.safe_load((REPO / "config.yaml").read_text()))
    res = tmp_path / "results"
    old_out = cfg["synthetic"]["out"]
    cfg["results"] = str(res)
    cfg["synthetic"] = {"out": str(res / "synthetic"), "spec": SMALL_WORLD}
    for ds in cfg["datasets"].values():
        if ds.get("synthetic"):
            ds["root"] = ds["root"].replace(old_out, str(res / "synthetic"), 1)
    cfg["datasets"]["syn_in"]["subset"] = {"rule": "uniform", "per_class": PER_CLASS, "seed": 0}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def test_failing_job_fails_the_run_and_jobs_run_in_the_workdir_with_this_python(cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(textwrap.dedent("""\
        import sys
        PY = sys.executable  # evaluated by the job's own snakemake, as rules/common.smk does

        rule all:
            input: "probe.txt", "fail.txt"

        rule probe:
            output: "probe.txt"
            shell: "echo $PWD > {output}; echo {PY} >> {output}; echo $SLURM_JOB_ID >> {output}"

        rule fail:
            output: "fail.txt"
            shell: "echo about to fail >&2; exit 3"
        """))
    run = _snakemake(cluster, "--directory", str(tmp_path), "-s", str(tmp_path / "Snakefile"), "--keep-going",
                     "--slurm-logdir", str(tmp_path / "slurm_logs"), cwd=tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out[-3000:]
    assert "Error in rule fail" in out, out[-3000:]
    assert not (tmp_path / "fail.txt").exists()
    pwd, python, job_id = (tmp_path / "probe.txt").read_text().splitlines()
    assert Path(pwd).resolve() == tmp_path.resolve()
    assert Path(python) == Path(sys.executable)  # the job's snakemake is this interpreter (sbatch --export=ALL)
    assert job_id.isdigit()
    assert _sacct_status_queries(cluster) == []


def _rule_of(comment: str) -> str:
    """The rule of a job from the plugin's --comment (rule_<name> or rule_<name>_wildcards_<...>)."""
    name = comment.removeprefix("rule_")
    return name.split("_wildcards_", 1)[0]


def _jobs_of(cluster: Cluster, workdir: Path) -> list[dict[str, str]]:
    """SLURM's own record (`scontrol show job`) of every job submitted from ``workdir``, with the arguments
    its sbatch call had (``sbatch``) and its rule (``rule``). Finished jobs stay listed for MinJobAge."""
    res = subprocess.run(["scontrol", "-o", "show", "job"], env=cluster.env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    calls = {}
    for line in cluster.sbatch_calls.read_text().splitlines():
        job_id, _, args = line.partition(" ")
        calls[job_id.split(";")[0]] = args
    jobs = []
    for line in res.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if Path(fields.get("WorkDir", "/nonexistent")).resolve() != workdir.resolve():
            continue
        fields["sbatch"] = calls.get(fields["JobId"], "")
        fields["rule"] = _rule_of(fields.get("Comment", ""))
        jobs.append(fields)
    return jobs


def test_scale_model_jobs_land_on_the_partition_of_the_gpus_they_hold_on_one_node(cluster, tmp_path):
    """The real DAG as SLURM jobs, run in a temp directory with this interpreter, status from squeue (no
    sacct: the cluster has no accounting). The paper's scale model (one experiment, with a frozen, an SGD linear and a fine-tuning target) through
    the slurm executor with the study config's `slurm:` section set once: every job that holds a GPU ran in
    partition `gpu` on one node with its GPU count, every other job (data, report, the untrained baseline) in
    `cpu`, all under the study's account; read back from SLURM's job records."""
    from analysis.scale_model import derive

    cfg = derive(yaml.safe_load((REPO / "workflow/configs/paper.yaml").read_text()), tmp_path / "results")
    cfg["slurm"] = {"gpu_partition": "gpu", "cpu_partition": "cpu", "account": ACCOUNT}
    cfg["only_experiments"] = "mechanism"  # COCO x {moco_v2, random_init}
    cfg["experiments"]["mechanism"]["targets"] = ["voc07_svm", "imagenet_linear", "voc_seg_ft"]
    small = {"mem_mb": 1500, "runtime": 10, "threads": 1}
    cfg["pretrain"]["resources"] = {**small, "gpu": 1, "cpus_per_gpu": 1}
    cfg["transfer"]["resources"] = {**small, "gpu": 1}
    cfg["transfer"]["finetune_resources"] = {**small, "gpu": 2, "cpus_per_gpu": 1}  # torchrun, 2 processes
    cfg["transfer"]["sgd_resources"] = {**small, "gpu": 1, "cpus_per_gpu": 1}
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = _snakemake(cluster, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
                     str(cfg_path), "--slurm-logdir", str(tmp_path / "slurm_logs"), cwd=tmp_path, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]

    jobs = _jobs_of(cluster, tmp_path)
    gpus = {"pretrain": 1, "transfer": 1, "linear_sgd": 1, "finetune": 2}
    # tables and figures are localrules (seconds, on the submitting node); fig1 is the report's SLURM job
    assert set(gpus) | {"synthetic_world", "subset", "shards", "stats", "fig1"} <= {j["rule"] for j in jobs}
    for j in jobs:
        what = f"{j['rule']} ({j['Comment']}): {j['sbatch']}"
        assert j["JobState"] == "COMPLETED" and j["Account"] == ACCOUNT, what
        untrained = j["rule"] == "pretrain" and "random_init" in j["Comment"]  # builds a network, trains nothing
        want = 0 if untrained else gpus.get(j["rule"], 0)
        if want:
            assert j["Partition"] == "gpu", what
            assert j.get("TresPerJob") == f"gres:gpu:{want}", what
            if j["rule"] != "transfer":  # its resources name no cpus_per_gpu: --cpus-per-task=threads
                assert j.get("CpusPerTres") == "gres:gpu:1", what
            assert j["NumNodes"] == "1" and "--nodes=1" in j["sbatch"].split(), what
        else:
            assert j["Partition"] == "cpu" and "gpu" not in j.get("TresPerJob", "(null)"), what
    assert any(j["rule"] == "pretrain" and "random_init" in j["Comment"] for j in jobs)
    # every job's status came from squeue (the cluster has no accounting): the shim sacct saw no status query
    assert _sacct_status_queries(cluster) == []
    # the data stage's outputs, and a SLURM log per job (the profile keeps successful jobs' logs)
    data = tmp_path / "results" / "data" / "coco"
    assert json.loads((data / "stats.json").read_text())
    with open(data / "subset.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) > 0
    for j in jobs:
        assert list((tmp_path / "slurm_logs" / f"rule_{j['rule']}").rglob(f"{j['JobId']}.log")), j["Comment"]
    # the fine-tuning job really ran as two processes (torchrun on the two GPUs it holds; gloo on this CPU)
    ft = json.loads((tmp_path / "results" / "transfer" / "coco" / "moco_v2" / "voc_seg_ft.json").read_text())
    assert ft["settings"]["world_size"] == 2


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_pretraining_past_its_time_limit_saves_is_retried_and_ends_as_an_unbroken_run(cluster, tmp_path):
    """A one-minute limit and about two minutes of training: SLURM's SIGTERM at the limit makes the trainer save
    last.pt at its step and exit, the profile's retries submit the job again, it resumes there, and the final
    checkpoint is tensor-equal to an unbroken run's (run meanwhile, outside SLURM, on the other core)."""
    import torch

    cfg_path, cfg = _study_config(tmp_path)
    cfg["pretrain"]["monitor"] = {"every": 0}
    res_dir = Path(cfg["results"])
    shards = res_dir / "data" / "syn_in" / "shards"
    env = {**cluster.env, "OMP_NUM_THREADS": "1"}
    base = [*cfg["pretrain"]["overrides"], "method=moco_v2", "epochs=100000", "ckpt_every=100000",
            f"data.shards={shards}", "progress=false"]  # fmt: skip

    def train_cmd(out_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "study.train", *base, *extra, f"out_dir={out_dir}"]

    # The data stage, here (it is not what this test is about); then the step time of this machine, so the
    # schedule outlasts the limit whatever the machine: about 100 s of steps alone. SLURM enforces a limit on
    # its periodic check, up to 30 s after it, so a job that ends between 60 and 90 s may be killed after the
    # trainer's last step, in Snakemake's own wrap-up (seen with 70 s: every attempt finished its steps, ended
    # TIMEOUT and started over). 100 s is past that window: the first attempt is stopped mid-training.
    cfg_path.write_text(yaml.safe_dump(cfg))
    data = subprocess.run([sys.executable, "-m", "snakemake", str(shards), "--cores", "2", "-s",
                           str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile", str(cfg_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert data.returncode == 0, data.stdout[-2000:] + data.stderr[-2000:]
    calib = subprocess.run(train_cmd(tmp_path / "calib", "max_steps=30", "log_every=1"), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert calib.returncode == 0, calib.stdout[-2000:] + calib.stderr[-2000:]
    rows = {int(r["step"]): float(r["wall_s"]) for r in _metrics(tmp_path / "calib")}
    per_step = (rows[30] - rows[5]) / 25
    steps = max(100, int(100 / per_step) // 10 * 10)
    variant = ["method=moco_v2", "epochs=100000", f"max_steps={steps}", "ckpt_every=100000", "log_every=10"]
    cfg["variants"]["long"] = variant
    cfg_path.write_text(yaml.safe_dump(cfg))

    ref_dir = tmp_path / "unbroken"
    ref = subprocess.Popen(train_cmd(ref_dir, *variant[1:]), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.STDOUT)  # fmt: skip
    ckpt = res_dir / "pretrain" / "syn_in" / "long" / "checkpoint.pt"
    t0 = time.time()
    run = _snakemake(cluster, str(ckpt), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                     "--configfile", str(cfg_path), "--slurm-logdir", str(tmp_path / "slurm_logs"), "--retries", "4",
                     "--set-resources", "pretrain:runtime=1", "pretrain:mem_mb=2000", cwd=tmp_path,
                     timeout=900)  # fmt: skip
    took = time.time() - t0
    assert ref.wait(timeout=600) == 0
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]

    run_dir = ckpt.parent
    logs = "".join(p.read_text() for p in sorted(run_dir.glob("train.log*")))
    stops = re.findall(r"received SIGTERM at step (\d+)/" + str(steps), logs)
    resumes = re.findall(r"resumed from \S+last.pt at step (\d+)", logs)
    jobs = [j for j in _jobs_of(cluster, tmp_path) if j["rule"] == "pretrain"]
    states = [j["JobState"] for j in sorted(jobs, key=lambda j: int(j["JobId"]))]
    what = f"{steps} steps of {per_step:.3f} s in {took:.0f} s; jobs {states}\n{logs[-3000:]}"
    assert stops and len(states) == len(stops) + 1 and states[-1] == "COMPLETED", what  # one retry per stop
    assert "TIMEOUT" in states and all(j["TimeLimit"] == "00:01:00" for j in jobs), what
    assert resumes == stops, what  # every attempt went on from the step the one before saved
    got = torch.load(ckpt, map_location="cpu", weights_only=True)
    want = torch.load(ref_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert got["model"].keys() == want["model"].keys()
    assert [k for k in got["model"] if not torch.equal(got["model"][k], want["model"][k])] == [], what
    # the loss curve too: the same steps, the same values (wall time aside)
    drop = ("wall_s", "img_per_s", "mon_s")  # timings
    assert [{k: v for k, v in r.items() if k not in drop} for r in _metrics(run_dir)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in _metrics(ref_dir)]


def test_stop_ends_exactly_the_daemons_it_started(cluster):
    started = _recorded_pids(cluster.state)
    assert {n for n, _ in started} == {"munged", "slurmctld", "slurmd"}
    assert all(_alive(n, p) for n, p in started)
    res = subprocess.run(["bash", str(SCRIPT), "stop", str(cluster.state)], env=cluster.env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert not any(_alive(n, p) for n, p in started), started
    assert not (DEFAULT_CONF.is_symlink() and os.readlink(DEFAULT_CONF) == str(cluster.state / "slurm.conf"))
    status = subprocess.run(["bash", str(SCRIPT), "status", str(cluster.state)], env=cluster.env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 3, status.stdout + status.stderr
