"""Run integrity for the pretraining app: errors, the run-folder lock, atomic checkpoints, RNG state, guards.

Why each piece exists (faults met on clusters, issue 10):

- ``RunError``: a bad value or a broken run folder is the user's to fix, so it ends the process with one line
  naming the file or key and the fix (``study.train.main`` prints it), not a traceback.
- ``acquire_run_lock``: two trainers in one folder interleave ``metrics.csv`` and ``train.log`` and overwrite
  each other's checkpoints. A POSIX record lock (``fcntl.lockf``) on ``<out_dir>/.lock`` is held for the
  process's life and released by the OS when it dies, even by ``kill -9``. Not ``flock``: DataLoader workers
  are forked and would inherit a ``flock`` lock, keeping it after the trainer was killed; record locks are
  per process and also work on NFS.
- ``atomic_save``: a checkpoint is written to ``<name>.tmp``, fsynced and renamed, so a kill leaves the old
  one intact; a full or read-only disk removes the temp file and says so (torch's own error, "enforce fail ...
  unexpected pos", names neither).
- ``rng_state`` / ``set_rng_state``: every global RNG (torch CPU and CUDA, numpy, python ``random``) in a form
  that loads with ``torch.load(weights_only=True)``, so a resumed run draws what the unbroken one drew.
- ``load_resume_state`` / ``restore_training_state``: a ``last.pt`` that is truncated, foreign, of another
  configuration (``study.runconfig.config_diff``) or of another model is refused before any work, in one line
  with the command that moves it aside; otherwise every rerun would fail the same opaque way.
- ``all_ranks`` / ``from_rank0`` / ``gather_rng``: under DDP a stop decided on one rank is taken by all (else
  the others hang in the next collective), and every rank's RNG goes into rank 0's checkpoint.
- ``nonfinite_tensors``: parameters *and* buffers (BatchNorm statistics, the MoCo queue) are checked before a
  checkpoint is written: after divergence the BN running variances go to inf before any weight does.
- ``CollapseGuard``: a collapsed run (one embedding for every image) sits at the loss of uniform logits and
  exits 0; the guard flags it from the logged pretext monitors.
- ``StopSignals`` / ``RunStopped`` / ``RETRY_EXIT`` (issue 19): SLURM sends SIGTERM at the time limit and on
  preemption (and a ``--signal`` of choice before the limit); without a handler the process dies at once and
  the steps since the last periodic checkpoint are lost. The handler only sets a flag; the training loop reads
  it at a step boundary (agreed by all ranks), saves its resume state there with the periodic save's code, and
  exits with ``RETRY_EXIT`` so that Snakemake's ``retries`` reruns the job, which resumes exactly.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import random
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from study.exitcodes import RETRY_EXIT


class RunError(RuntimeError):
    """A problem the user fixes (bad value, busy or broken run folder, full disk); printed as one line."""

    exit_code = 1


class RunLocked(RunError):
    """Another trainer holds the run folder."""


class ResumeError(RunError):
    """``last.pt`` cannot be resumed: another run's config, truncated, or weights of another model."""


class DiskWriteError(RunError):
    """A checkpoint could not be written (disk full, quota, read-only)."""


class TrainingDiverged(RunError):
    """The loss or the weights became NaN/inf; the last good checkpoint is left untouched."""


class TrainingCollapsed(RunError):
    """The run collapsed and ``guard.stop_on_collapse`` asked to stop."""


# EX_TEMPFAIL, the status of a run stopped by SIGTERM / SIGUSR1 after saving its state: see study.exitcodes


class RunStopped(RunError):
    """A stop signal arrived; the resume state was saved at a step boundary. Not a failure of the run itself."""

    exit_code = RETRY_EXIT


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The first non-empty line of an exception's message (torch's load errors run to 65 lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def move_aside_cmd(path: Path, suffix: str) -> str:
    """Shell command that moves ``path`` out of the way (printed in messages, never run)."""
    p = str(Path(path).resolve())
    return f"mv {shlex.quote(p)} {shlex.quote(p + suffix)}"


# ------------------------------------------------------------------------------------------- the lock

# lock path -> fd, open for the life of the process. A POSIX lock is dropped when its process closes *any* fd
# of the file, so nothing in the trainer opens .lock again.
_HELD: dict[str, int] = {}


def _holder_alive(info: dict[str, str]) -> bool:
    """False only when the holder is known dead: same host and its pid no longer exists."""
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info.get("pid", "")), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _read_holder(fd: int) -> dict[str, str]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace")
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def acquire_run_lock(out_dir: str | os.PathLike, wait_dead_s: float = 15.0) -> Path:
    """Take ``<out_dir>/.lock`` for this process (idempotent); raise ``RunLocked`` naming the holder.

    A holder that is recorded as dead on this host (its pid is gone) can only be a leftover child, e.g. a
    DataLoader worker of a killed trainer that has not noticed yet; it is waited for up to ``wait_dead_s``.
    """
    path = Path(out_dir).resolve() / ".lock"
    if str(path) in _HELD:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise DiskWriteError(write_failure(path, exc)) from None
    deadline = time.monotonic() + wait_dead_s
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            info = _read_holder(fd)
            if _holder_alive(info) or time.monotonic() > deadline:
                os.close(fd)
                who = (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
                       if info else "a process that has not written its details yet")
                raise RunLocked(
                    f"{path.parent} is in use by another trainer ({who}; lock {path}): two trainers in one folder "
                    f"would mix metrics.csv, train.log and checkpoints. Wait for it to finish, or if it is an orphan "
                    f"stop it (kill {info.get('pid', '<pid>')} on {info.get('host', 'its host')}) and rerun."
                ) from None
            time.sleep(0.2)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"pid={os.getpid()} host={socket.gethostname()} started={started}\n".encode())
    _HELD[str(path)] = fd
    return path


def rotate_log(path: Path) -> Path | None:
    """Keep a previous attempt's log: ``train.log`` -> ``train.log.N`` (N = next free number, oldest is 1)."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    dest = path.with_name(f"{path.name}.{n}")
    os.replace(path, dest)
    return dest


# ---------------------------------------------------------------------------------------- checkpoints

UNWRITABLE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}  # fmt: skip


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    except OSError:
        return "free space unknown"


def write_failure(path: Path, exc: BaseException) -> str:
    """One-line reason for a failed write of ``path``; torch's zip writer hides ENOSPC behind 'enforce fail'."""
    err = getattr(exc, "errno", None)
    if err in UNWRITABLE:
        reason = f"{UNWRITABLE[err]} ({_free_space(path.parent)})"
    else:
        reason = (f"the write failed ({first_line(exc, 120)}; {_free_space(path.parent)}): the disk is probably "
                  "full or not writable")
    return (f"cannot write {path}: {reason}. Free space (or point out_dir at a writable disk) and rerun; the "
            "previous checkpoint, if any, is untouched and the run resumes from it.")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``<path>.tmp``, fsync, rename; on failure remove the temp file and raise one line."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise DiskWriteError(write_failure(path, exc)) from None


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of floating tensors holding NaN/inf (one device sync for all of them)."""
    items = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    if not items:
        return []
    flags = torch.stack([torch.isfinite(t).all() for _, t in items]).cpu()
    return [n for (n, _), ok in zip(items, flags.tolist(), strict=True) if not ok]


def model_nonfinite(model: torch.nn.Module) -> list[str]:
    """Non-finite parameters and buffers (BN running statistics, the MoCo queue) of ``model``."""
    return nonfinite_tensors(list(model.named_parameters()) + list(model.named_buffers()))


# ------------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    """Every global RNG of this process as tensors and primitives (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state(torch.cuda.current_device())
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured (CUDA only when it was captured and a device is in use)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached"]))  # fmt: skip
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))


# ---------------------------------------------------------------------------------------------- resume


def load_resume_state(path: Path, config: dict[str, Any], data_id: str | None) -> dict[str, Any]:
    """The checkpoint to resume from, refused (one line, with the command that moves it aside) if it is
    unreadable or was written under another configuration or data."""
    bad = move_aside_cmd(path, ".bad")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...: torch's messages vary and omit the file
        raise ResumeError(f"cannot resume from {path}: it is truncated or not a checkpoint of this trainer "
                          f"({first_line(exc, 120)}); move it aside to start fresh: {bad}") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "config"} <= set(state):
        raise ResumeError(f"cannot resume from {path}: it lacks the model, optimizer, step or config of a "
                          f"trainer checkpoint; move it aside to start fresh: {bad}")
    from study.runconfig import config_diff  # runconfig imports this module

    diff = config_diff(state["config"], config)
    if data_id and state.get("data_id") and state["data_id"] != data_id:
        diff.append(f"data: shards {state['data_id']} -> {data_id} (rebuilt, or another subset)")
    if diff:
        more = f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
        old = move_aside_cmd(path, f".{state.get('fingerprint') or 'old'}")
        saved = path.parent / "config.yaml"
        where = saved if saved.is_file() else f"the 'config' entry of {path.name}"
        raise ResumeError(
            f"{path} belongs to another run configuration ({'; '.join(diff[:6])}{more}), so this run cannot resume "
            f"from it. To start fresh, move it aside: {old}; to continue that run, rerun with its settings ({where}).")
    return state


def state_mismatch(own: dict[str, torch.Tensor], saved: Any) -> str | None:
    """What keeps ``saved`` from loading into a model with state ``own`` (load_state_dict's error is 65 lines)."""
    if not isinstance(saved, dict):
        return f"the model entry is a {type(saved).__name__}"
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [f"{k}: {'x'.join(map(str, saved[k].shape))} in the file, {'x'.join(map(str, v.shape))} here"
              for k, v in own.items() if k in saved and tuple(getattr(saved[k], "shape", ())) != tuple(v.shape)]
    parts = shapes[:2] + ([f"{len(shapes) - 2} more shape(s) differ"] if len(shapes) > 2 else [])
    parts += [f"{len(missing)} missing key(s), e.g. {missing[0]}"] if missing else []
    parts += [f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}"] if unexpected else []
    return "; ".join(parts) or None


def restore_training_state(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           path: Path) -> None:
    """Load model and optimiser from ``state``; weights of another model, or NaN/inf ones (a checkpoint written
    before buffers were checked), are refused in one line instead of load_state_dict's 65."""
    bad = move_aside_cmd(path, ".bad")
    why = state_mismatch(model.state_dict(), state["model"])
    if why is None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            why = first_line(exc, 160)
    if why is not None:
        raise ResumeError(f"cannot resume from {path}: its weights do not fit this model ({why}); move it aside to "
                          f"start fresh: {bad}")
    nonfinite = model_nonfinite(model)
    if nonfinite:
        raise ResumeError(f"cannot resume from {path}: it holds NaN/inf values ({', '.join(nonfinite[:3])}); "
                          f"move it aside to start fresh: {bad}")


# ------------------------------------------------------------------------------------------------ DDP


def all_ranks(ok: bool, world: int, device: torch.device) -> bool:
    """True when ``ok`` holds on every rank, so all ranks stop together instead of hanging in a collective."""
    if world == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def from_rank0(flag: bool, world: int, device: torch.device) -> bool:
    """Rank 0's decision on every rank."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather_rng(epoch_rng: dict[str, Any] | None, world: int,
               step_rng: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The RNG state of every rank (now, or ``step_rng`` captured earlier between the same two steps, and at the
    start of the current epoch), in rank order."""
    mine = {"step": rng_state() if step_rng is None else step_rng, "epoch_start": epoch_rng}
    if world == 1:
        return [mine]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    return out


def agree_on_state(path: Path, load: Callable[[], dict[str, Any] | None], rank: int, world: int,
                   device: torch.device, error: type[Exception] = RunError) -> dict[str, Any] | None:
    """A resume state as rank 0 judged it, on every rank.

    Rank 0 alone runs ``load`` (which reads ``path``, moves a damaged file aside with one warning, or refuses a
    foreign one) and broadcasts the verdict; the other ranks then load the file it accepted. When every rank
    judged for itself, all of them moved the same damaged file and the losers died of FileNotFoundError.
    """
    state, verdict, failure = None, ("fresh", ""), None
    if rank == 0:
        try:
            state = load()
        except Exception as exc:
            if world == 1:
                raise
            verdict, failure = ("error", f"{type(exc).__name__}: {first_line(exc)}"), exc
        else:
            verdict = ("resume" if state is not None else "fresh", "")
    if world == 1:
        return state
    box: list[Any] = [verdict]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    kind, message = box[0]
    if kind == "error":
        if rank == 0 and failure is not None:
            raise failure
        raise error(f"rank 0 could not use {path}: {message}")
    if kind == "resume" and rank != 0:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state


# ------------------------------------------------------------------------------------------ stop signals

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """SIGTERM / SIGUSR1 turned into a flag that the training loop reads between steps.

    A context manager for the CLI path only (importing a module or calling ``train`` / ``finetune`` from
    Python installs nothing): it installs the handlers on entry and restores the previous ones on exit. The
    handler does nothing but record the first signal, so the current step finishes and no half-updated state
    is ever saved. SLURM signals every process of a job step, DataLoader workers included, and torch's workers
    die of a SIGTERM that their parent did not send: once a stop is pending, torch's SIGCHLD check (which would
    raise "DataLoader worker ... killed" anywhere in the step) is switched off, and a batch fetch that fails
    then is the stop's doing (the loops capture the RNG before each fetch, so the stop saves the state as it was
    before the step).
    """

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received = 0  # the first signal's number; 0: none
        self._previous: dict[int, Any] = {}
        self._sigchld: Any = None

    def __enter__(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():  # Python handlers live in the main thread
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}
        if self._sigchld is not None:
            signal.signal(signal.SIGCHLD, self._sigchld)
            self._sigchld = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:
            return
        self.received = int(signum)
        current = signal.getsignal(signal.SIGCHLD)
        if getattr(current, "__module__", "").startswith("torch.utils.data"):
            self._sigchld = current
            # a Python no-op, not SIG_DFL: a SIGCHLD already pending would print "Signal 17 ignored due to race
            # condition" with a traceback
            signal.signal(signal.SIGCHLD, _ignore_signal)

    def agreed(self, world: int, device: torch.device, failed: bool = False) -> tuple[int, bool]:
        """(the signal to stop for, 0: go on; whether ``failed`` holds on any rank), the same on every rank.

        Every rank calls it at the same point of each step: one all_reduce (MAX) of two scalars under DDP, so
        the ranks stop at the same step even when the signal reached them at different moments, or only one of
        them, and a batch fetch that failed on one rank stops all of them instead of leaving the others waiting
        in the next collective.
        """
        if world == 1:
            return self.received, failed
        flags = torch.tensor([float(self.received), float(failed)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        sig, any_failed = flags.tolist()
        return int(sig), bool(any_failed)


def _ignore_signal(signum: int, frame: Any) -> None:
    """A Python-level handler that does nothing."""


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, the number for an unknown one."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ------------------------------------------------------------------------------------------- collapse


@dataclass
class CollapseGuard:
    """Flags a collapsed run from the logged pretext monitors.

    Collapse (every image gets the same embedding) shows as positive logit == negative logit and a loss equal
    to ``ln(1 + negatives)``, the cross-entropy of uniform logits. Early training can sit near that loss too,
    and on a small model a single logged row can show a vanishing gap by chance, so a row only counts after
    ``min_step`` (one pass of the queue: before it the negatives are the random initial queue) and the run is
    declared collapsed only after ``rows`` consecutive such rows.
    """

    rows: int
    gap: float
    loss_rtol: float
    min_step: int
    streak: int = 0
    since: int = 0  # first step of the current streak
    warned: bool = False

    def update(self, step: int, loss_inst: float, pos: float, neg: float, chance: float) -> bool:
        """Feed one logged row; True while the run is declared collapsed."""
        hit = (step >= self.min_step and abs(pos - neg) < self.gap
               and abs(loss_inst - chance) <= self.loss_rtol * chance)  # fmt: skip
        if hit:
            self.since = self.since if self.streak else step
            self.streak += 1
        else:
            self.streak, self.warned = 0, False
        return self.streak >= self.rows

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "since": self.since, "warned": self.warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak, self.since, self.warned = int(state["streak"]), int(state["since"]), bool(state["warned"])

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def chance_loss(negatives: int) -> float:
    """InfoNCE loss when all ``1 + negatives`` logits are equal."""
    return math.log(1 + negatives)


def fail(exc: BaseException, prog: str = "study.train") -> None:
    """Print one line on stderr and exit with the error's code."""
    print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
    raise SystemExit(getattr(exc, "exit_code", 1))
