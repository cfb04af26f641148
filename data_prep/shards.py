"""Write a subset as webdataset shards: `{key}.jpg` (original bytes) + `{key}.json` per image.

The tar writer is a minimal ustar writer rather than `tarfile`/`webdataset.TarWriter`: headers are built
directly (byte-identical to `tarfile`'s USTAR headers, see tests), members go out with os.writev without
being copied together, and the manifest's sha256 is computed while writing. Measured in benchmarks/shards.py:
several times faster than either library and in the range of `tar -cf` itself.

Crash safety: every shard is written as `<name>.tar.tmp` and renamed when complete; `manifest.json` is removed
at the start and written last, atomically. A kill before the end leaves no incomplete `.tar` and no manifest;
a write error (ENOSPC) removes the `.tmp` and is reported with the shard's name.

Integrity: `verify_shards` (CLI: `python -m data_prep.shards verify DIR`) checks a finished directory against
its manifest before training: sizes, tar header checksums, member counts and sha256 (cached in `verified.json`).
It matters because tar readers stop silently at a corrupt member header: the samples after it are just gone.

Class mixing: subset.csv is sorted by key, and ImageNet-style keys start with the class (wnid), so writing in
that order would fill each shard with runs of a few classes. A streaming loader reads a shard front to back
(its shuffle buffer only mixes nearby samples), so its batches would then hold a handful of classes, and
BatchNorm, which normalises with per-batch statistics, would see class-specific means and variances (at paper
scale about 9 distinct classes per batch of 64 instead of about 62), which biases the study. So records are
first put into a seeded pseudo-random order, `shuffle_order`: sorted by sha256(f"{shuffle_seed}:{key}"),
which depends only on the seed and the keys (not on numpy/Python versions or the input order). The seed is
the config's `shards.shuffle_seed` and is recorded in the manifest (`options.shuffle_seed`, `order`), so the
order is reproducible and auditable; the same subset and seed still give byte-identical shards.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import shlex
import struct
import sys
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_prep.imageio import CheckResult, check_file
from data_prep.records import (
    MAX_KEY_LEN,
    Box,
    Record,
    atomic_write_text,
    configure_logging,
    is_valid_key,
    read_subset_csv,
)

log = logging.getLogger(__name__)

BLOCK = 512
RECORD = BLOCK * 20  # tar's default blocking factor; GNU tar and tarfile both pad archives to it
SHARD_MTIME = 0  # fixed so the same subset gives byte-identical shards
_ZEROS = bytes(RECORD)
JPEG_KINDS = ("jpeg", "grayscale", "cmyk")
_JSON = json.JSONEncoder(separators=(",", ":"))
_ESC = json.encoder.encode_basestring_ascii  # what json.dumps uses for strings (ensure_ascii=True)


class ShardError(ValueError):
    """A subset row cannot be written (bad key, ...), or written shards are unusable."""


class ShardIntegrityError(ShardError):
    """Written shards do not match their manifest.json (missing, truncated, corrupt, changed); the message names
    the shard, expected vs found, and the command that rebuilds them. Raised by `verify_shards` and, while
    reading, by `study.data`. Constructible from one message string, so torch's DataLoader can re-raise it."""


_MODE_IDS = b"0000444\0" + b"0000000\0" * 2  # mode 0444, uid 0, gid 0
# typeflag '0', linkname, magic+version, uname, gname, devmajor, devminor (NUL for regular files, as in tarfile
# since Python 3.9), prefix, padding.
_HEADER_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(32 + 32 + 8 + 8 + 155 + 12)
_CONST_SUM = sum(_MODE_IDS) + sum(_HEADER_TAIL) + 8 * 0x20  # the checksum field counts as 8 spaces


_MTIME_F = b"%011o\0" % SHARD_MTIME
_FIXED_SUM = _CONST_SUM + sum(_MTIME_F)


_HEADER = struct.Struct("100s24s12s12s8s356s")  # name, mode+uid+gid, size, mtime, chksum, rest (NUL-padded)


def _header(raw: bytes, raw_sum: int, size: int) -> bytes:
    size_f = b"%011o\0" % size
    chk = b"%06o\0 " % (_FIXED_SUM + raw_sum + sum(size_f))
    return _HEADER.pack(raw, _MODE_IDS, size_f, _MTIME_F, chk, _HEADER_TAIL)


def ustar_header(name: str, size: int) -> bytes:
    """A USTAR header for a regular file (mode 0444, uid/gid 0, fixed mtime, no user/group names),
    byte-identical to `tarfile.TarInfo.tobuf(USTAR_FORMAT)`; built from constant pieces because it runs twice
    per image."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ShardError(f"tar member name {name!r} is longer than 100 bytes; shorten the key")
    return _header(raw, sum(raw), size)


_SUM_JPG, _SUM_JSON = sum(b".jpg"), sum(b".json")


def sample_members(key: str, jpg: bytes, meta: bytes) -> tuple[bytes, ...]:
    """`{key}.jpg` and `{key}.json` as tar member pieces (header, data, padding, ...), ready to append to a
    shard; kept as pieces because os.writev writes them without first copying them together."""
    raw = key.encode("ascii")
    if len(raw) > 95:
        raise ShardError(f"key {key!r} is too long for a tar member name (max 95 bytes)")
    ks = sum(raw)
    return (
        _header(raw + b".jpg", ks + _SUM_JPG, len(jpg)),
        jpg,
        _ZEROS[: -len(jpg) % BLOCK],
        _header(raw + b".json", ks + _SUM_JSON, len(meta)),
        meta,
        _ZEROS[: -len(meta) % BLOCK],
    )


class TarStream:
    """Append-only tar writer that hashes what it writes; `close()` adds the end-of-archive blocks.

    Finished members are queued as they are (no copy into a buffer) and every ~1 MiB handed to one background
    thread that hashes them and writes them with os.writev (both release the GIL), in order, while the caller
    prepares the next members.
    """

    FLUSH = 1 << 20
    IOV_MAX = 512

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.sha = hashlib.sha256()
        self.parts: list[bytes] = []
        self.queued = 0
        self.size = 0
        self._io = ThreadPoolExecutor(1, thread_name_prefix="shard-write")
        self._pending: deque[Future] = deque()

    def _write(self, parts: list[bytes]) -> None:
        update = self.sha.update
        for p in parts:
            update(p)
        try:
            for i in range(0, len(parts), self.IOV_MAX):
                chunk = parts[i : i + self.IOV_MAX]
                done, want = os.writev(self.fd, chunk), sum(map(len, chunk))
                if done < want:  # short write (rare): finish the rest piece by piece
                    rest = memoryview(b"".join(chunk))[done:]
                    while rest:
                        rest = rest[os.write(self.fd, rest) :]
        except OSError as err:
            err.filename = str(self.path)  # os.writev's errors name no file; write_shards reports it
            raise

    def _flush(self) -> None:
        if self.parts:
            self.size += self.queued
            self._pending.append(self._io.submit(self._write, self.parts))
            self.parts, self.queued = [], 0
            while len(self._pending) > 4 or (self._pending and self._pending[0].done()):
                self._pending.popleft().result()  # bounded memory; re-raises write errors

    def add_raw(self, pieces: Sequence[bytes]) -> None:
        """Append complete, block-aligned member pieces (from `sample_members`)."""
        self.parts.extend(pieces)
        self.queued += sum(map(len, pieces))
        if self.queued >= self.FLUSH:
            self._flush()

    def add(self, name: str, data: bytes) -> None:
        self.add_raw((ustar_header(name, len(data)), data, _ZEROS[: -len(data) % BLOCK]))

    def close(self) -> None:
        """Finish the archive; `size` and `sha` are final afterwards."""
        end = 2 * BLOCK
        end += -(self.size + self.queued + end) % RECORD
        self.add_raw((_ZEROS[:end],))
        self._flush()
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._io.shutdown(wait=True)
            self._close_fd()

    def abort(self) -> None:
        """Stop after a failure (also after a failed `close()`): drop queued writes, close the file once."""
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._io.shutdown(wait=True)
        try:
            self._close_fd()
        except OSError:
            pass  # the file is being deleted; the error that led here is the one to report

    def _close_fd(self) -> None:
        # Idempotent: `close()` may fail (ENOSPC) after closing the fd and the caller then calls `abort()`. A
        # second os.close raised EBADF over the real error (and could close an fd reused by another thread).
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)  # may report a deferred write error (NFS, quota)
            except OSError as err:
                err.filename = str(self.path)
                raise


def shard_count(n: int, max_per_shard: int, min_shards: int = 1) -> int:
    """max(ceil(n / max_per_shard), min_shards): min_shards >= workers x nodes keeps every loader busy."""
    if max_per_shard < 1 or min_shards < 1:
        raise ValueError(f"max_per_shard and min_shards must be >= 1, got {max_per_shard}, {min_shards}")
    return max(math.ceil(n / max_per_shard), min_shards)


def split_even(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of `parts` chunks whose sizes differ by at most one."""
    q, r = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + q + (1 if i < r else 0)
        out.append((start, stop))
        start = stop
    return out


def _scaled_boxes(rec: Record, res: CheckResult) -> tuple[list[list], dict]:
    """Boxes in the pixels of the stored image: normalised OpenImages coords become absolute once the
    header gave the size; a max_side resize scales them."""
    attrs = rec.attributes
    boxes: list[Box] = rec.boxes
    if not boxes and "box_coords" not in attrs:
        return [], attrs
    if attrs.get("box_coords") == "normalized" and res.width and res.height:
        w, h = res.width, res.height
        boxes = [Box(b.x1 * w, b.y1 * h, b.x2 * w, b.y2 * h, b.label) for b in boxes]
        attrs = {**attrs, "box_coords": "absolute"}
    elif res.resized and res.src_size and boxes:
        sx, sy = res.width / res.src_size[0], res.height / res.src_size[1]
        boxes = [Box(b.x1 * sx, b.y1 * sy, b.x2 * sx, b.y2 * sy, b.label) for b in boxes]
    return [b.to_list() for b in boxes], attrs


def _jnum(v: int | None) -> str:
    return "null" if v is None else str(int(v))


def sample_json(rec: Record, res: CheckResult, class_index: dict[str, int]) -> bytes:
    """The `{key}.json` member. Formatted by hand for speed; equal to `json.dumps(meta, separators=(",", ":"))`
    of {path, class, class_index, boxes, attributes, width, height, n_objects} (tested)."""
    boxes, attrs = _scaled_boxes(rec, res)
    cls = rec.cls
    return (
        f'{{"path":{_ESC(rec.path)},"class":{"null" if cls is None else _ESC(cls)},'
        f'"class_index":{-1 if cls is None else class_index.get(cls, -1)},'
        f'"boxes":{_JSON.encode(boxes) if boxes else "[]"},"attributes":{_JSON.encode(attrs) if attrs else "{}"},'
        f'"width":{_jnum(res.width if res.width is not None else rec.width)},'
        f'"height":{_jnum(res.height if res.height is not None else rec.height)},"n_objects":{rec.n_objects}}}'
    ).encode("ascii")


@dataclass(slots=True)
class Built:
    """One sample after checking: its tar members, or why it was skipped."""

    status: str
    kind: str
    resized: bool
    verified: bool
    error: str
    members: tuple[bytes, ...] | None


def build_sample(rec: Record, class_index: dict[str, int], **check_kw) -> Built:
    res = check_file(rec.path, **check_kw)
    if res.data is None:
        return Built(res.status, res.kind, False, res.verified, res.error, None)
    members = sample_members(rec.key, res.data, sample_json(rec, res, class_index))
    return Built(res.status, res.kind, res.resized, res.verified, "", members)


_POOL_STATE: tuple = ()


def _pool_init(records: Sequence[Record], class_index: dict[str, int], check_kw: dict) -> None:
    global _POOL_STATE
    _POOL_STATE = (records, class_index, check_kw)


def _build_range(bounds: tuple[int, int]) -> list[Built]:
    records, class_index, kw = _POOL_STATE
    return [build_sample(r, class_index, **kw) for r in records[bounds[0] : bounds[1]]]


def _built(
    records: Sequence[Record], class_index: dict[str, int], workers: int, chunk: int = 64, **check_kw
) -> Iterator[Built]:
    """Read, check and pre-format samples in order, ahead of the writer.

    workers <= 1: one prefetch thread (file reads are syscalls that release the GIL, so they overlap with the
    writer's work). workers > 1: a forked process pool, for large subsets or CPU-bound checks (full decode,
    max_side resizing); records reach the workers by fork, only finished members travel back.
    """
    ranges = [(i, min(i + chunk, len(records))) for i in range(0, len(records), chunk)]
    if workers > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(workers, initializer=_pool_init, initargs=(records, class_index, check_kw)) as pool:
            for part in pool.imap(_build_range, ranges):
                yield from part
        return

    def run(bounds: tuple[int, int]) -> list[Built]:
        return [build_sample(r, class_index, **check_kw) for r in records[bounds[0] : bounds[1]]]

    with ThreadPoolExecutor(1, thread_name_prefix="shard-read") as ex:
        pending: deque[Future] = deque()
        it = iter(ranges)
        try:
            for c in itertools.islice(it, 4):
                pending.append(ex.submit(run, c))
            while pending:
                part = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(ex.submit(run, nxt))
                yield from part
        finally:
            for f in pending:
                f.cancel()


def shuffle_order(records: Sequence[Record], shuffle_seed: int | None) -> list[Record]:
    """The order records are written in: sorted by sha256(f"{shuffle_seed}:{key}") (ties, impossible for
    distinct keys, by key), or the given order when `shuffle_seed` is None (the class-ordered layout of old
    shard sets). See the module docstring for why."""
    if shuffle_seed is None:
        return list(records)
    prefix = f"{int(shuffle_seed)}:".encode("ascii")

    def rank(rec: Record) -> tuple[bytes, str]:
        return hashlib.sha256(prefix + rec.key.encode("utf-8")).digest(), rec.key

    return sorted(records, key=rank)


def _clean(out_dir: Path, name: str) -> None:
    """Remove the manifest first (so a half-rebuilt directory is never mistaken for a finished one), then
    this dataset's shards and temp files from earlier runs."""
    (out_dir / "manifest.json").unlink(missing_ok=True)
    (out_dir / VERIFIED).unlink(missing_ok=True)
    pat = re.compile(rf"^\.?{re.escape(name)}-\d{{6}}\.tar(\.tmp)?$")
    for p in out_dir.iterdir():
        if pat.match(p.name):
            p.unlink()


def _write_failed(err: OSError, shard: Path, done: int, total: int) -> OSError:
    """The writer's OSError (errno kept) with the shard, what was cleaned up, and the fix."""
    fix = (
        "free space on that file system or write the shards to another disk (--out), then rerun"
        if err.errno in (errno.ENOSPC, errno.EDQUOT)
        else "fix the cause and rerun"
    )
    return OSError(
        err.errno,
        f"{err.strerror or err} while writing shard {shard} ({done} of {total} shards done); removed its "
        f"partial {shard.name}.tmp, no manifest.json was written; {fix}",
    )


def write_shards(
    records: Sequence[Record],
    out_dir: str | Path,
    name: str,
    max_per_shard: int = 10000,
    min_shards: int = 1,
    max_side: int | None = None,
    workers: int = 1,
    quality: int = 95,
    full_decode: bool = False,
    progress: bool = True,
    shuffle_seed: int | None = 0,
) -> dict:
    """Write `<out_dir>/<name>-%06d.tar` shards and `manifest.json`; returns the manifest.

    Records are put in `shuffle_order(records, shuffle_seed)` (None: the given order, i.e. subset.csv's,
    which is sorted by key and so by class for ImageNet) and split into contiguous, evenly sized shards, so
    shard names and contents depend only on the subset and the arguments, not on which images turn out to be
    corrupt.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bad = [r.key for r in records if not is_valid_key(r.key)]
    if bad:
        raise ShardError(
            f"keys must match [A-Za-z0-9_-]+ and be <= {MAX_KEY_LEN} chars, e.g. {bad[:3]}; "
            "regenerate subset.csv with data_prep.subsets"
        )
    dup = [k for k, c in Counter(r.key for r in records).items() if c > 1]
    if dup:
        raise ShardError(f"duplicate keys in the subset, e.g. {dup[:3]}")
    n_shards = shard_count(len(records), max_per_shard, min_shards)
    if len(records) < n_shards:
        log.warning("%s: %d images for %d shards; some shards will be empty", name, len(records), n_shards)
    classes = sorted({r.cls for r in records if r.cls is not None})
    class_index = {c: i for i, c in enumerate(classes)}
    records = shuffle_order(records, shuffle_seed)
    _clean(out_dir, name)

    skipped: Counter = Counter()
    converted: Counter = Counter()
    flags: Counter = Counter()
    shards = []
    gen = _built(records, class_index, workers, max_side=max_side, quality=quality, full_decode=full_decode)
    bar = tqdm(total=len(records), unit="img", desc=f"shards {name}", disable=not progress)
    try:
        # Start the readers (and fork a pool) before any writer thread exists: forking a threaded process
        # can deadlock the child.
        first = next(gen, None)
        built = itertools.chain([first] if first is not None else [], gen)
        for idx, (start, stop) in enumerate(split_even(len(records), n_shards)):
            fname = f"{name}-{idx:06d}.tar"
            tmp = out_dir / f"{fname}.tmp"
            tar = TarStream(tmp)
            count = 0
            try:
                for i, rec in enumerate(records[start:stop], start=1):
                    b = next(built)
                    if not i % 256:
                        bar.update(256)
                    if b.members is not None and b.status == "ok" and b.kind == "jpeg" and not b.verified:
                        tar.add_raw(b.members)  # the common case, kept short
                        count += 1
                        continue
                    if b.members is None:
                        skipped[b.kind] += 1
                        if skipped[b.kind] <= 5:
                            log.warning("%s: skip %s (%s): %s", name, rec.path, b.kind, b.error)
                        continue
                    if b.status == "converted":
                        if b.kind not in JPEG_KINDS:
                            converted[b.kind] += 1
                        if b.resized:
                            converted["resized"] += 1
                    if b.kind in ("grayscale", "cmyk"):
                        flags[b.kind] += 1
                    if b.verified and b.kind in JPEG_KINDS:
                        flags["full_decode"] += 1
                    tar.add_raw(b.members)
                    count += 1
                bar.update((stop - start) % 256)
                tar.close()
            except BaseException as err:
                tar.abort()
                tmp.unlink(missing_ok=True)
                if isinstance(err, OSError) and err.filename == str(tmp):
                    raise _write_failed(err, out_dir / fname, idx, n_shards) from None
                raise
            tmp.replace(out_dir / fname)
            shards.append({"name": fname, "count": count, "bytes": tar.size, "sha256": tar.sha.hexdigest()})
    finally:
        bar.close()
        gen.close()
    manifest = {
        "dataset": name,
        "shards": shards,
        "totals": {
            "shards": len(shards),
            "images": sum(s["count"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "input_records": len(records),
        },
        "skipped": dict(sorted(skipped.items())),
        "converted": dict(sorted(converted.items())),
        "kept_flags": dict(sorted(flags.items())),
        "classes": classes,
        "order": "subset.csv" if shuffle_seed is None else f"sorted by sha256('{int(shuffle_seed)}:' + key)",
        "options": {
            "max_per_shard": max_per_shard,
            "min_shards": min_shards,
            "max_side": max_side,
            "quality": quality,
            "full_decode": full_decode,
            "shuffle_seed": None if shuffle_seed is None else int(shuffle_seed),
        },
    }
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    log.info(
        "%s: %d images in %d shards (%.1f MB), skipped %s, converted %s, kept %s",
        name,
        manifest["totals"]["images"],
        len(shards),
        manifest["totals"]["bytes"] / 1e6,
        manifest["skipped"] or "nothing",
        manifest["converted"] or "nothing",
        manifest["kept_flags"] or "-",
    )
    return manifest


def load_manifest(shards: str | os.PathLike, *, check_files: bool = True) -> tuple[dict, list[Path]]:
    """The manifest of a finished shard directory (or its manifest.json) and the paths of its shards.

    The one reader of the manifest for every later stage: a missing manifest means the shards are absent or
    incomplete (it is written last), and a listed shard that is gone is an error, not a silent skip
    (`check_files=False` leaves that to the caller, `verify_shards`). Contents are checked by `verify_shards`.
    """
    path = Path(shards)
    manifest = path if path.name == "manifest.json" else path / "manifest.json"
    if not manifest.is_file():
        build = (
            rebuild_command(manifest.parent)
            if manifest.parent.exists()
            else f"snakemake --cores 1 {_display(manifest.parent)}"
        )
        raise FileNotFoundError(
            f"{manifest} does not exist: the shards are missing or incomplete (manifest.json is written last); "
            f"build them with `{build}`"
        )
    meta = json.loads(manifest.read_text(encoding="utf-8"))
    tars = [manifest.parent / s["name"] for s in meta["shards"]]
    missing = [str(t) for t in tars if check_files and not t.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{manifest} lists shards that do not exist ({missing[:3]}); rebuild the shards: "
            f"{rebuild_command(manifest.parent, meta)}"
        )
    if meta.get("options", {}).get("shuffle_seed") is None and meta.get("classes"):
        log.warning(
            "%s: shards were written in subset order (no shuffle_seed), so each holds runs of one class and batches "
            "see few classes (biased BatchNorm statistics); rebuild them with data_prep.shards (shards.shuffle_seed)",
            manifest,
        )
    return meta, tars


# ------------------------------------------------------------------------------------------- verification

VERIFIED = "verified.json"  # sha256 cache next to manifest.json (see verify_shards)
HASH_BUDGET = 16 << 30  # bytes of not-yet-verified shards verify_shards(full=None) hashes per call
_ZERO_BLOCK = bytes(BLOCK)
_SIGNED_HEADER = struct.Struct("148b8x356b")
_FILE_TYPES = (b"0", b"\0", b"7")  # regular files; pax/GNU extension headers are not members


def _display(path: str | os.PathLike) -> str:
    """`path` as a user would type it in the current directory (relative when below it), shell-quoted."""
    p = os.path.abspath(path)
    rel = os.path.relpath(p)
    return shlex.quote(p if rel.startswith("..") else rel)


def rebuild_command(shard_dir: str | os.PathLike, manifest: dict | None = None) -> str:
    """How to rebuild a shard directory: the Snakemake target (the directory is rule `shards`' output, so it
    is removed first, else Snakemake sees it as up to date), plus the direct CLI when subset.csv sits next to it
    (the layout of results/data/{dataset}/) and the manifest gives the options."""
    d = _display(shard_dir)
    cmd = f"rm -r {d} && snakemake --cores 1 {d}"
    subset = Path(os.path.abspath(shard_dir)).parent / "subset.csv"
    if manifest and manifest.get("dataset") and subset.is_file():
        o = manifest.get("options", {})
        args = [f"--subset {_display(subset)} --out {d} --name {shlex.quote(str(manifest['dataset']))}"]
        args += [f"--max-per-shard {o['max_per_shard']}"] if o.get("max_per_shard") else []
        args += [f"--min-shards {o['min_shards']}"] if o.get("min_shards") else []
        args += [f"--max-side {o['max_side']}"] if o.get("max_side") else []
        args += [f"--quality {o['quality']}"] if o.get("quality") not in (None, 95) else []
        args += ["--full-decode"] if o.get("full_decode") else []
        args += ["--no-shuffle"] if o.get("shuffle_seed") is None else [f"--shuffle-seed {o['shuffle_seed']}"]
        cmd += f" (without Snakemake: python -m data_prep.shards {' '.join(args)})"
    return cmd


def _octal(field: bytes) -> int:
    """A tar number field: NUL/space-terminated octal, or GNU base-256 (first byte 0x80)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip(b" ") or b"0", 8)


def walk_members(path: str | os.PathLike) -> tuple[int, str | None]:
    """Count the regular-file members of a tar by walking its headers (no data is read), validating each
    header's checksum; returns (members, problem or None).

    Why: a corrupt header ends a tar *silently* for tarfile/webdataset (the samples after it are dropped with
    exit 0), and a truncated file shows up only as a ReadError deep inside a loader worker.
    """
    size = os.path.getsize(path)
    n = off = 0
    with open(path, "rb") as f:
        while True:
            f.seek(off)
            hdr = f.read(BLOCK)
            if len(hdr) < BLOCK:
                return n, (
                    f"ends at byte {size} where member header {n + 1} should start, with no end-of-archive "
                    "blocks (truncated)"
                )
            if hdr == _ZERO_BLOCK:
                return n, None
            unsigned = sum(hdr) - sum(hdr[148:156]) + 8 * 0x20
            try:
                stored, length = _octal(hdr[148:156]), _octal(hdr[124:136])
                ok = stored in (unsigned, sum(_SIGNED_HEADER.unpack(hdr)) + 8 * 0x20)
                bad = "" if ok else f"checksum field {stored:o}, header sums to {unsigned:o}"
            except ValueError:
                length, bad = 0, "checksum or size field is not a number"
            if bad:
                return n, (
                    f"member header {n + 1} (byte offset {off}) is corrupt ({bad}); tar readers stop there "
                    f"without an error, after {n // 2} samples"
                )
            end = off + BLOCK + -(-length // BLOCK) * BLOCK
            if end > size:
                name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                return n, (
                    f"member {n + 1} ({name!r}, byte offset {off}) needs {end} bytes but the file has {size} "
                    "(truncated)"
                )
            if hdr[156:157] in _FILE_TYPES:
                n += 1
            off = end


def _file_sha256(path: Path) -> str:
    h, buf = hashlib.sha256(), bytearray(1 << 20)  # hashlib.file_digest is Python >= 3.11
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> dict:
    # ctime as well as mtime: a tool that rewrites bytes and restores the mtime (touch -r, rsync -t) still
    # changes ctime, so the cache cannot vouch for it.
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["shards"] if data.get("version") == 1 and isinstance(data.get("shards"), dict) else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # absent, unreadable or from another version: verify again


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What `verify_shards` checked. `urls`/`counts` are what the loader needs (`study.data.make_loader(urls,
    ..., expected_counts=report.counts)`)."""

    shard_dir: Path
    dataset: str
    urls: list[str]
    counts: dict[str, int]  # url -> samples, from the manifest
    images: int
    bytes: int
    hashed: int  # shards whose sha256 was computed by this call
    cached: int  # shards unchanged since an earlier call verified their sha256 (stat only)
    unhashed: int  # shards checked for size + headers only (full=False, or beyond HASH_BUDGET)

    def summary(self) -> str:
        return (
            f"{self.shard_dir}: {len(self.urls)} shards, {self.images} images, {self.bytes / 1e6:.1f} MB match "
            f"manifest.json (sha256 checked now: {self.hashed}, unchanged since verified: {self.cached}, "
            f"size + headers only: {self.unhashed})"
        )


def verify_shards(
    shard_dir: str | os.PathLike, *, full: bool | None = None, hash_budget: int = HASH_BUDGET
) -> VerifyReport:
    """Check every shard of a finished directory against its manifest.json before training on it.

    Per shard: it exists, its size is the manifest's `bytes`, its member headers are intact (checksums) and
    number 2 x `count` (a .jpg and a .json per sample), and its sha256 is the manifest's. Hashing reads every
    byte, so it is cached in `verified.json` next to the manifest, keyed by name, size, mtime_ns and ctime_ns:
    a later call only stats unchanged files. `full=None` hashes not-yet-verified shards up to `hash_budget`
    bytes per call (the rest get the size + header checks and are hashed by later calls); `full=True` hashes
    every shard, cache or not; `full=False` never hashes. Raises `ShardIntegrityError` listing every bad shard
    (expected vs found) and the rebuild command; FileNotFoundError without a manifest.
    """
    meta, tars = load_manifest(shard_dir, check_files=False)
    root = _shard_dir(shard_dir)
    cache_path = root / VERIFIED
    cache = _read_cache(cache_path) if full is not True else {}
    new_cache: dict[str, dict] = {}
    problems: list[str] = []
    hashed = cached = unhashed = 0
    budget = hash_budget
    for entry, tar in zip(meta["shards"], tars, strict=True):
        name, want_bytes, count, sha = entry["name"], entry["bytes"], entry["count"], entry["sha256"]
        try:
            st = tar.stat()
        except FileNotFoundError:
            problems.append(f"{name}: missing (manifest: {count} samples, {want_bytes} bytes)")
            continue
        key = {**_stat_key(st), "sha256": sha}
        if cache.get(name) == key and st.st_size == want_bytes:
            new_cache[name] = key
            cached += 1
            continue
        if st.st_size != want_bytes:
            what = "truncated" if st.st_size < want_bytes else "longer than written"
            problems.append(f"{name}: {st.st_size} bytes, manifest says {want_bytes} ({what})")
            continue
        members, problem = walk_members(tar)
        if problem is None and members != 2 * count:
            problem = f"{members} tar members, manifest says {count} samples = {2 * count} members"
        if problem is not None:
            problems.append(f"{name}: {problem}")
            continue
        if full is False or (full is None and st.st_size > budget):
            unhashed += 1
            continue
        budget -= st.st_size
        hashed += 1
        got = _file_sha256(tar)
        if got != sha:
            problems.append(f"{name}: sha256 {got}, manifest says {sha} (contents changed)")
            continue
        new_cache[name] = key
    if new_cache != cache:  # also when some shards failed: the good ones need not be hashed again
        try:
            atomic_write_text(cache_path, json.dumps({"version": 1, "shards": new_cache}, indent=1) + "\n")
        except OSError as err:  # a read-only shard directory: verification still holds, it is just not cached
            log.info("%s: cannot cache verification (%s)", cache_path, err)
    if problems:
        head = f"{len(problems)} of {len(tars)} shards in {root} do not match its manifest.json"
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise ShardIntegrityError(f"{head}: {shown}. Rebuild them: {rebuild_command(root, meta)}")
    if unhashed and full is None:
        log.warning(
            "%s: sha256 of %d shard(s) not checked yet (over the %.0f GB hash budget of one call); they passed the "
            "size and header checks. Hash all once (cached): python -m data_prep.shards verify %s --full",
            *(root, unhashed, hash_budget / 1e9, _display(root)),
        )
    counts = {str(t): int(e["count"]) for e, t in zip(meta["shards"], tars, strict=True)}
    size = sum(int(e["bytes"]) for e in meta["shards"])
    dataset = str(meta.get("dataset", ""))
    return VerifyReport(
        root, dataset, list(counts), counts, sum(counts.values()), size, hashed, cached, unhashed
    )


def _shard_dir(shards: str | os.PathLike) -> Path:
    path = Path(shards)
    return path.parent if path.name == "manifest.json" else path


def manifest_counts(shards: str | os.PathLike) -> dict[str, int]:
    """Samples per shard from the manifest, keyed by the shard paths `load_manifest` returns (the loader's
    URLs): `study.data.make_loader(..., expected_counts=manifest_counts(shard_dir))`."""
    meta, tars = load_manifest(shards)
    return {str(t): int(e["count"]) for e, t in zip(meta["shards"], tars, strict=True)}


def _verify_main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.shards verify",
        description="Check shards against their manifest.json (size, tar headers, member count, sha256; cached)",
    )
    p.add_argument("shard_dir", nargs="+", help="shard directories (or their manifest.json)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="hash every shard, ignoring the cache")
    mode.add_argument("--quick", action="store_true", help="size and header checks only, no sha256")
    p.add_argument("--log", default=None)
    a = p.parse_args(argv)
    configure_logging(a.log)
    failed = 0
    for d in a.shard_dir:
        try:
            log.info("%s", verify_shards(d, full=True if a.full else False if a.quick else None).summary())
        except (ShardError, FileNotFoundError) as err:
            log.error("%s", err)
            failed += 1
    if failed:
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m data_prep.shards --subset ... --out ... --name ...` writes shards (rule `shards`);
    `python -m data_prep.shards verify DIR [--full | --quick]` checks them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["verify"]:
        _verify_main(argv[1:])
        return
    p = argparse.ArgumentParser(
        description="Write webdataset shards for a subset.csv (check them with: python -m data_prep.shards verify DIR)"
    )
    p.add_argument("--subset", required=True)
    p.add_argument("--out", required=True, help="output directory for <name>-%%06d.tar and manifest.json")
    p.add_argument("--name", required=True)
    p.add_argument("--max-per-shard", type=int, default=10000)
    p.add_argument("--min-shards", type=int, default=1, help="set >= loader workers x nodes")
    p.add_argument("--max-side", type=int, default=None, help="downscale (and re-encode) larger images")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    p.add_argument("--full-decode", action="store_true", help="decode every image, not only suspicious ones")
    p.add_argument("--workers", type=int, default=1)
    order = p.add_mutually_exclusive_group()
    order.add_argument(
        "--shuffle-seed",
        type=int,
        default=0,
        help="seed of the record order (mixes classes within shards; recorded in the manifest)",
    )
    order.add_argument(
        "--no-shuffle",
        action="store_true",
        help="keep subset.csv order (class-sorted for ImageNet; only to reproduce old shards)",
    )
    p.add_argument("--log", default=None)
    a = p.parse_args(argv)
    configure_logging(a.log)
    write_shards(
        read_subset_csv(a.subset),
        a.out,
        a.name,
        max_per_shard=a.max_per_shard,
        min_shards=a.min_shards,
        max_side=a.max_side,
        workers=a.workers,
        quality=a.quality,
        full_decode=a.full_decode,
        shuffle_seed=None if a.no_shuffle else a.shuffle_seed,
    )


if __name__ == "__main__":
    main()
