"""Run integrity of the pretraining app (issue 10): each test injects a fault a cluster run meets and checks the
one-line message and that nothing is lost or mixed.

The end-to-end runs use the tiny shards of tests/test_train.py: 48 images, batch 8, so 6 steps per epoch.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import REPO, TINY, _metric_steps, _run, _train, shard_dir  # noqa: F401  (shard_dir: fixture)

from study import runstate
from study.runconfig import config_diff, fingerprint, result_keys
from study.runstate import CollapseGuard, DiskWriteError, RunLocked, acquire_run_lock, atomic_save
from study.train import cli

SCHEDULE = ("epochs=3", "log_every=1")  # 18 steps, 6 per epoch
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cmd(out_dir: Path, shards: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "study.train", *TINY, f"data.shards={shards}", f"out_dir={out_dir}", *overrides]


def _run_split(out_dir: Path, shards: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Like ``_run`` but with stderr apart, to check that a failure is one line there."""
    return subprocess.run(_cmd(out_dir, shards, *overrides), cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=600)


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0, res.stdout[-2000:]
    err = res.stderr.strip()
    assert "Traceback" not in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]
    assert err.count("\n") == 0 and err.startswith("study.train: error: "), err
    return err


def _kill_when_checkpointed(out: Path, shards: Path, *overrides: str) -> int:
    """Start a trainer, SIGKILL it as soon as its first last.pt appears; the step that last.pt holds."""
    proc = _train(out, shards, *overrides, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "last.pt").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no intermediate checkpoint appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    return int(torch.load(out / "last.pt", map_location="cpu", weights_only=True)["step"])


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shard_dir) -> Path:  # noqa: F811
    """An unbroken run of SCHEDULE."""
    out = tmp_path_factory.mktemp("reference") / "run"
    res = _run(out, shard_dir, *SCHEDULE, "ckpt_every=100")
    assert res.returncode == 0, res.stdout[-3000:]
    return out


# ------------------------------------------------------------------------------------------ exact resume


@pytest.mark.slow
@pytest.mark.parametrize("ckpt_every, boundary", [(4, False), (6, True)], ids=["mid-epoch", "epoch-boundary"])
def test_kill_9_and_rerun_ends_byte_identical_to_an_unbroken_run(tmp_path, shard_dir, reference, ckpt_every,  # noqa: F811
                                                                 boundary):
    out = tmp_path / "run"
    killed_at = _kill_when_checkpointed(out, shard_dir, *SCHEDULE, f"ckpt_every={ckpt_every}")
    assert (killed_at % 6 == 0) == boundary and 0 < killed_at < 18

    res = _run(out, shard_dir, *SCHEDULE, f"ckpt_every={ckpt_every}")
    assert res.returncode == 0, res.stdout[-3000:]
    assert f"resumed from {out / 'last.pt'} at step {killed_at}" in (out / "train.log").read_text()
    got = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    want = torch.load(reference / "checkpoint.pt", map_location="cpu", weights_only=True)
    # every tensor of the model state: both encoders, BN statistics, the queue and its pointer
    assert got["model"].keys() == want["model"].keys()
    assert [k for k in want["model"] if not torch.equal(got["model"][k], want["model"][k])] == []
    for a, b in zip(got["optimizer"]["state"].values(), want["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    # metrics: every step once, the same values (the partial averaging window was resumed too)
    rows, ref_rows = _rows(out), _rows(reference)
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 19)]
    for r, q in zip(rows, ref_rows, strict=True):
        clock = ("img_per_s", "wall_s", "mon_s")  # wall-clock columns; wall_s is checked for order below
        assert {k: v for k, v in r.items() if k not in clock} == {k: v for k, v in q.items() if k not in clock}
    walls = [float(r["wall_s"]) for r in rows]
    assert walls == sorted(walls)  # training time carried across the kill, never restarting from 0
    # the killed attempt's log is kept, not overwritten
    assert "resumed from" not in (out / "train.log.1").read_text()
    assert "step 1/18" in (out / "train.log.1").read_text()


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (torchrun starts its workers in their own sessions)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for c in children:
            out += [c, *_descendants(c)]
    return out


@pytest.mark.slow
def test_ddp_run_killed_mid_epoch_resumes_byte_identical(tmp_path, shard_dir):  # noqa: F811
    """torchrun, 2 gloo processes (3 steps per epoch): every rank's RNG and its data stream are resumed."""

    def cmd(out: Path, *overrides: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "study.train", *TINY, "epochs=2", "log_every=1", f"data.shards={shard_dir}", f"out_dir={out}",
                *overrides]  # fmt: skip

    ref, out = tmp_path / "ref", tmp_path / "run"
    res = subprocess.run(cmd(ref, "ckpt_every=100"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    proc = subprocess.Popen(cmd(out, "ckpt_every=2"), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["step"] % 3 and len(state["rng"]) == 2
    time.sleep(0.5)  # let the killed ranks go
    res = subprocess.run(cmd(out, "ckpt_every=2"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {out / 'last.pt'}" in (out / "train.log").read_text()
    got = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    want = torch.load(ref / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = runstate.rng_state()
    want = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    atomic_save({"rng": state}, tmp_path / "s.pt")
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    runstate.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2:] == want[2:]


# ------------------------------------------------------------------------------------- same run only


def test_last_pt_of_another_config_is_refused_before_any_work(tmp_path, shard_dir, reference):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    for name in ("metrics.csv", "config.yaml"):
        shutil.copy(reference / name, out / name)
    last = out / "last.pt"
    shutil.copy(reference / "checkpoint.pt", last)
    before = {p.name: _sha(p) for p in out.iterdir()}

    err = _one_line_error(_run_split(out, shard_dir, *SCHEDULE, "optim.lr=0.03", "crop.max_iou=0.5"))
    assert "optim.lr: 0.06 -> 0.03" in err and "crop.max_iou: 1.0 -> 0.5" in err
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert f"mv {last} {last}.{state['fingerprint']}" in err
    assert not (out / "checkpoint.pt").exists()
    assert {p.name: _sha(p) for p in out.iterdir() if p.name in before} == before  # nothing touched

    # keys that cannot change the result (out_dir, log_every, ckpt_every, progress) do not block the resume
    res = _run(out, shard_dir, *SCHEDULE, "log_every=2", "ckpt_every=7", "progress=true")
    assert res.returncode == 0, res.stdout[-3000:]
    assert f"resumed from {last} at step 18" in (out / "train.log").read_text()
    got = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(v, state["model"][k]) for k, v in got["model"].items())


def test_fingerprint_ignores_only_keys_that_cannot_change_the_result():
    base = {"out_dir": "a", "progress": True, "log_every": 5, "ckpt_every": 50, "num_workers": 1, "device": "auto",
            "seed": 0, "optim": {"lr": 0.06}, "data": {"shards": "x", "shuffle_buffer": 256},
            "guard": {"stop_on_collapse": False}}  # fmt: skip
    moved = {**base, "out_dir": "b", "progress": False, "log_every": 1, "ckpt_every": 3, "num_workers": 4,
             "device": "cpu", "data": {"shards": "elsewhere", "shuffle_buffer": 256},
             "guard": {"stop_on_collapse": True}}  # fmt: skip
    assert fingerprint(base, "d") == fingerprint(moved, "d") != fingerprint(base, "other shards")
    assert set(result_keys(base)) == {"seed", "optim.lr", "data.shuffle_buffer"}
    assert config_diff(base, {**base, "seed": 1, "optim": {"lr": 5}}) == ["optim.lr: 0.06 -> 5", "seed: 0 -> 1"]
    assert config_diff(base, moved, keys="execution") == ["device: 'auto' -> 'cpu'", "num_workers: 1 -> 4"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "not-a-checkpoint", "wrong-architecture"])
def test_unusable_last_pt_is_named_in_one_line_with_the_command_that_moves_it(tmp_path, shard_dir, reference,  # noqa: F811
                                                                             damage):
    out = tmp_path / "run"
    out.mkdir()
    last = out / "last.pt"
    if damage == "truncated":
        last.write_bytes((reference / "checkpoint.pt").read_bytes()[:100_000])
    elif damage == "not-a-checkpoint":
        torch.save({"weights": torch.zeros(3)}, last)
    else:  # same config, but the weights of a small-input (3x3 stem) ResNet
        state = torch.load(reference / "checkpoint.pt", map_location="cpu", weights_only=True)
        state["model"]["encoder_q.backbone.conv1.weight"] = torch.zeros(64, 3, 3, 3)
        torch.save(state, last)
    for _ in range(2 if damage == "truncated" else 1):  # every rerun says the same, and nothing else happens
        err = _one_line_error(_run_split(out, shard_dir, *SCHEDULE))
        assert f"cannot resume from {last}" in err and f"mv {last} {last}.bad" in err
        assert not (out / "checkpoint.pt").exists() and not (out / "metrics.csv").exists()
    if damage == "truncated":
        assert "truncated" in err
        subprocess.run(shlex.split(err.split("start fresh: ", 1)[1]), check=True)  # the printed command works
        res = _run(out, shard_dir, "epochs=1")
        assert res.returncode == 0, res.stdout[-3000:]
        assert (out / "last.pt.bad").exists()
    elif damage == "wrong-architecture":
        assert "do not fit this model" in err and "conv1.weight" in err


# ------------------------------------------------------------------------------- one trainer per folder


def test_lock_names_its_holder_and_is_released_by_kill_9(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from study.runstate import acquire_run_lock; "
         "acquire_run_lock(sys.argv[1]); print('locked', flush=True); time.sleep(120)", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=rf"pid {holder.pid} on .*kill {holder.pid}"):
            acquire_run_lock(out)
    finally:
        holder.kill()  # SIGKILL: the OS drops the lock with the process
        holder.wait()
        holder.stdout.close()
    assert acquire_run_lock(out) == (out / ".lock").resolve()
    assert f"pid={os.getpid()}" in (out / ".lock").read_text()


@pytest.mark.slow
def test_second_trainer_on_a_folder_stops_at_once_and_touches_nothing(tmp_path, shard_dir):  # noqa: F811
    out = tmp_path / "run"
    first = _train(out, shard_dir, "epochs=30", "log_every=1", "ckpt_every=1000", start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "metrics.csv").exists() or len(_metric_steps(out)) < 2:
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        hydra_dir = {p.name: _sha(p) for p in (out / ".hydra").iterdir()}
        t0 = time.time()
        err = _one_line_error(_run_split(out, shard_dir, "epochs=30", "log_every=1", "ckpt_every=1000"))
        assert time.time() - t0 < 60
        assert f"pid {first.pid}" in err and f"kill {first.pid}" in err and "in use by another trainer" in err
        assert first.poll() is None  # the first trainer goes on, with its own log and metrics
        assert not (out / "train.log.1").exists() and "error" not in (out / "train.log").read_text().lower()
        assert {p.name: _sha(p) for p in (out / ".hydra").iterdir()} == hydra_dir
        steps = _metric_steps(out)
        assert steps == list(range(1, len(steps) + 1))
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        first.stdout.close()
    # the killed trainer's lock is gone with it; its log is kept next to the new one
    res = _run(out, shard_dir, "epochs=1", "log_every=1")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "step 1/180" in (out / "train.log.1").read_text() and "step 6/6" in (out / "train.log").read_text()
    assert _metric_steps(out) == list(range(1, 7))


# ------------------------------------------------------------------------------- good checkpoints only


def test_divergence_points_to_a_finite_checkpoint_and_the_right_step(tmp_path, shard_dir):  # noqa: F811
    out = tmp_path / "run"
    err = _one_line_error(_run_split(out, shard_dir, "epochs=2", "optim.lr=1e6", "ckpt_every=1", "log_every=1"))
    assert "NaN/inf" in err and "lower optim.lr" in err.lower() and not (out / "checkpoint.pt").exists()
    m = re.search(r"Last good checkpoint: (\S+) \(step (\d+);", err)
    assert m and Path(m[1]) == out / "last.pt"
    state = torch.load(m[1], map_location="cpu", weights_only=True)
    assert state["step"] == int(m[2])
    floats = [v for v in state["model"].values() if v.is_floating_point()]  # weights, BN statistics, the queue
    floats += [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert all(torch.isfinite(v).all() for v in floats)
    bad = re.search(r"(loss is \S+ at|became NaN/inf by) step (\d+)", err)
    logged = _metric_steps(out)[-1]  # log_every=1: the last step that finished
    assert bad and int(bad[2]) == (logged + 1 if bad[1].startswith("loss") else logged)
    assert int(m[2]) == int(bad[2]) - 1


@pytest.mark.slow
def test_collapse_is_flagged_in_metrics_and_log_and_can_stop_the_run(tmp_path, shard_dir, reference):  # noqa: F811
    assert {r["collapse"] for r in _rows(reference)} == {"0"}  # a healthy run is never flagged
    out = tmp_path / "run"
    res = _run(out, shard_dir, "epochs=6", "optim.lr=5", "log_every=1", "ckpt_every=100")
    assert res.returncode == 0, res.stdout[-3000:]
    flags = [r["collapse"] for r in _rows(out)]
    assert flags[:10] == ["0"] * 10 and flags[-1] == "1"
    log = (out / "train.log").read_text()
    assert "[WARNING] - training collapsed" in log and "guard.stop_on_collapse=true" in log

    out2 = tmp_path / "stop"
    err = _one_line_error(_run_split(out2, shard_dir, "epochs=6", "optim.lr=5", "log_every=1", "ckpt_every=100",
                                     "guard.stop_on_collapse=true"))
    first = flags.index("1") + 1
    assert f"up to step {first}" in err and "stopped (guard.stop_on_collapse=true)" in err
    assert _metric_steps(out2)[-1] == first and not (out2 / "checkpoint.pt").exists()


def test_collapse_guard_needs_a_streak_after_the_queue_has_filled():
    g = CollapseGuard(rows=3, gap=0.002, loss_rtol=0.01, min_step=8)
    chance = np.log(65)
    # the start of training sits at chance but with a clear positive gap, or before the queue holds real keys
    assert not any(g.update(s, chance, 0.9, 0.0 if s < 8 else 0.8, chance) for s in range(1, 12))
    assert not g.update(12, chance, 0.99, 0.9895, chance) and not g.update(13, chance, 0.99, 0.9, chance)
    assert [g.update(s, chance - 0.003, 0.998, 0.9975, chance) for s in (14, 15, 16, 17)] == [False, False, True, True]
    assert g.since == 14
    assert not g.update(18, chance - 0.5, 0.9, 0.5, chance) and g.streak == 0  # recovered


# ------------------------------------------------------------------------------- clear errors, no litter


@pytest.mark.parametrize("overrides, expected", [
    (["epochs=-1"], "epochs=-1: must be an integer >= 1"),
    (["ckpt_every=0"], "ckpt_every=0: must be an integer >= 1"),
    (["log_every=0"], "log_every=0: must be an integer >= 1"),
    (["batch_size=0"], "batch_size=0: must be an integer >= 1"),
    (["optim.lr=abc"], "optim.lr='abc': must be a number > 0"),
    (["crop.max_iou=0"], "crop.max_iou=0: must be a number > 0 and <= 1"),
    (["crop.max_iou=1.5"], "crop.max_iou=1.5: must be a number > 0 and <= 1"),
    (["crop.scale=[0.6,1.0]", "crop.max_iou=0.1"], "crop.max_iou=0.1: unattainable with crop.scale=[0.6, 1.0]"),
    (["moco.K=60"], "moco.K=60: must be a multiple of the global batch 8"),
    (["method=mochi"], "mochi.n=128: must be <= moco.K=64"),
    (["crop.max_iuo=0.3"], "unknown config key 'crop.max_iuo' in override 'crop.max_iuo=0.3': did you mean crop.max_iou"),
    (["method=mocov2"], "method=mocov2: no such method config; choose one of end_to_end, knn_moco, memory_bank, mochi, moco_v1, moco_v2"),
])  # fmt: skip
def test_bad_values_fail_before_any_work_with_one_line(tmp_path, capsys, shard_dir, overrides, expected):  # noqa: F811
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli([*TINY, f"data.shards={shard_dir}", f"out_dir={out}", *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err, err
    assert "+crop" not in err and "Traceback" not in err
    assert not out.exists()  # no folder, no .hydra/, no train.log


def test_bad_value_from_the_command_line_exits_non_zero_with_one_line(tmp_path, shard_dir):  # noqa: F811
    res = _run_split(tmp_path / "run", shard_dir, "epochs=-1")
    assert res.returncode == 2
    assert _one_line_error(res).endswith("epochs=-1: must be an integer >= 1 (for an untrained baseline use "
                                         "method=random_init)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")])
def test_atomic_save_on_a_full_disk_removes_the_temp_file_and_names_the_target(tmp_path, monkeypatch, failure):
    target = tmp_path / "last.pt"
    atomic_save({"step": 1}, target)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DiskWriteError) as info:
        atomic_save({"step": 2}, target)
    msg = str(info.value)
    assert msg.startswith(f"cannot write {target}: ") and "\n" not in msg
    assert ("no space left on device" if isinstance(failure, OSError) else "probably full or not writable") in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}  # the previous checkpoint is intact


def test_disk_full_during_pretraining_is_one_line_and_leaves_the_last_good_checkpoint(tmp_path, shard_dir):  # noqa: F811
    """The real entry point with torch.save failing like a full disk from its 2nd call (the 2nd last.pt)."""
    out = tmp_path / "run"
    inject = ("import errno, sys, torch\n"
              "real, calls = torch.save, []\n"
              "def save(obj, f, *a, **k):\n"
              "    calls.append(1)\n"
              "    if len(calls) >= 2:\n"
              "        f.write(b'partial')\n"
              "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
              "    return real(obj, f, *a, **k)\n"
              "torch.save = save\n"
              "import runpy\n"
              "runpy.run_module('study.train', run_name='__main__', alter_sys=True)\n")  # fmt: skip
    args = [*TINY, f"data.shards={shard_dir}", f"out_dir={out}", "epochs=1", "ckpt_every=2", "log_every=1"]
    res = subprocess.run([sys.executable, "-c", inject, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=600)
    err = _one_line_error(res)
    assert f"cannot write {out / 'last.pt'}: no space left on device" in err
    assert not (out / "last.pt.tmp").exists() and not (out / "checkpoint.pt").exists()
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["step"] == 2
    assert err.removeprefix("study.train: error: ") in (out / "train.log").read_text()


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_a_damaged_shard_stops_the_run_before_training_naming_the_shard_and_the_rebuild(tmp_path, shard_dir,  # noqa: F811
                                                                                        damage):
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    (shards / "verified.json").unlink(missing_ok=True)
    victim = sorted(shards.glob("*.tar"))[1]
    data = bytearray(victim.read_bytes())
    if damage == "header":
        data[512 * 3 + 100:512 * 3 + 130] = b"x" * 30  # inside a later member's header: tar readers stop there
        victim.write_bytes(bytes(data))
    else:
        victim.write_bytes(bytes(data[: len(data) // 2]))
    out = tmp_path / "run"
    err = _one_line_error(_run_split(out, shards, *SCHEDULE))
    assert victim.name in err and "rm -r" in err
    assert not (out / "last.pt").exists() and not (out / "checkpoint.pt").exists()
