"""The slurm profile against a real (single-node, throw-away) SLURM: jobs go through sbatch, run in the
workflow's directory with this interpreter, failures reach snakemake's exit status, and `sacct` is never
needed (the local cluster has no accounting, like many small clusters).

workflow/scripts/local_slurm.sh installs (Debian, root) and starts munged + slurmctld + slurmd; the module
fixture always stops them. Deselect with `-m "not slurm"`.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "workflow" / "scripts" / "local_slurm.sh"
PROFILE = "workflow/profiles/slurm-local"
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
RUN_TIMEOUT = 170  # seconds per snakemake run; a hung status query must fail the test, not stall CI


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
        yield Cluster(state=state, env=env, sacct_calls=sacct_calls)
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


def _snakemake(cluster: Cluster, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--profile", str(REPO / PROFILE), *args]
    try:
        return subprocess.run(cmd, cwd=cwd, env=cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        pytest.fail(f"snakemake did not finish in {RUN_TIMEOUT}s (status query hanging?):\n{out[-3000:]}")


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


def test_data_stage_runs_as_slurm_jobs_without_sacct(cluster, tmp_path):
    cfg_path, cfg = _study_config(tmp_path)
    res_dir = Path(cfg["results"])
    target = res_dir / "data" / "syn_in" / "stats.json"
    logdir = tmp_path / "slurm_logs"
    # The repo's Snakefile, run from tmp_path: nothing (results, .snakemake/, SLURM logs) lands in the repo.
    run = _snakemake(cluster, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
                     str(cfg_path), "--slurm-logdir", str(logdir), str(target), cwd=tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]

    assert json.loads(target.read_text())  # a JSON document, written by the stats job
    with open(res_dir / "data" / "syn_in" / "subset.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    n_classes = len({p.name for p in (res_dir / "synthetic" / "imagenet" / "train").iterdir()})
    assert len(rows) == n_classes * PER_CLASS
    # Each rule ran as its own SLURM job (the profile keeps successful jobs' logs) ...
    for rule in ("synthetic_world", "subset", "stats"):
        assert list((logdir / f"rule_{rule}").rglob("*.log")), f"no SLURM log for rule {rule}: {out[-2000:]}"
    # ... and their status came from squeue (the cluster has no accounting): the shim sacct saw no status query.
    assert _sacct_status_queries(cluster) == []


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
