"""Dataset statistics: one row of the paper's Table 1, computed from the shards (what the model actually saw).

subset.csv lists what was asked for; the shard step then skips empty or corrupt images, so counting subset.csv
over-reports (e.g. 81 images / 703 objects listed, 79 / 692 trained on). The row is therefore computed from the
shards' per-sample JSON members, and the skips (by reason, with the keys when subset.csv is given) are reported
next to it. Counting subset.csv alone is still possible (`--subset` without `--shards`) and says so in `source`.

Objects per image: every box is one object, including crowd / group-of boxes (COCO iscrowd, OpenImages
IsGroupOf, BDD100K crowd), which stand for several instances; they are counted separately in `crowd_boxes`.
ImageNet images without LOC boxes count as one object (`OBJECT_CONVENTION`, written into stats.json).

Shot thresholds default to ImageNet-LT's (many > 100, medium 20-100, few < 20 images per class) and are
parameters because the embedded synthetic world is far smaller than ImageNet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tarfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_prep.records import (
    Record,
    atomic_write_text,
    crowd_count,
    read_subset_csv,
    record_from_sample,
)

OBJECT_CONVENTION = (
    "one object per box; a crowd / group-of box (COCO iscrowd, OpenImages IsGroupOf, BDD100K crowd) counts as "
    "one object (see crowd_boxes); an image without boxes counts as its n_objects (1 for ImageNet "
    "classification images, 0 for unannotated detection images)"
)
SKIPPED_KEYS_SHOWN = 100  # stats.json lists at most this many skipped keys (the count is always complete)


def gini(values: Sequence[float]) -> float:
    """Gini coefficient of a non-negative distribution (0 = all equal, -> 1 = one holds everything).

    Sorted-rank form: G = 2 * sum_i i * x_(i) / (n * sum x) - (n + 1) / n, with i = 1..n ascending.
    """
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(2 * (ranks * x).sum() / (n * x.sum()) - (n + 1) / n)


def shot_groups(histogram: dict[str, int], many: int = 100, few: int = 20) -> dict[str, int]:
    """Number of classes with > many images, with few..many images, and with < few images."""
    if few > many:
        raise ValueError(f"few threshold ({few}) must not exceed many threshold ({many})")
    counts = list(histogram.values())
    return {
        "many": sum(c > many for c in counts),
        "medium": sum(few <= c <= many for c in counts),
        "few": sum(c < few for c in counts),
    }


def dataset_stats(records: Sequence[Record], name: str, many: int = 100, few: int = 20) -> dict:
    """Table-1 row. Class-dependent fields are None for scene datasets (no image-level class)."""
    n_obj = [r.n_objects for r in records]
    hist = Counter(r.cls for r in records if r.cls is not None)
    histogram = dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))
    labels = Counter(b.label for r in records for b in r.boxes)
    row: dict = {
        "dataset": name,
        "images": len(records),
        "objects": int(sum(n_obj)),
        "objects_per_image": {
            "mean": float(np.mean(n_obj)) if n_obj else 0.0,
            "median": float(statistics.median(n_obj)) if n_obj else 0.0,
        },
        "object_convention": OBJECT_CONVENTION,
        "crowd_boxes": int(sum(crowd_count(r) for r in records)),
        "classes": len(hist),
        "class_histogram": histogram,
        "box_labels": len(labels),
    }
    if hist:
        vals = list(hist.values())
        row["imbalance"] = {
            "gini": gini(vals),
            "max_min_ratio": max(vals) / min(vals),
            "max": max(vals),
            "min": min(vals),
        }
        row["uniform"] = len(set(vals)) == 1
        row["shots"] = shot_groups(histogram, many=many, few=few)
        row["shot_thresholds"] = {"many": many, "few": few}
    else:
        row["imbalance"] = None
        row["uniform"] = None
        row["shots"] = None
    return row


def shard_records(shard_dir: str | Path) -> tuple[list[Record], dict]:
    """The records the shards hold (from their `{key}.json` members, sorted by key) and the manifest.

    Only the JSON members are read; tarfile seeks over the image payloads. The count must equal the manifest's
    `totals.images`, otherwise the shards changed after writing (run `python -m data_prep.shards verify`).
    """
    from data_prep.shards import load_manifest  # not at import time: stats of a subset.csv need no shard code

    meta, tars = load_manifest(shard_dir)
    records = []
    for tar in tars:
        with tarfile.open(tar) as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(".json"):
                    f = tf.extractfile(member)
                    assert f is not None
                    records.append(record_from_sample(member.name[: -len(".json")], json.loads(f.read())))
    want = meta.get("totals", {}).get("images")
    if want is not None and want != len(records):
        raise ValueError(
            f"{shard_dir}: shards hold {len(records)} samples, manifest.json says {want}; the shards changed "
            f"after writing: check them with `python -m data_prep.shards verify {shard_dir}` and rebuild"
        )
    records.sort(key=lambda r: r.key)
    return records, meta


def skip_report(meta: dict, shard_recs: Sequence[Record], subset: Sequence[Record] | None) -> dict:
    """What the shard step dropped: counts by reason from the manifest, and (given subset.csv) the images and
    objects the subset listed but the shards lack, with their keys."""
    out: dict = {
        "input_records": meta.get("totals", {}).get("input_records"),
        "images": int(sum(meta.get("skipped", {}).values())),
        "by_reason": dict(meta.get("skipped", {})),
    }
    if subset is not None:
        held = {r.key for r in shard_recs}
        lost = [r for r in subset if r.key not in held]
        out.update(
            subset_images=len(subset),
            subset_objects=int(sum(r.n_objects for r in subset)),
            objects=int(sum(r.n_objects for r in lost)),
            keys=[r.key for r in lost[:SKIPPED_KEYS_SHOWN]],
        )
        if len(lost) != out["images"]:
            out["note"] = (
                f"{len(lost)} subset keys are not in the shards but the manifest counts {out['images']} skips: "
                "the shards were built from another subset.csv; rebuild them"
            )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Table-1 statistics of the shards (or of a subset.csv)")
    p.add_argument("--shards", help="shard directory (with manifest.json): count what the model trains on")
    p.add_argument("--subset", help="subset.csv: names the skipped images; counted itself without --shards")
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--many", type=int, default=100, help="classes with more images than this are 'many-shot'")
    p.add_argument("--few", type=int, default=20, help="classes with fewer images than this are 'few-shot'")
    a = p.parse_args(argv)
    if not a.shards and not a.subset:
        p.error("give --shards (and --subset to name the skipped images), or --subset alone")
    subset = read_subset_csv(a.subset) if a.subset else None
    if a.shards:
        records, meta = shard_records(a.shards)
        row = dataset_stats(records, a.name, many=a.many, few=a.few)
        row["source"] = "shards"
        row["skipped"] = skip_report(meta, records, subset)
    else:
        assert subset is not None
        row = dataset_stats(subset, a.name, many=a.many, few=a.few)
        row["source"] = "subset.csv (before the shard step's skips)"
    atomic_write_text(Path(a.out), json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
