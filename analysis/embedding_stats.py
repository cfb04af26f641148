"""Embedding statistics of a checkpoint (the MoCHi analysis): alignment, uniformity, share of false negatives.

    python -m analysis.embedding_stats --checkpoint results/pretrain/D/V/checkpoint.pt \
        (--subset results/data/D/subset.csv | --image-folder ROOT/train) \
        --settings-json '{"max_images": 1000, "image_size": 64, "top_k": 1024, "queue_size": 16384}' \
        --out results/analysis/D/V/embedding_stats.json

Definitions (Wang & Isola 2020; MoCHi slides), on L2-normalised features f:
- alignment = E ||f(x) - f(x+)||^alpha over positive pairs (alpha = 2); with labels as the oracle, as in the
  MoCHi slides, positives are all same-class pairs ("average distance between representations of the same
  class"). Lower = tighter classes.
- uniformity = log E exp(-t ||f(x) - f(y)||^2) over all distinct pairs (t = 2). Lower = more uniform.
- false-negative share = for each query, the share of same-class items among its top-k most similar
  negatives in a queue of other items (labels as the oracle); ``fn_share_chance`` is the same share under a
  random ranking, so a model that groups classes scores above chance.

The statistics are pure functions of (features, labels) arrays; the CLI only extracts backbone features (the
checkpoint holds the backbone, not the projection head, so these are pooled backbone features) of a labelled
image set and writes one JSON per checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("analysis.embedding_stats")

DEFAULTS: dict[str, Any] = {
    "max_images": 1000, "image_size": 224, "resize_ratio": 1.14, "top_k": 1024, "queue_size": 16384,
    "alpha": 2.0, "t": 2.0, "batch_size": 64, "seed": 0,
    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
}  # fmt: skip
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class EmbeddingInputError(ValueError):
    """The labelled image set cannot be used (no labels, too few images, unreadable list)."""


# ------------------------------------------------------------------------------------ pure statistics


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def alignment(x: np.ndarray, y: np.ndarray, alpha: float = 2.0, normalize: bool = True) -> float:
    """Wang & Isola's alignment for explicit positive pairs (row i of ``x`` with row i of ``y``)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2 or len(x) == 0:
        raise ValueError(f"alignment needs two (n, d) arrays of the same shape, got {x.shape} and {y.shape}")
    if normalize:
        x, y = l2_normalize(x), l2_normalize(y)
    return float(np.mean(np.linalg.norm(x - y, axis=1) ** alpha))


def class_alignment(feats: np.ndarray, labels: np.ndarray, alpha: float = 2.0, normalize: bool = True) -> float:
    """Alignment with every unordered same-class pair (i < j) as a positive pair, pooled over classes."""
    f = l2_normalize(feats) if normalize else np.asarray(feats, dtype=np.float64)
    labels = np.asarray(labels)
    total, count = 0.0, 0
    for c in np.unique(labels):
        members = f[labels == c]
        if len(members) < 2:
            continue
        iu = np.triu_indices(len(members), k=1)
        d = np.sqrt(_sq_dists(members, members)[iu])
        total += float(np.sum(d**alpha))
        count += len(iu[0])
    if count == 0:
        raise ValueError("class_alignment: no class has two members, so there is no positive pair")
    return total / count


def uniformity(feats: np.ndarray, t: float = 2.0, normalize: bool = True, chunk: int = 2048) -> float:
    """log of the mean Gaussian potential exp(-t ||f_i - f_j||^2) over pairs i < j (streamed log-sum-exp)."""
    f = l2_normalize(feats) if normalize else np.asarray(feats, dtype=np.float64)
    n = len(f)
    if n < 2:
        raise ValueError("uniformity needs at least two embeddings")
    peak, acc, count = -np.inf, 0.0, 0
    for start in range(0, n - 1, chunk):
        rows = f[start : start + chunk]
        d = _sq_dists(rows, f[start:])  # row r of the chunk is item start + r; keep columns j > that item
        mask = np.triu(np.ones(d.shape, dtype=bool), k=1)
        vals = -t * d[mask]
        if vals.size == 0:
            continue
        m = float(vals.max())
        if m > peak:
            acc *= np.exp(peak - m) if np.isfinite(peak) else 0.0
            peak = m
        acc += float(np.exp(vals - peak).sum())
        count += vals.size
    return float(peak + np.log(acc / count))


def false_negative_share(
    feats: np.ndarray,
    labels: np.ndarray,
    top_k: int,
    queue_size: int | None = None,
    seed: int = 0,
    normalize: bool = True,
    chunk: int = 1024,
) -> dict[str, float]:
    """Share of same-class items among each query's ``top_k`` hardest negatives (highest cosine similarity).

    Negatives: a queue of ``queue_size`` items drawn once without replacement (MoCo's queue is shared by the
    batch), or every other item when ``queue_size`` is None / >= n - 1; a query never counts as its own
    negative. Returns ``fn_share`` (mean over queries) and ``fn_share_chance`` (the expected share if the
    negatives were ranked at random: same-class share of the query's negatives).
    """
    f = l2_normalize(feats) if normalize else np.asarray(feats, dtype=np.float64)
    labels = np.asarray(labels)
    n = len(f)
    if len(labels) != n:
        raise ValueError(f"false_negative_share: {n} features but {len(labels)} labels")
    if queue_size is None or queue_size >= n - 1:
        queue = np.arange(n)
    else:
        queue = np.sort(np.random.default_rng(seed).choice(n, size=int(queue_size), replace=False))
    n_neg = len(queue) - 1  # a query that is itself in the queue has one negative fewer
    if not 1 <= top_k <= n_neg:
        raise ValueError(f"false_negative_share: top_k={top_k} must be in [1, {n_neg}] (negatives per query)")
    qf, ql = f[queue], labels[queue]
    shares, chances = np.empty(n), np.empty(n)
    for start in range(0, n, chunk):
        idx = np.arange(start, min(start + chunk, n))
        sims = f[idx] @ qf.T
        self_hit = queue[None, :] == idx[:, None]
        sims[self_hit] = -np.inf
        top = np.argpartition(-sims, top_k - 1, axis=1)[:, :top_k]
        same = ql[top] == labels[idx][:, None]
        shares[idx] = same.mean(1)
        same_all = (ql[None, :] == labels[idx][:, None]) & ~self_hit
        chances[idx] = same_all.sum(1) / (~self_hit).sum(1)
    return {"fn_share": float(shares.mean()), "fn_share_chance": float(chances.mean())}


def embedding_stats(
    feats: np.ndarray, labels: np.ndarray, *, alpha: float = 2.0, t: float = 2.0, top_k: int = 1024,
    queue_size: int | None = 16384, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """All statistics for one checkpoint. ``top_k`` / ``queue_size`` are the paper-scale values: with fewer
    items than ``queue_size`` + 1 the queue becomes every other item and top-k shrinks in proportion, so the
    hardest-negatives fraction (top-1024 of 16384 in the slides' setting) is kept."""
    n = len(feats)
    eff_queue = min(int(queue_size), n - 1) if queue_size else n - 1
    full = eff_queue >= n - 1
    scaled = round(top_k * eff_queue / queue_size) if queue_size else top_k
    eff_k = max(1, min(eff_queue if full else eff_queue - 1, scaled))
    fn = false_negative_share(feats, labels, eff_k, None if full else eff_queue, seed=seed)
    return {
        "alignment": class_alignment(feats, labels, alpha=alpha),
        "uniformity": uniformity(feats, t=t),
        **fn,
        "n_images": int(n),
        "n_classes": int(len(np.unique(labels))),
        "top_k": int(eff_k),
        "queue_size": int(eff_queue),
        "alpha": float(alpha),
        "t": float(t),
    }


# -------------------------------------------------------------------------------------------- inputs


def read_labelled_subset(path: str | Path) -> tuple[list[str], list[str]]:
    """(image paths, class names) of a subset.csv; scene datasets (no image-level class) cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; make it with `snakemake {path}` (rule subset)")
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {"path", "class"} <= set(rows[0]):
        raise EmbeddingInputError(f"{path}: needs columns `path` and `class` (data_prep subset.csv format)")
    items = [(r["path"], r["class"]) for r in rows if r.get("class")]
    if not items:
        raise EmbeddingInputError(
            f"{path}: no row has an image-level class (a scene-centric dataset); the statistics need labels. "
            "Set report.embedding_stats.source to a labelled imagefolder target, or use a class-labelled dataset"
        )
    return [p for p, _ in items], [c for _, c in items]


def read_image_folder(root: str | Path) -> tuple[list[str], list[str]]:
    """(image paths, class names) of ``<root>/<class>/<image>``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected <root>/<class>/<image>)")
    items = [(str(p), c.name) for c in sorted(root.iterdir()) if c.is_dir() for p in sorted(c.iterdir())
             if p.suffix.lower() in IMAGE_EXTENSIONS]  # fmt: skip
    if not items:
        raise EmbeddingInputError(f"{root}: no image found in <class>/ sub-folders")
    return [p for p, _ in items], [c for _, c in items]


def sample_items(paths: list[str], classes: list[str], max_images: int, seed: int) -> tuple[list[str], np.ndarray]:
    """A seeded random subset of at most ``max_images`` items, labels as integer class indices."""
    order = np.arange(len(paths))
    if max_images and len(order) > max_images:
        order = np.sort(np.random.default_rng(seed).choice(len(order), size=max_images, replace=False))
    names = sorted(set(classes))
    index = {c: i for i, c in enumerate(names)}
    return [paths[i] for i in order], np.array([index[classes[i]] for i in order], dtype=np.int64)


def extract_features(
    checkpoint: str | Path, paths: Sequence[str], settings: Mapping[str, Any], device: str | None = None,
    progress: bool = True,
) -> np.ndarray:  # fmt: skip
    """Pooled backbone features (n, D) of the images: Resize(s * ratio) -> CenterCrop(s) -> normalise."""
    import torch
    import torchvision.transforms as TV
    from PIL import Image
    from tqdm import tqdm

    from study.models import load_backbone

    net, _ = load_backbone(checkpoint)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = net.to(dev).eval()
    size = int(settings["image_size"])
    tf = TV.Compose([TV.Resize(int(round(size * float(settings["resize_ratio"])))), TV.CenterCrop(size),
                     TV.ToTensor(), TV.Normalize(settings["mean"], settings["std"])])  # fmt: skip
    out = []
    bs = int(settings["batch_size"])
    with torch.no_grad():
        for start in tqdm(range(0, len(paths), bs), desc="features", disable=not progress, file=sys.stderr):
            batch = []
            for p in paths[start : start + bs]:
                try:
                    with Image.open(p) as im:
                        batch.append(tf(im.convert("RGB")))
                except OSError as exc:
                    raise EmbeddingInputError(f"cannot read image {p}: {exc}") from exc
            out.append(net(torch.stack(batch).to(dev)).float().cpu().numpy())
    return np.concatenate(out)


def run(
    checkpoint: str | Path, settings: Mapping[str, Any], *, subset: str | Path | None = None,
    image_folder: str | Path | None = None, device: str | None = None, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    t0 = time.time()
    s = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    if (subset is None) == (image_folder is None):
        raise EmbeddingInputError("pass exactly one of --subset and --image-folder")
    paths, classes = read_labelled_subset(subset) if subset else read_image_folder(image_folder)
    paths, labels = sample_items(paths, classes, int(s["max_images"]), int(s["seed"]))
    if len(paths) < 3 or len(np.unique(labels)) < 2:
        raise EmbeddingInputError(f"{subset or image_folder}: need >= 3 images of >= 2 classes, got "
                                  f"{len(paths)} images / {len(np.unique(labels))} classes")  # fmt: skip
    feats = extract_features(checkpoint, paths, s, device=device, progress=progress)
    stats = embedding_stats(feats, labels, alpha=float(s["alpha"]), t=float(s["t"]), top_k=int(s["top_k"]),
                            queue_size=int(s["queue_size"]) if s["queue_size"] else None, seed=int(s["seed"]))  # fmt: skip
    return {
        **stats,
        "feature_dim": int(feats.shape[1]),
        "checkpoint": str(checkpoint),
        "source": str(subset or image_folder),
        "settings": {k: s[k] for k in DEFAULTS},
        "seconds": round(time.time() - t0, 3),
    }


def job_settings(config: Mapping, variant: str) -> dict[str, Any]:
    """Settings of one Snakemake job: ``report.embedding_stats`` plus what the variant trained with (its crop
    size when ``image_size`` is null, its normalisation)."""
    from analysis.tables import report_settings, variant_settings

    rs = report_settings(config)["embedding_stats"]
    s = {k: rs[k] for k in DEFAULTS if rs.get(k) is not None}
    vs = variant_settings(config, variant)
    for key, src in (("image_size", "crop.size"), ("mean", "aug.mean"), ("std", "aug.std")):
        if key not in s and vs.get(src) is not None:
            s[key] = vs[src]
    return s


def job_source(config: Mapping, results: str | Path, dataset: str) -> tuple[list[str], str]:
    """(input files, CLI arguments) for the labelled images: the dataset's subset.csv, or the train split of
    the target named by ``report.embedding_stats.source``."""
    import shlex

    from analysis.tables import ReportConfigError, report_settings, subset_path

    source = report_settings(config)["embedding_stats"].get("source") or "subset"
    if source == "subset":
        path = str(subset_path(results, dataset))
        return [path], f"--subset {shlex.quote(path)}"
    target = (config.get("targets") or {}).get(source)
    if not target or target.get("format") != "imagefolder":
        raise ReportConfigError(
            f"config key report.embedding_stats.source: {source!r} is neither 'subset' nor an imagefolder target"
        )
    split = (target.get("splits") or {}).get("train", "train")
    return [], f"--image-folder {shlex.quote(str(Path(target['root']) / split))}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Alignment, uniformity and false-negative share of a checkpoint.")
    ap.add_argument("--checkpoint", required=True, type=Path)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--subset", type=Path, help="a labelled subset.csv (data_prep format)")
    src.add_argument("--image-folder", type=Path, help="<root>/<class>/<image> folder")
    ap.add_argument("--settings-json", default="{}", help=f"overrides of {sorted(DEFAULTS)}")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = json.loads(args.settings_json)
    except json.JSONDecodeError as exc:
        ap.error(f"--settings-json is not valid JSON: {exc}")
    unknown = sorted(set(settings) - set(DEFAULTS) - {"experiment", "source"})
    if unknown:
        log.warning("settings %s are not read by analysis.embedding_stats", unknown)
    try:
        res = run(args.checkpoint, settings, subset=args.subset, image_folder=args.image_folder, device=args.device,
                  progress=not args.no_progress)  # fmt: skip
    except (EmbeddingInputError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(args.out)
    log.info("alignment %.4f uniformity %.4f fn_share %.4f (chance %.4f) -> %s", res["alignment"],
             res["uniformity"], res["fn_share"], res["fn_share_chance"], args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
