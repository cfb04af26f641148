"""Shard integrity (issue 10): shards are checked against manifest.json before training (verify_shards) and
while reading (the loader counts samples per shard), and a full disk leaves no partial file behind.

Why: a corrupt member header ends a tar *silently* for tarfile/webdataset (a reviewer lost 29 % of a subset
with exit 0), a truncated shard failed deep inside a loader worker without naming the file, and ENOSPC while
writing became EBADF and left the .tmp.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shlex
import shutil
import tarfile
import time
from pathlib import Path

import pytest
from format_fixtures import make_imagenet
from test_data import CROP
from test_shards import _read_wds

from data_prep import shards
from data_prep.readers import read_records
from data_prep.records import read_subset_csv, write_subset_csv
from data_prep.shards import ShardIntegrityError, load_manifest, manifest_counts, verify_shards, write_shards
from study.data import make_loader

PER_SHARD, N_SHARDS = 4, 3


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """results/data/t/{subset.csv, shards/} as the data stage lays them out, written by the real writer."""
    root = tmp_path_factory.mktemp("integrity")
    recs = read_records("imagenet", make_imagenet(root / "in", {"n001": 6, "n002": 6})).records
    data = root / "results" / "data" / "t"
    data.mkdir(parents=True)
    write_subset_csv(recs, data / "subset.csv")
    write_shards(recs, data / "shards", "t", max_per_shard=PER_SHARD, progress=False)
    return data


@pytest.fixture
def shard_dir(pristine, tmp_path) -> Path:
    """A private copy of the shard set, free to damage."""
    data = tmp_path / "results" / "data" / "t"
    shutil.copytree(pristine, data)
    return data / "shards"


def _member_offsets(tar: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar.read_bytes())) as tf:
        return tf.getmembers()


def _read_all(shard_dir: Path, num_workers: int = 0, counts: bool = True) -> int:
    """Samples the loader gives over a few passes (bounded, so a silent loss cannot loop forever)."""
    urls = [str(p) for p in load_manifest(shard_dir)[1]]
    expected = manifest_counts(shard_dir) if counts else None
    steps = 3 * PER_SHARD * N_SHARDS // 2  # three passes
    loader = make_loader(urls, CROP, {}, 2, num_workers, 0, steps, expected_counts=expected)
    return sum(len(b["key"]) for b in loader)


def _fix_in(msg: str, shard_dir: Path) -> None:
    assert f"rm -r {shard_dir} && snakemake --cores 1 {shard_dir}" in msg


def test_good_shards_pass_and_counts_match_manifest(shard_dir):
    report = verify_shards(shard_dir)
    assert (report.hashed, report.cached, report.unhashed) == (N_SHARDS, 0, 0)
    assert report.images == PER_SHARD * N_SHARDS and report.counts == manifest_counts(shard_dir)
    assert report.urls == [str(p) for p in load_manifest(shard_dir)[1]]
    assert _read_all(shard_dir) == 3 * PER_SHARD * N_SHARDS
    assert shards.walk_members(shard_dir / "t-000000.tar") == (2 * PER_SHARD, None)


def test_corrupt_member_header_is_caught(shard_dir):
    tar = shard_dir / "t-000001.tar"
    off = _member_offsets(tar)[4].offset  # the header of the 3rd sample's .jpg
    data = bytearray(tar.read_bytes())
    data[off + 20 : off + 50] = b"X" * 30  # 30 bytes of one member header, as the reviewer did
    tar.write_bytes(data)
    # the fault: tar readers stop at the bad header without an error
    assert len(_read_wds(shard_dir)) == PER_SHARD * N_SHARDS - 2
    with pytest.raises(ShardIntegrityError) as exc:
        verify_shards(shard_dir)
    msg = str(exc.value)
    assert (
        "t-000001.tar" in msg and "member header 5" in msg and "corrupt" in msg and "after 2 samples" in msg
    )
    assert "t-000000.tar" not in msg and "t-000002.tar" not in msg
    _fix_in(msg, shard_dir)
    with pytest.raises(ShardIntegrityError, match=r"t-000001\.tar gave 2 samples, its manifest.json says 4"):
        _read_all(shard_dir)


def test_truncated_shard_names_the_file_and_the_fix(shard_dir, capsys):
    tar = shard_dir / "t-000002.tar"
    m = _member_offsets(tar)[4]
    with open(tar, "r+b") as f:
        f.truncate(m.offset_data + m.size // 2)  # mid-file: inside a JPEG
    with pytest.raises(
        ShardIntegrityError, match=r"t-000002\.tar: \d+ bytes, manifest says \d+ \(truncated\)"
    ):
        verify_shards(shard_dir)
    assert shards.walk_members(tar)[1].endswith("(truncated)")
    # the loader, in a DataLoader worker: one message naming the shard and the fix, not a worker traceback
    with pytest.raises(ShardIntegrityError) as exc:
        _read_all(shard_dir, num_workers=2, counts=False)
    msg = str(exc.value)
    assert re.search(
        r"t-000002\.tar is unreadable after \d samples \(ReadError: unexpected end of data\)", msg
    )
    assert "raised in DataLoader worker process" in msg and "Traceback" not in msg and "\n" not in msg
    _fix_in(msg, shard_dir)
    # the CLI: exit 1, one error line
    with pytest.raises(SystemExit) as ex:
        shards.main(["verify", str(shard_dir)])
    assert ex.value.code == 1
    err = capsys.readouterr().err
    assert "t-000002.tar" in err and "Traceback" not in err


def test_missing_shard_and_the_rebuild_command_works(shard_dir):
    before = load_manifest(shard_dir)[0]
    (shard_dir / "t-000000.tar").unlink()
    with pytest.raises(ShardIntegrityError, match=r"t-000000\.tar: missing") as exc:
        verify_shards(shard_dir)
    # the direct rebuild in the message reproduces the shards exactly
    cli = str(exc.value).split("(without Snakemake: python -m data_prep.shards ", 1)[1].rstrip(")")
    shards.main(shlex.split(cli))
    assert load_manifest(shard_dir)[0]["shards"] == before["shards"]
    assert verify_shards(shard_dir).hashed == N_SHARDS


def test_sha256_is_cached_and_changes_are_rehashed(shard_dir, monkeypatch):
    hashed, walked = [], []
    real_hash, real_walk = shards._file_sha256, shards.walk_members
    monkeypatch.setattr(shards, "_file_sha256", lambda p: hashed.append(p.name) or real_hash(p))
    monkeypatch.setattr(shards, "walk_members", lambda p: walked.append(p.name) or real_walk(p))
    verify_shards(shard_dir)
    assert len(hashed) == len(walked) == N_SHARDS and (shard_dir / shards.VERIFIED).is_file()
    hashed.clear()
    walked.clear()
    report = verify_shards(shard_dir)
    assert (report.cached, report.hashed) == (N_SHARDS, 0) and hashed == walked == []  # stat only

    tar = shard_dir / "t-000001.tar"
    st = tar.stat()
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: hashed again, passes
    assert verify_shards(shard_dir).hashed == 1 and hashed == ["t-000001.tar"]
    hashed.clear()
    m = _member_offsets(tar)[0]
    data = bytearray(tar.read_bytes())
    data[m.offset_data + 100] ^= 0xFF  # one byte inside a JPEG: same size, headers intact
    tar.write_bytes(data)
    with pytest.raises(ShardIntegrityError, match=r"t-000001\.tar: sha256 [0-9a-f]{64}, manifest says"):
        verify_shards(shard_dir)
    assert hashed == ["t-000001.tar"]
    hashed.clear()
    with pytest.raises(ShardIntegrityError):
        verify_shards(shard_dir)  # a failed shard is never cached
    assert hashed == ["t-000001.tar"]
    hashed.clear()
    assert verify_shards(shard_dir, full=False).unhashed == 1 and hashed == []  # headers only: passes
    with pytest.raises(ShardIntegrityError):
        verify_shards(shard_dir, full=True)
    assert len(hashed) == N_SHARDS  # full ignores the cache


def test_hash_budget_spreads_hashing_over_calls(shard_dir):
    size = (shard_dir / "t-000000.tar").stat().st_size
    first = verify_shards(shard_dir, hash_budget=size)
    assert (first.hashed, first.unhashed) == (1, N_SHARDS - 1)
    second = verify_shards(shard_dir, hash_budget=size)
    assert (second.cached, second.hashed, second.unhashed) == (1, 1, 1)


def test_loader_counts_when_readers_share_shards(shard_dir):
    """Fewer shards than readers: each reader reads the whole shard and keeps every n-th sample, so the
    count still applies."""
    url = str(shard_dir / "t-000000.tar")
    kw = {"batch_size": 2, "num_workers": 2, "seed": 0, "epoch_len": 4}  # two passes of 1 batch per worker
    with pytest.warns(UserWarning, match="shards <"):
        assert sum(len(b["key"]) for b in make_loader([url], CROP, {}, expected_counts={url: 4}, **kw)) == 8
    with pytest.warns(UserWarning, match="shards <"):
        loader = make_loader([url], CROP, {}, expected_counts={"t-000000.tar": 3}, **kw)  # by file name
    with pytest.raises(
        ShardIntegrityError, match=r"gave 4 samples, its manifest.json says 3: it is not the shard"
    ):
        list(loader)
    with pytest.raises(ValueError, match="no entry for shard"):
        make_loader([url], CROP, {}, 2, 0, 0, 1, expected_counts={"other.tar": 4})


def test_tarstream_closes_its_file_once_after_a_failed_close(tmp_path, monkeypatch):
    tar = shards.TarStream(tmp_path / "x.tar.tmp")
    fd, closes = tar.fd, []
    real_close = os.close

    def full(*_):
        time.sleep(0.05)  # still running when close() queues the end blocks: the error comes from its drain
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards.os, "writev", full)
    monkeypatch.setattr(shards.os, "close", lambda f: closes.append(f) or real_close(f))
    tar.add("a.json", b"{}")
    with pytest.raises(OSError) as exc:
        tar.close()
    tar.abort()  # what write_shards does next: used to close the fd again (EBADF, or someone else's file)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(tmp_path / "x.tar.tmp")
    assert closes.count(fd) == 1


@pytest.mark.parametrize("fail_at,flush", [(1, None), (3, None), (5, 1)])
def test_disk_full_leaves_no_tmp_and_says_so(pristine, tmp_path, monkeypatch, fail_at, flush):
    """ENOSPC at the n-th low-level write: in a shard's close (small shards) or mid-shard (flush=1 flushes
    every sample)."""
    recs = read_subset_csv(pristine / "subset.csv")
    if flush:
        monkeypatch.setattr(shards.TarStream, "FLUSH", flush)
    calls = {"n": 0}
    real = os.writev

    def writev(fd, bufs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, bufs)

    monkeypatch.setattr(shards.os, "writev", writev)
    out = tmp_path / "s"
    with pytest.raises(OSError) as exc:
        write_shards(recs, out, "t", max_per_shard=PER_SHARD, progress=False)
    msg = str(exc.value)
    assert exc.value.errno == errno.ENOSPC and "No space left on device while writing shard" in msg
    assert str(out / "t-00000") in msg and "Bad file descriptor" not in msg
    left = sorted(p.name for p in out.iterdir())
    assert not [n for n in left if n.endswith(".tmp")] and "manifest.json" not in left
