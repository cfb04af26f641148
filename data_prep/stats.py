"""Dataset statistics: one row of the paper's Table 1, computed from subset.csv (what the model actually saw).

Shot thresholds default to ImageNet-LT's (many > 100, medium 20-100, few < 20 images per class) and are
parameters because the embedded synthetic world is far smaller than ImageNet.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_prep.records import Record, atomic_write_text, read_subset_csv


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


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Table-1 statistics of a subset.csv")
    p.add_argument("--subset", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--many", type=int, default=100, help="classes with more images than this are 'many-shot'")
    p.add_argument("--few", type=int, default=20, help="classes with fewer images than this are 'few-shot'")
    a = p.parse_args(argv)
    row = dataset_stats(read_subset_csv(a.subset), a.name, many=a.many, few=a.few)
    atomic_write_text(Path(a.out), json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
