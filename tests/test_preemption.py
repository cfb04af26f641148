"""Time limits and preemption (issue 19): SIGTERM / SIGUSR1 stop pretraining and fine-tuning at a step boundary
with a saved state and the retry status, and every resume (after a signal or kill -9) is exact.

The runs are the smallest of tests/test_train.py (48 images, batch 8) and tests/test_finetune.py (the synthetic
VOC world, a width-8 ResNet-18).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_finetune import _free_port, make_checkpoint, world  # noqa: F401  (world: fixture)
from test_train import REPO, TINY, _metric_steps, shard_dir  # noqa: F401  (shard_dir: fixture)
from test_train_integrity import _descendants

from analysis import finetune
from study.runconfig import compose_config
from study.runstate import RETRY_EXIT, RunStopped, StopSignals
from study.train import train

# 12 steps; no periodic last.pt: only a stop writes one. Two DataLoader workers, because SLURM signals every
# process of a job step and torch's workers die of a SIGTERM their parent did not send.
PRETRAIN = [*(o for o in TINY if not o.startswith("num_workers=")), "num_workers=2", "epochs=2", "log_every=1",
            "ckpt_every=100"]  # fmt: skip
# One thread everywhere: the in-process and the subprocess runs compute alike, and on a shared machine OpenMP's
# spinning threads do not turn a busy core into a tenfold slowdown.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: " + proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _read_until(proc: subprocess.Popen, text: str) -> str:
    """The subprocess's output up to the first line containing ``text`` (blocks until it comes)."""
    seen = ""
    while text not in seen:
        line = proc.stdout.readline()
        assert line, f"the run ended before saying {text!r}: {seen[-3000:]}"
        seen += line
    return seen


def _stop_lines(text: str, sig: str = "SIGTERM") -> list[str]:
    return [ln for ln in text.splitlines() if f"received {sig} at step" in ln]


def _step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# ------------------------------------------------------------------------------------------- pretraining


def _pretrain(out_dir: Path, shards: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "study.train", *PRETRAIN, f"data.shards={shards}", f"out_dir={out_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def test_sigterm_saves_pretraining_at_the_current_step_and_the_rerun_is_exact(tmp_path, shard_dir):  # noqa: F811
    """SIGTERM to the trainer and its DataLoader workers at once, as SLURM sends it (before: killed at once, and
    with the signal on the trainer alone a worker's death raised "DataLoader worker ... killed" mid-step)."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    proc = _pretrain(out, shard_dir)
    log = out / "train.log"
    _wait_for(lambda: log.exists() and "step 3/12" in log.read_text(), proc, "step 3 in train.log")
    assert _descendants(proc.pid), "the DataLoader workers are not running"
    os.killpg(proc.pid, signal.SIGTERM)
    t0 = time.time()
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == RETRY_EXIT, stdout[-3000:]
    assert "Traceback" not in stdout and "ignored" not in stdout, stdout[-3000:]
    assert time.time() - t0 < 15, "the stop took longer than a step and a save"
    lines = _stop_lines(log.read_text())
    assert len(lines) == 1, log.read_text()[-3000:]
    stopped = int(re.search(r"at step (\d+)/12", lines[0]).group(1))
    assert 3 <= stopped < 12 and str(out / "last.pt") in lines[0]
    assert _step_of(out / "last.pt") == stopped  # written by the stop: ckpt_every=100 writes no periodic one
    assert _metric_steps(out) == list(range(1, stopped + 1))
    assert not (out / "checkpoint.pt").exists()

    res = _pretrain(out, shard_dir)
    # meanwhile the unbroken run, in this process (one thread, like the subprocesses)
    train(compose_config([*PRETRAIN, f"data.shards={shard_dir}", f"out_dir={ref}"]))
    rerun, _ = res.communicate(timeout=300)
    assert res.returncode == 0, rerun[-3000:]
    assert f"resumed from {out / 'last.pt'} at step {stopped}" in log.read_text()
    got = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    want = torch.load(ref / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert _differing(got["model"], want["model"]) == []  # both encoders, BN statistics, the queue
    assert _metric_steps(out) == list(range(1, 13))


# ------------------------------------------------------------------------------------ detection fine-tuning


def _det_cfg(world: Path, **kw) -> dict:  # noqa: F811
    """Faster R-CNN C4 at toy size; multi-scale training, so the transform draws from the global RNG too."""
    return {"protocol": "finetune_det", "format": "voc_det", "root": str(world / "voc"),
            "splits": {"train": "2007_trainval", "test": "2007_test"}, "steps": 24, "batch_size": 2,
            "save_every": 4, "min_size_train": [56, 64, 72], "min_size_test": 64, "max_size": 96,
            "anchor_sizes": [8, 16, 32], "rpn_pre_nms_train": 200, "rpn_post_nms_train": 50,
            "rpn_pre_nms_test": 100, "rpn_post_nms_test": 50, "rpn_batch_per_image": 32, "roi_batch_per_image": 32,
            **kw}  # fmt: skip


@pytest.fixture(scope="module")
def det_reference(tmp_path_factory, world):  # noqa: F811
    """An unbroken detection fine-tuning run: its result and final weights."""
    root = tmp_path_factory.mktemp("det_reference")
    ckpt = make_checkpoint(root / "c.pt")
    res = finetune.finetune(ckpt, "det", _det_cfg(world), state_dir=root / "state", progress=False)
    return ckpt, res, torch.load(root / "state" / "state.pt", weights_only=True)["model"]


def _assert_same_as(res: dict, state_dir: Path, reference) -> None:
    _, want, weights = reference
    got = torch.load(state_dir / "state.pt", weights_only=True)
    assert got["step"] == want["settings"]["steps"]
    assert _differing(got["model"], weights) == []  # before the RNG was saved: most tensors differed
    assert json.dumps(res["metrics"], sort_keys=True) == json.dumps(want["metrics"], sort_keys=True)  # NaN-safe
    assert res["final_loss"] == want["final_loss"]


def _finetune_cli(ckpt: Path, cfg: dict, tmp: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "analysis.finetune", "--checkpoint", str(ckpt), "--name", "det", "--target-json",
           json.dumps(cfg), "--out", str(tmp / "det.json"), "--state-dir", str(tmp / "state"), "--no-progress"]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_detection_killed_9_then_sigterm_resumes_exactly(tmp_path, world, det_reference):  # noqa: F811
    ckpt, cfg, state = det_reference[0], _det_cfg(world), tmp_path / "state" / "state.pt"
    proc = _finetune_cli(ckpt, cfg, tmp_path)
    _wait_for(state.exists, proc, "the first periodic save")
    proc.kill()
    proc.communicate()
    killed = _step_of(state)
    assert 0 < killed < 24 and killed % 4 == 0

    proc = _finetune_cli(ckpt, cfg, tmp_path)  # resumes, and is signalled as soon as it says so
    out = _read_until(proc, f"resuming det from step {killed} of 24")
    proc.send_signal(signal.SIGTERM)
    out += proc.communicate(timeout=60)[0]
    assert proc.returncode == RETRY_EXIT, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = _stop_lines(out)
    assert len(lines) == 1, out[-3000:]
    stopped = int(re.search(r"at step (\d+)/24", lines[0]).group(1))
    assert killed <= stopped < 24 and _step_of(state) == stopped and str(state) in lines[0]
    assert not (tmp_path / "det.json").exists()

    res = finetune.finetune(ckpt, "det", cfg, state_dir=tmp_path / "state", progress=False)
    assert res["resumed_from_step"] == stopped
    _assert_same_as(res, tmp_path / "state", det_reference)


def test_sigterm_between_periodic_saves_saves_that_step(tmp_path, world, det_reference):  # noqa: F811
    """The signal arrives during step 3 (saves every 4): the state is written at 3, not left at 0."""
    ckpt, cfg = det_reference[0], _det_cfg(world)
    before = signal.getsignal(signal.SIGTERM)

    def signal_at_3(done: int, model: torch.nn.Module) -> None:
        if done == 3:
            assert signal.getsignal(signal.SIGTERM) not in (before, signal.SIG_DFL), "no handler: it would kill pytest"
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunStopped, match=r"received SIGTERM at step 3/24") as stopped:
        with StopSignals() as stop:
            finetune.finetune(ckpt, "det", cfg, state_dir=tmp_path / "state", progress=False, on_step=signal_at_3,
                              stop=stop)  # fmt: skip
    assert stopped.value.exit_code == RETRY_EXIT == 75
    assert signal.getsignal(signal.SIGTERM) == before  # the handler lives only as long as the run
    saved = torch.load(tmp_path / "state" / "state.pt", weights_only=True)
    assert saved["step"] == 3 and len(saved["rng"]) == 1

    res = finetune.finetune(ckpt, "det", cfg, state_dir=tmp_path / "state", progress=False)
    assert res["resumed_from_step"] == 3
    _assert_same_as(res, tmp_path / "state", det_reference)


def test_a_fetch_that_the_signal_breaks_still_stops_exactly(tmp_path, world, det_reference, monkeypatch):  # noqa: F811
    """SLURM's TERM reaches the DataLoader workers too, and they die of it: the fetch of the next batch can fail
    (having drawn from the RNG, as a new epoch's iter() does). The run still stops at that step, with the state
    as it was before the fetch."""
    ckpt, cfg = det_reference[0], _det_cfg(world)
    real = torch.utils.data.DataLoader

    class WorkersDie(real):
        def __iter__(self):
            for k, items in enumerate(super().__iter__()):
                if k == 3:  # the fetch of step 3
                    os.kill(os.getpid(), signal.SIGTERM)
                    torch.rand(1)
                    raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")
                yield items

    monkeypatch.setattr(torch.utils.data, "DataLoader", WorkersDie)
    with pytest.raises(RunStopped, match=r"received SIGTERM at step 3/24"), StopSignals() as stop:
        finetune.finetune(ckpt, "det", cfg, state_dir=tmp_path / "state", progress=False, stop=stop)
    monkeypatch.undo()
    res = finetune.finetune(ckpt, "det", cfg, state_dir=tmp_path / "state", progress=False)
    assert res["resumed_from_step"] == 3
    _assert_same_as(res, tmp_path / "state", det_reference)


# --------------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, port: int, ckpt: str, cfg: dict, tmp: str) -> None:
    """Two gloo processes: a damaged state.pt (rank 0 judges it, the run starts over: the unbroken reference),
    then a run of which rank 1 alone is signalled (during step 3), then its resume to the end."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    judged: list[str] = []  # the state files this rank read and judged itself
    load_state = finetune._load_state
    finetune._load_state = lambda path, fp: (judged.append(str(path)), load_state(path, fp))[1]

    def signal_rank1_at_3(done: int, model: torch.nn.Module) -> None:
        if rank == 1 and done == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        unbroken = finetune.finetune(ckpt, "det", cfg, state_dir=f"{tmp}/unbroken", progress=False)
        try:
            with StopSignals() as stop:
                finetune.finetune(ckpt, "det", cfg, state_dir=f"{tmp}/run", progress=False,
                                  on_step=signal_rank1_at_3, stop=stop)  # fmt: skip
            stopped = "did not stop"
        except RunStopped as exc:
            stopped = str(exc)
        resumed = finetune.finetune(ckpt, "det", cfg, state_dir=f"{tmp}/run", progress=False)
        Path(f"{tmp}/rank{rank}.json").write_text(json.dumps({"unbroken": unbroken, "stopped": stopped,
                                                              "resumed": resumed, "judged": judged}))  # fmt: skip
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_ranks_agree_on_a_damaged_state_and_on_the_stop_step(tmp_path, world, capfd):  # noqa: F811
    """Before: both ranks moved the damaged file aside and the loser died of FileNotFoundError (torchrun: exit
    1). Now rank 0 decides and the run starts over with one warning; a signal that reaches one rank stops both
    after the same step, with every rank's RNG saved, and the resume ends equal to the unbroken run."""
    ckpt = make_checkpoint(tmp_path / "c.pt")
    (tmp_path / "unbroken").mkdir()
    (tmp_path / "unbroken" / "state.pt").write_bytes(b"truncated")
    cfg = _det_cfg(world, steps=6, save_every=4, batch_size=4, sync_bn=False)
    # join raises if a rank fails (before: FileNotFoundError on the rank that lost the race to move the file)
    mp.spawn(_ddp_worker, args=(_free_port(), str(ckpt), cfg, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert capfd.readouterr().err.count("is unreadable") == 1
    # rank 0 alone judged each state file (the race needs both ranks at the file at once: rarely seen in a test)
    assert len(ranks[0]["judged"]) == 3 and ranks[1]["judged"] == []
    assert (tmp_path / "unbroken" / "state.pt.corrupt").read_bytes() == b"truncated"
    assert ranks[0]["unbroken"]["resumed_from_step"] == 0
    for r in ranks:  # rank 0 was never signalled: it stopped at the step the ranks agreed on
        assert "received SIGTERM at step 3/6" in r["stopped"], r["stopped"]
    assert ranks[0]["resumed"]["resumed_from_step"] == 3
    got = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    want = torch.load(tmp_path / "unbroken" / "state.pt", weights_only=True)
    assert len(want["rng"]) == 2 and got["step"] == want["step"] == 6
    assert _differing(got["model"], want["model"]) == []
    same = [json.dumps(ranks[0][k]["metrics"], sort_keys=True) for k in ("resumed", "unbroken")]
    assert same[0] == same[1]
