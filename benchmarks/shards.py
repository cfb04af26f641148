"""Shard-writer throughput: `data_prep.shards.write_shards` vs `tar -cf` over the same files, same run.

Writes ``--n`` small noise JPEGs to a temp dir, then runs, back to back in each of ``--repeats`` rounds:
* ours: `write_shards` (read + header check of every JPEG, `{key}.jpg` + `{key}.json` members, sha256,
  temp name + rename, manifest), in-process, progress bar off, ``--workers`` as given;
* tar:  ``tar -cf out.tar -C <dir> <files...>`` as a subprocess (jpg members only, no checks);
* for reference (why the writer does not use them): the same jpg + json members (pre-built json, no checks)
  through `tarfile` and through `webdataset.TarWriter`.
Every round reads warm page cache (one untimed warm-up each). The machine may be shared, so the ratio is the
median over rounds of tar_s / ours_s taken back to back, which cancels most of the load drift.

Prints JSON {ours_s, tar_s, ratio, target, pass, ...}; ratio = ours throughput / tar throughput (wall clock);
cpu_ratio = tar CPU seconds / ours CPU seconds (all threads and worker processes), which is what the ratio
tends to on an idle machine with as many cores as we use threads.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.records import Record  # noqa: E402
from data_prep.shards import write_shards  # noqa: E402


def make_images(directory: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        arr = np.roll(base, i % size, axis=1)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=85)
        p = directory / f"img_{i:06d}.jpg"
        p.write_bytes(buf.getvalue())
        paths.append(p)
    return paths


def _reference_writers(tmp: Path, paths: list[Path], records: list[Record]) -> dict[str, float]:
    """Time tarfile and webdataset.TarWriter writing the same two members per image (bytes read in the loop)."""
    import tarfile

    import webdataset as wds

    metas = [json.dumps({"path": r.path, "class": r.cls}).encode() for r in records]
    out: dict[str, float] = {}
    t = time.perf_counter()
    with tarfile.open(tmp / "ref_tarfile.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for r, p, m in zip(records, paths, metas, strict=True):
            data = p.read_bytes()
            for ext, blob in (("jpg", data), ("json", m)):
                ti = tarfile.TarInfo(f"{r.key}.{ext}")
                ti.size, ti.mtime, ti.mode = len(blob), 0, 0o444
                tf.addfile(ti, io.BytesIO(blob))
    out["tarfile_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with wds.TarWriter(str(tmp / "ref_wds.tar"), mtime=0, encoder=False) as tw:
        for r, p, m in zip(records, paths, metas, strict=True):
            tw.write({"__key__": r.key, "jpg": p.read_bytes(), "json": m})
    out["wds_tarwriter_s"] = time.perf_counter() - t
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64, help="side of the square test JPEGs")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--max-per-shard", type=int, default=1000)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--workers", type=int, default=1, help="write_shards workers (1 = prefetch thread)")
    ap.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the tarfile / webdataset.TarWriter reference timings",
    )
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        paths = make_images(src, a.n, a.size)
        records = [Record(p.stem, str(p), f"c{i % 10}", [], "train") for i, p in enumerate(paths)]
        names = [p.name for p in paths]
        total_bytes = sum(p.stat().st_size for p in paths)

        def cpu() -> float:
            kids = resource.getrusage(resource.RUSAGE_CHILDREN)
            return time.process_time() + kids.ru_utime + kids.ru_stime

        def ours() -> tuple[float, float]:
            out = tmp / "ours"
            shutil.rmtree(out, ignore_errors=True)
            c, t = cpu(), time.perf_counter()
            write_shards(
                records, out, "bench", max_per_shard=a.max_per_shard, workers=a.workers, progress=False
            )
            return time.perf_counter() - t, cpu() - c

        def tar() -> tuple[float, float]:
            out = tmp / "tar.tar"
            out.unlink(missing_ok=True)
            c, t = cpu(), time.perf_counter()
            subprocess.run(["tar", "-cf", str(out), "-C", str(src), *names], check=True)
            return time.perf_counter() - t, cpu() - c

        ours(), tar()  # warm-up: page cache, imports
        runs = [(ours(), tar()) for _ in range(a.repeats)]
        refs = _reference_writers(tmp, paths, records) if a.reference else {}
    ours_t = [o[0] for o, _ in runs]
    tar_t = [t[0] for _, t in runs]
    ratio = statistics.median(t[0] / o[0] for o, t in runs)
    cpu_ratio = statistics.median(t[1] for _, t in runs) / statistics.median(o[1] for o, _ in runs)
    ours_s, tar_s = statistics.median(ours_t), statistics.median(tar_t)
    result = {
        "n_images": a.n,
        "image_bytes_total": total_bytes,
        "repeats": a.repeats,
        "workers": a.workers,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
        "ours_s": round(ours_s, 4),
        "tar_s": round(tar_s, 4),
        "ours_min_s": round(min(ours_t), 4),
        "tar_min_s": round(min(tar_t), 4),
        "ours_img_s": round(a.n / ours_s, 1),
        "tar_img_s": round(a.n / tar_s, 1),
        **{k: round(v, 4) for k, v in refs.items()},
        "cpu_ratio": round(cpu_ratio, 3),
        "ratio": round(ratio, 3),
        "target": a.target,
        "pass": ratio >= a.target,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
