"""Loader throughput: our shard loader vs an ImageFolder + torchvision two-crop reference, same run.

Writes ``--n`` synthetic JPEGs (``--image-size`` square) both as an ImageFolder tree and as webdataset shards
(``webdataset.TarWriter``), then times, with the same batch size and workers:

* ours: ``study.data.make_loader`` with the MoCo-v2 two-view setting (``crop.size = --crop``);
* ref:  ``torchvision.datasets.ImageFolder`` (PIL loader) with MoCo's TwoCropsTransform of
  RandomResizedCrop(--crop, scale 0.2-1) -> ColorJitter(0.4,0.4,0.4,0.1) p=0.8 -> RandomGrayscale(0.2) ->
  GaussianBlur(sigma 0.1-2, p=0.5) -> flip -> ToTensor -> Normalize (torchvision.transforms, as in MoCo's
  main_moco.py with torchvision's blur).

Prints JSON {bench: "loader_vs_imagefolder", ours_img_s, ref_img_s, speedup, target, pass, ...}; images/s
counts source images (2 views each).

Then, at paper-like sizes (``--paper-n`` JPEGs of 500 x 375; views 2 x 224, and the 2 x 160 + 4 x 96
multi-crop), one JSON line each {bench: "render", speedup, colour_ms_per_img, ...}: ``speedup`` is the CPU time
per image of the worker stage with ``data.render: pil`` (decode, crop, resize, flip, PIL colour ops, collate +
normalise) over ``data.render: batched`` (decode, crop, resize, flip, collate to uint8), same run, both
single-threaded in this process like a loader worker; ``colour_ms_per_img`` is the time per image of
``study.colour.BatchColour`` on the batched batches on ``--device`` (the part that moved to the training
device). ``--skip-ref`` / ``--skip-paper`` run one half only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.augment import blur_kernel_size  # noqa: E402
from study.colour import BatchColour, colour_generator  # noqa: E402
from study.data import ShardStream, make_loader  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def synthetic_jpeg(rng: np.random.Generator, size: int, quality: int = 90, height: int | None = None) -> bytes:
    """Smooth colour field plus sensor-like noise: compresses and decodes like a photo, unlike pure noise.
    ``size`` wide, ``height`` (default ``size``) high."""
    low = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    hh = size if height is None else height
    arr = np.asarray(Image.fromarray(low).resize((size, hh), Image.Resampling.BICUBIC), dtype=np.float32)
    arr = arr + rng.normal(0.0, 12.0, arr.shape)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_data(root: Path, n: int, size: int, n_classes: int, n_shards: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    shard_dir = root / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    writers = [wds.TarWriter(str(shard_dir / f"bench-{s:06d}.tar")) for s in range(n_shards)]
    for i in range(n):
        cls = i % n_classes
        data = synthetic_jpeg(rng, size)
        folder = root / "imagefolder" / f"class{cls:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:06d}.jpg").write_bytes(data)
        meta = {"class_index": cls, "width": size, "height": size}
        writers[i % n_shards].write({"__key__": f"img{i:06d}", "jpg": data, "json": json.dumps(meta).encode()})
    for w in writers:
        w.close()
    return [str(shard_dir / f"bench-{s:06d}.tar") for s in range(n_shards)]


class TwoCrops:
    def __init__(self, t):
        self.t = t

    def __call__(self, x):
        return [self.t(x), self.t(x)]


def reference_transform(crop: int) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(crop, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(blur_kernel_size(crop), sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def endless(loader):
    while True:
        yield from loader


def cpu_seconds() -> float:
    """CPU time of this process plus its live children (the loader workers): robust to a busy machine."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def time_batches(it, n_batches: int, warmup: int, batch_size: int) -> tuple[float, float]:
    """(images/s of wall time, CPU ms per image) over ``n_batches`` after ``warmup`` batches."""
    for _ in range(warmup):
        next(it)
    c0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(n_batches):
        batch = next(it)
    dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
    views = batch["views"] if isinstance(batch, dict) else batch[0]
    assert views[0].shape[0] == batch_size
    n = n_batches * batch_size
    return n / dt, 1e3 * dc / n


PAPER_SETTINGS = {  # name -> crop node: MoCo-v2 two views, and the paper's multi-crop
    "2x224": {"size": 224, "scale": [0.2, 1.0], "max_iou": 1.0, "n_small": 0, "flip": "after"},
    "2x160+4x96": {"size": 160, "scale": [0.14, 1.0], "max_iou": 1.0, "n_small": 4, "small_size": 96,
                   "small_scale": [0.05, 0.14], "flip": "after"},
}


def write_shards(root: Path, n: int, width: int, height: int, n_shards: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    urls = [str(root / f"paper-{s:06d}.tar") for s in range(n_shards)]
    writers = [wds.TarWriter(u) for u in urls]
    for i in range(n):
        meta = {"class_index": i % 10, "width": width, "height": height}
        data = synthetic_jpeg(rng, width, height=height)
        writers[i % n_shards].write({"__key__": f"img{i:06d}", "jpg": data, "json": json.dumps(meta).encode()})
    for w in writers:
        w.close()
    return urls


def worker_pass(ds: ShardStream, n_batches: int) -> tuple[float, list[dict]]:
    """CPU ms per image of a loader worker's whole job for ``n_batches`` batches (read, decode, crop, ...,
    collate), run in this process with one torch thread as a worker has; returns the batches too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        it = iter(ds)
        next(it)  # warm-up: opens the shards, fills the shuffle buffer's initial part
        c0 = time.process_time()
        batches = [next(it) for _ in range(n_batches)]
        dc = time.process_time() - c0
    finally:
        torch.set_num_threads(threads)
    return 1e3 * dc / (n_batches * ds.batch_size), batches


def colour_pass(stage: BatchColour, batches: list[dict], device: torch.device) -> float:
    """Wall ms per image of the batched colour stage on ``device`` (views already there, as in the trainer)."""
    views = [[v.to(device) for v in b["views"]] for b in batches]
    flags = [[a.to(device) for a in b["autoaug"]] for b in batches]

    def run(step: int) -> None:
        stage(views[step % len(views)], colour_generator(0, step, 0, device), flags[step % len(views)])

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run(0)
    sync()
    t0 = time.perf_counter()
    for step in range(len(views)):
        run(step)
    sync()
    return 1e3 * (time.perf_counter() - t0) / sum(len(b["key"]) for b in batches)


def paper_render(root: Path, args: argparse.Namespace) -> None:
    """The render comparison at paper-like sizes (module docstring); one JSON line per setting."""
    urls = write_shards(root / "paper", args.paper_n, 500, 375, 4, args.seed)
    aug_cfg = {"pipeline": "v2", "aplus": False, "blur": True}
    device = torch.device(args.device)
    n_batches = max(1, args.paper_n // args.paper_batch - 1)
    for name, crop in PAPER_SETTINGS.items():
        pil, bat, col = [], [], []
        sizes: list[int] = []
        for r in range(args.paper_rounds):
            streams = {render: ShardStream(urls, crop, aug_cfg, args.paper_batch, args.seed + r, shuffle_buffer=64,
                                           interleave=4, render=render) for render in ("pil", "batched")}
            sizes = list(streams["batched"].sizes)
            pil.append(worker_pass(streams["pil"], n_batches)[0])
            ms, batches = worker_pass(streams["batched"], n_batches)
            bat.append(ms)
            threads = torch.get_num_threads()
            torch.set_num_threads(args.colour_threads if device.type == "cpu" else threads)
            try:
                col.append(colour_pass(BatchColour(aug_cfg, sizes), batches, device))
            finally:
                torch.set_num_threads(threads)
        p, b, c = min(pil), min(bat), min(col)
        print(json.dumps({
            "bench": "render", "setting": name, "views": sizes,
            "source": "500x375 JPEG", "speedup": round(p / b, 3), "target": 2.0, "pass": bool(p / b >= 2.0),
            "pil_worker_cpu_ms_per_img": round(p, 3), "batched_worker_cpu_ms_per_img": round(b, 3),
            "colour_ms_per_img": round(c, 3), "colour_device": str(device),
            "colour_torch_threads": args.colour_threads if device.type == "cpu" else None,
            # all of it on CPU (the demo): worker + colour stage vs the all-PIL worker
            "speedup_cpu_incl_colour": round(p / (b + c), 3) if device.type == "cpu" else None,
            "rounds_pil_ms": [round(x, 2) for x in pil], "rounds_batched_ms": [round(x, 2) for x in bat],
            "n_images": args.paper_n, "batch_size": args.paper_batch, "timed_batches": n_batches,
            "load_avg_1min": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(),
        }), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="number of images")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--crop", type=int, default=64, help="output view size")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--batches", type=int, default=40, help="timed batches per run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the data (default: a tempdir)")
    ap.add_argument("--paper-n", type=int, default=96, help="500x375 JPEGs for the render comparison")
    ap.add_argument("--paper-batch", type=int, default=16)
    ap.add_argument("--paper-rounds", type=int, default=2, help="alternating pil/batched rounds; best reported")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the batched colour stage runs")
    ap.add_argument("--colour-threads", type=int, default=1,
                    help="torch threads for the colour stage on CPU (1: cost per core, robust on a shared box)")
    ap.add_argument("--skip-ref", action="store_true", help="only the render comparison")
    ap.add_argument("--skip-paper", action="store_true", help="only the ImageFolder comparison")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        if not args.skip_ref:
            imagefolder_comparison(root, args)
        if not args.skip_paper:
            paper_render(root, args)


def imagefolder_comparison(root: Path, args: argparse.Namespace) -> None:
    """Our shard loader vs ImageFolder + torchvision, end to end with DataLoader workers (module docstring)."""
    urls = write_data(root, args.n, args.image_size, 10, args.shards, args.seed)
    crop_cfg = {"size": args.crop, "scale": [0.2, 1.0], "max_iou": 1.0, "n_small": 0, "flip": "after"}
    aug_cfg = {"pipeline": "v2", "aplus": False, "blur": True}
    warmup = 3
    ours, ref = [], []
    for r in range(args.rounds):
        loader = make_loader(urls, crop_cfg, aug_cfg, args.batch_size, args.workers, args.seed + r, None)
        ours.append(time_batches(iter(loader), args.batches, warmup, args.batch_size))
        torch.manual_seed(args.seed + r)
        ds = ImageFolder(str(root / "imagefolder"), transform=TwoCrops(reference_transform(args.crop)))
        dl = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=True, persistent_workers=args.workers > 0)
        ref.append(time_batches(endless(dl), args.batches, warmup, args.batch_size))
        del dl
    ours_s, ref_s = max(x[0] for x in ours), max(x[0] for x in ref)
    ours_c, ref_c = min(x[1] for x in ours), min(x[1] for x in ref)
    speedup = ours_s / ref_s
    print(json.dumps({
        "bench": "loader_vs_imagefolder",
        "ours_img_s": round(ours_s, 1),
        "ref_img_s": round(ref_s, 1),
        "speedup": round(speedup, 3),
        "target": 1.5,
        "pass": bool(speedup >= 1.5),
        # CPU cost per image (main + workers): the fair comparison when other jobs share the cores
        "ours_cpu_ms_per_img": round(ours_c, 3),
        "ref_cpu_ms_per_img": round(ref_c, 3),
        "speedup_cpu": round(ref_c / ours_c, 3),
        "rounds_ours_img_s": [round(x[0], 1) for x in ours],
        "rounds_ref_img_s": [round(x[0], 1) for x in ref],
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "n_images": args.n, "image_size": args.image_size, "crop": args.crop,
        "batch_size": args.batch_size, "workers": args.workers, "timed_batches": args.batches,
        "cpu_count": os.cpu_count(), "torch_threads_main": torch.get_num_threads(),
    }), flush=True)


if __name__ == "__main__":
    main()
