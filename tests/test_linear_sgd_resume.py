"""MoCo's SGD linear recipe at cluster scale (issue 19, part 4): per-epoch resumable state, SIGTERM / SIGUSR1,
decode workers and DDP, each checked against an unbroken run.

The data is tiny on purpose: 9 train images of 64 px (batch 4: steps of 4, 4 and 1 image, so under 2 processes
the last step leaves rank 1 without an image), 4 test images, a width-8 ResNet-18 at 32 px, 4 epochs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from analysis import linear_sgd, transfer
from analysis.features import FeatureExtractor
from analysis.targets import TargetError
from study.models import build_backbone
from study.runstate import RETRY_EXIT, RunStopped, StopSignals

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the subprocesses compute like the one-thread test process
STEPS = 3  # per epoch: ceil(9 / 4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Data:
    ckpt: Path
    cache: Path
    cfg: dict


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    root = tmp_path_factory.mktemp("linear_sgd_resume")
    torch.manual_seed(0)
    net, feat_dim = build_backbone("resnet18", small_input=True, width=8)
    ckpt = root / "c.pt"
    torch.save({"backbone": net.state_dict(), "arch": "resnet18", "small_input": True, "feat_dim": feat_dim,
                "width": 8}, ckpt)  # fmt: skip
    rng = np.random.default_rng(0)
    for split, counts in (("train", {"red": 5, "blue": 4}), ("val", {"red": 2, "blue": 2})):
        for c, col in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            (root / "data" / split / c).mkdir(parents=True)
            for i in range(counts[c]):
                arr = np.clip(np.asarray(col)[None, None] + rng.integers(-60, 60, (64, 64, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(root / "data" / split / c / f"{i}.jpg")
    cfg = {"protocol": "linear", "format": "imagefolder", "root": str(root / "data"), "recipe": "moco_sgd",
           "image_size": 32, "epochs": 4, "milestones": [2], "batch_size": 4, "lr": 0.1}  # fmt: skip
    return Data(ckpt, root / "cache", cfg)


def _run(data: Data, state_dir: Path | None, cfg: dict | None = None, **kw) -> dict:
    """``run_target``'s path to the recipe, with the hooks (``stop``, ``on_step``) that the CLI does not expose.
    Every run also checks that the recipe leaves the global torch RNG as it found it: it draws from none, which is
    why (epoch, step) is all the RNG state a resume needs."""
    cfg = cfg or data.cfg
    s = transfer.resolve_settings(cfg, "T")
    train, test = transfer._image_splits("T", cfg)
    ext = FeatureExtractor(data.ckpt, data.cache, target="T", device="cpu", progress=False)
    spec = transfer._pooled_spec(s, train)
    ext.network(spec, train)  # built now: a network's own initialisation draws from the global RNG
    rng = torch.get_rng_state()
    try:
        return linear_sgd.run_moco_sgd(ext, train, test, s, spec, name="T", state_dir=state_dir, **kw)
    finally:
        assert torch.equal(torch.get_rng_state(), rng), "the recipe drew from the global torch RNG"


def _state(state_dir: Path) -> dict:
    return torch.load(state_dir / "state.pt", map_location="cpu", weights_only=True)


@dataclass
class Reference:
    res: dict
    fc: dict[str, torch.Tensor]
    state: Path


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Reference:
    """An unbroken one-process run: its result, final fc weights and state file."""
    state_dir = tmp_path_factory.mktemp("reference")
    res = _run(data, state_dir)
    state = _state(state_dir)
    assert (state["epoch"], state["step"]) == (4, 0) and res["settings"]["resumed_from"] == {"epoch": 0, "step": 0}
    return Reference(res, state["fc"], state_dir / "state.pt")


def _assert_same_as(top1: float, losses: list[float], state_dir: Path, ref: Reference) -> None:
    """Final weights tensor-equal, the same metric and the same per-epoch losses as the unbroken ``ref``."""
    got = _state(state_dir)
    assert (got["epoch"], got["step"]) == (ref.res["settings"]["epochs"], 0)
    assert [k for k in ref.fc if not torch.equal(got["fc"][k], ref.fc[k])] == []
    assert top1 == ref.res["top1"]
    assert losses == ref.res["settings"]["train_loss_per_epoch"]


def _same(res: dict, state_dir: Path, ref: Reference) -> None:
    _assert_same_as(res["top1"], res["settings"]["train_loss_per_epoch"], state_dir, ref)


class _Kill(Exception):
    pass


def test_views_depend_on_seed_epoch_and_image_only(data):
    """The split of a global step over ranks covers it exactly; a view is the same whoever draws it."""
    batches = [list(linear_sgd.EpochBatches((1, 1), 3, 4, 9, seed=0, rank=r, world=2)) for r in (0, 1)]
    order = [linear_sgd.epoch_order(0, e, 9) for e in (1, 2)]
    steps = [(e, k) for e in (1, 2) for k in range(STEPS) if (e, k) != (1, 0)]
    assert len(batches[0]) == len(batches[1]) == len(steps) == 5
    for (e, k), a, b in zip(steps, *batches, strict=True):
        assert sorted(a + b) == sorted((int(i), e) for i in order[e - 1][4 * k : 4 * k + 4])
    assert batches[1][-1] == []  # epoch 2's last step holds one image: rank 1 has none
    train = transfer._image_splits("T", data.cfg)[0]
    views = linear_sgd.EpochViews(linear_sgd.IndexedImages(train, linear_sgd.train_transform(32, (0.5,) * 3,
                                                                                            (0.5,) * 3)), seed=0)
    torch.manual_seed(123)
    a = views[(3, 5)][0]
    torch.manual_seed(456)  # another global RNG state: the same view
    assert torch.equal(views[(3, 5)][0], a) and not torch.equal(views[(3, 6)][0], a)


def test_killed_after_an_epoch_resumes_exactly_with_other_workers(data, reference, tmp_path):
    def kill_after_epoch_1(epoch: int, done: int, fc: torch.nn.Module) -> None:
        if (epoch, done) == (0, STEPS):
            raise _Kill

    with pytest.raises(_Kill):
        _run(data, tmp_path / "s", on_step=kill_after_epoch_1)
    state = _state(tmp_path / "s")
    assert (state["epoch"], state["step"], len(state["losses"])) == (1, 0, 1)
    # decode workers are not part of the fingerprint: the rerun may use another number (the views do not change)
    res = _run(data, tmp_path / "s", cfg={**data.cfg, "num_workers": 2})
    assert res["settings"]["resumed_from"] == {"epoch": 1, "step": 0}
    _same(res, tmp_path / "s", reference)
    # killed after the last save, before the result was written: the rerun only tests, with the same numbers
    again = _run(data, tmp_path / "s")
    assert again["settings"]["resumed_from"] == {"epoch": 4, "step": 0}
    _same(again, tmp_path / "s", reference)


def test_sigterm_mid_epoch_saves_that_step_and_the_rerun_is_exact(data, reference, tmp_path):
    before = signal.getsignal(signal.SIGTERM)

    def signal_in_epoch_3(epoch: int, done: int, fc: torch.nn.Module) -> None:
        if (epoch, done) == (2, 1):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunStopped, match=r"received SIGTERM at step 1/3 of epoch 3/4") as stopped:
        with StopSignals() as stop:
            _run(data, tmp_path / "s", stop=stop, on_step=signal_in_epoch_3)
    assert stopped.value.exit_code == RETRY_EXIT and str(tmp_path / "s" / "state.pt") in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) == before
    state = _state(tmp_path / "s")
    assert (state["epoch"], state["step"]) == (2, 1) and state["partial"][0][1] == 4  # 4 images of epoch 3 seen
    res = _run(data, tmp_path / "s")
    assert res["settings"]["resumed_from"] == {"epoch": 2, "step": 1}
    _same(res, tmp_path / "s", reference)


def test_state_of_other_settings_is_refused_and_a_damaged_one_set_aside(data, reference, tmp_path, caplog):
    path = tmp_path / "s" / "state.pt"
    path.parent.mkdir()
    shutil.copy(reference.state, path)
    with pytest.raises(TargetError, match=rf"lr: 0\.1 -> 0\.05.*rm {re.escape(str(path))} to start over"):
        _run(data, tmp_path / "s", cfg={**data.cfg, "lr": 0.05})
    path.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="analysis.linear_sgd"):
        res = _run(data, tmp_path / "s")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"{path} is unreadable" in warnings[0] and "starts over" in warnings[0]
    assert (tmp_path / "s" / "state.pt.corrupt").read_bytes() == b"truncated"
    assert res["settings"]["resumed_from"] == {"epoch": 0, "step": 0}
    _same(res, tmp_path / "s", reference)


# --------------------------------------------------------------------------------------------- the CLI


def _cli(data: Data, cfg: dict, tmp: Path) -> list[str]:
    return ["--checkpoint", str(data.ckpt), "--name", "T", "--target-json", json.dumps(cfg), "--out",
            str(tmp / "T.json"), "--state-dir", str(tmp / "state"), "--cache-dir", str(data.cache), "--no-progress"]


def test_sigterm_to_the_cli_exits_with_the_retry_status_and_the_rerun_is_exact(data, tmp_path):
    """SIGTERM as SLURM sends it, to a running ``python -m analysis.transfer --state-dir``: the current step
    finishes, the state is saved there, one line names the signal, step and file, the status is RETRY_EXIT."""
    cfg = {**data.cfg, "epochs": 16, "milestones": [8]}  # about a second of work left after the first save
    ref_dir = tmp_path / "ref"
    ref = Reference(_run(data, ref_dir, cfg=cfg), _state(ref_dir)["fc"], ref_dir / "state.pt")
    state = tmp_path / "state" / "state.pt"
    proc = subprocess.Popen([sys.executable, "-m", "analysis.transfer", *_cli(data, cfg, tmp_path)], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not state.exists():
        assert proc.poll() is None, "the run ended before its first save: " + proc.stdout.read()[-3000:]
        assert time.time() < deadline, "timed out waiting for the first save"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == RETRY_EXIT, out[-3000:]
    assert time.time() - t0 < 10, "the stop took longer than a step and a save"
    lines = [ln for ln in out.splitlines() if "received SIGTERM at step" in ln]
    assert len(lines) == 1, out[-3000:]
    step, epoch = map(int, re.search(r"at step (\d+)/3 of epoch (\d+)/16", lines[0]).groups())
    saved = _state(tmp_path / "state")
    assert (saved["epoch"], saved["step"]) in {(epoch - 1, step), (epoch, 0)} and str(state) in lines[0]
    assert (saved["epoch"], saved["step"]) < (16, 0) and not (tmp_path / "T.json").exists()

    assert transfer.main(_cli(data, cfg, tmp_path)) == 0
    got = json.loads((tmp_path / "T.json").read_text())
    assert got["settings"]["resumed_from"] == {"epoch": saved["epoch"], "step": saved["step"]}
    _assert_same_as(got["value"], got["settings"]["train_loss_per_epoch"], tmp_path / "state", ref)


# --------------------------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, data: Data, tmp: str) -> None:
    """Two gloo ranks, as torchrun starts them: (1) an unbroken run over a damaged state file; (2) a run of
    which rank 1 alone is signalled, mid-epoch; (3) its resume through the CLI (``transfer.main``)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    final: dict[str, torch.Tensor] = {}

    def keep_final(epoch: int, done: int, fc: torch.nn.Module) -> None:
        if (epoch, done) == (3, STEPS):
            final.update({k: v.detach().clone() for k, v in fc.state_dict().items()})

    def signal_rank1(epoch: int, done: int, fc: torch.nn.Module) -> None:
        if rank == 1 and (epoch, done) == (1, 1):
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        unbroken = _run(data, Path(tmp) / "unbroken", on_step=keep_final)
        torch.save(final, f"{tmp}/rank{rank}.pt")
        try:
            with StopSignals() as stop:
                _run(data, Path(tmp) / "run" / "state", stop=stop, on_step=signal_rank1)
            stopped = "did not stop"
        except RunStopped as exc:
            stopped = str(exc)
        status = transfer.main(_cli(data, data.cfg, Path(tmp) / "run"))
        Path(f"{tmp}/rank{rank}.json").write_text(json.dumps({"unbroken": unbroken["top1"], "stopped": stopped,
                                                              "status": status}))  # fmt: skip
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_gloo_processes_agree_resume_exactly_and_match_one_process(data, reference, tmp_path, capfd):
    """Two processes at the same global batch take the same steps on the same views as one process (one global
    order and per-image views; a rank's loss is scaled so DDP's mean is the global batch's mean, the empty local
    batch of the last step included), but their weights are equal to one process's only to float rounding: the
    gradient is summed per half batch and all-reduced, not summed at once. What is exact, and asserted so: both
    ranks hold the same weights, a damaged state is judged by rank 0 alone (one warning, a fresh start), a signal
    to one rank stops both at the same step, and the resume ends tensor-equal to the unbroken 2-process run."""
    (tmp_path / "unbroken").mkdir()
    (tmp_path / "unbroken" / "state.pt").write_bytes(b"truncated")
    mp.spawn(_ddp_worker, args=(_free_port(), data, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert capfd.readouterr().err.count("is unreadable") == 1
    assert (tmp_path / "unbroken" / "state.pt.corrupt").read_bytes() == b"truncated"
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a.keys() == reference.fc.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the replicas
    unbroken = _state(tmp_path / "unbroken")
    assert all(torch.equal(unbroken["fc"][k], a[k]) for k in a) and unbroken["world_size"] == 2
    for k, w in reference.fc.items():  # one process: the same run up to float rounding
        torch.testing.assert_close(a[k], w, rtol=1e-4, atol=1e-6)
    for r in ranks:  # rank 0 was never signalled: it stopped at the step the ranks agreed on
        assert "received SIGTERM at step 1/3 of epoch 2/4" in r["stopped"], r["stopped"]
        assert r["status"] == 0 and r["unbroken"] == ranks[0]["unbroken"]
    got = json.loads((tmp_path / "run" / "T.json").read_text())  # written by rank 0 of the CLI
    assert got["settings"]["world_size"] == 2 and got["settings"]["per_process_batch"] == 2
    assert got["settings"]["resumed_from"] == {"epoch": 1, "step": 1} and got["value"] == ranks[0]["unbroken"]
    resumed = _state(tmp_path / "run" / "state")
    assert (resumed["epoch"], resumed["step"]) == (4, 0)
    assert [k for k in a if not torch.equal(resumed["fc"][k], a[k])] == []
