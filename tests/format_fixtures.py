"""Tiny datasets in the real on-disk formats, made by code (PIL), for reader/shard tests.

Each builder plants the defects the readers must count: an annotation that points at a missing image, an
unknown class, crowd boxes, images without annotations, labels without box2d.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(w: int = 24, h: int = 16, mode: str = "RGB", seed: int = 0, quality: int = 85) -> bytes:
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, size=(h, w, bands) if bands > 1 else (h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=quality)  # 4 bands arrive as RGBA
    return buf.getvalue()


def png_bytes(w: int = 24, h: int = 16, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_imagenet(
    root: Path, counts: dict[str, int], with_loc: bool = True, with_mapping: bool = True, seed: int = 0
) -> Path:
    """<root>/train/<wnid>/<wnid>_<n>.JPEG; LOC boxes for every other image (1-3 boxes) plus one LOC row whose
    image does not exist."""
    rng = np.random.default_rng(seed)
    rows = []
    for ci, (wnid, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            stem = f"{wnid}_{i}"
            write(root / "train" / wnid / f"{stem}.JPEG", jpeg_bytes(seed=seed * 1000 + ci * 100 + i))
            if i % 2 == 0:
                k = int(rng.integers(1, 4))
                pred = " ".join(f"{wnid} {1 + j} {2 + j} {10 + j} {12 + j}" for j in range(k))
                rows.append((stem, pred))
    if with_loc:
        first = sorted(counts)[0]
        rows.append((f"{first}_99999", f"{first} 1 1 5 5"))  # annotation without image
        with open(root / "LOC_train_solution.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageId", "PredictionString"])
            w.writerows(rows)
    if with_mapping:
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{c} name of {c}\n" for c in sorted(counts)))
    return root


def make_coco(root: Path, n_images: int = 6, seed: int = 0) -> Path:
    """train2017 + instances_train2017.json. Image 1 has no annotations, image n_images is listed but its file
    is missing, one annotation is crowd, one references an unknown category and one an unknown image."""
    rng = np.random.default_rng(seed)
    cats = [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 3, "name": "car", "supercategory": "v"},
    ]
    images, anns = [], []
    aid = 1
    for i in range(1, n_images + 1):
        fname = f"{i:012d}.jpg"
        w, h = 24 + i, 16 + i
        images.append({"id": i, "file_name": fname, "width": w, "height": h})
        if i != n_images:
            write(root / "train2017" / fname, jpeg_bytes(w, h, seed=i))
        if i == 1:
            continue
        for _ in range(int(rng.integers(1, 5))):
            x, y = float(rng.integers(0, 10)), float(rng.integers(0, 8))
            anns.append(
                {
                    "id": aid,
                    "image_id": i,
                    "category_id": int(rng.choice([1, 3])),
                    "bbox": [x, y, 5.0, 4.0],
                    "area": 20.0,
                    "iscrowd": 0,
                    "segmentation": [[x, y, x + 5, y, x + 5, y + 4]],
                }
            )
            aid += 1
    anns[0]["iscrowd"] = 1
    anns.append(
        {
            "id": aid,
            "image_id": 2,
            "category_id": 99,
            "bbox": [0, 0, 1, 1],
            "area": 1,
            "iscrowd": 0,
            "segmentation": [],
        }
    )
    anns.append(
        {
            "id": aid + 1,
            "image_id": 12345,
            "category_id": 1,
            "bbox": [0, 0, 1, 1],
            "area": 1,
            "iscrowd": 0,
            "segmentation": [],
        }
    )
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    return root


OI_COLUMNS = [
    "ImageID",
    "Source",
    "LabelName",
    "Confidence",
    "XMin",
    "XMax",
    "YMin",
    "YMax",
    "IsOccluded",
    "IsTruncated",
    "IsGroupOf",
    "IsDepiction",
    "IsInside",
]


def oi_flags(row_index: int) -> list[str]:
    """IsOccluded, IsTruncated, IsGroupOf, IsDepiction, IsInside of box row `row_index`: every value (1, 0 and
    -1 = not annotated) occurs, and every fourth row is a group-of box."""
    return [
        str(row_index % 2),
        "1" if row_index % 3 == 0 else "0",
        "1" if row_index % 4 == 1 else "0",
        "-1" if row_index % 5 == 0 else "0",
        "0",
    ]


def make_openimages(root: Path, n_images: int = 5, seed: int = 0) -> Path:
    """train/<ImageID>.jpg + box CSV (normalised) + class descriptions. The last ImageID has rows but no file;
    one row has a LabelName missing from the descriptions; one image on disk has no rows. Flag columns follow
    `oi_flags` (group-of, occluded, truncated, depiction, including -1)."""
    rng = np.random.default_rng(seed)
    labels = {"/m/01": "Car", "/m/02": "Person", "/m/03": "Tree"}
    rows = []
    for i in range(n_images):
        image_id = f"{0xABC000 + i:016x}"
        if i != n_images - 1:
            write(root / "train" / f"{image_id}.jpg", jpeg_bytes(32, 20, seed=100 + i))
        for _ in range(int(rng.integers(1, 6))):
            x1, y1 = rng.uniform(0, 0.5, 2)
            rows.append(
                [
                    image_id,
                    "xclick",
                    str(rng.choice(list(labels))),
                    "1",
                    f"{x1:.4f}",
                    f"{x1 + 0.3:.4f}",
                    f"{y1:.4f}",
                    f"{y1 + 0.4:.4f}",
                    *oi_flags(len(rows)),
                ]
            )
    rows.append(
        [f"{0xABC000:016x}", "xclick", "/m/zzz", "1", "0.1", "0.2", "0.1", "0.2", "0", "0", "0", "0", "0"]
    )
    write(root / "train" / "ffff000000000000.jpg", jpeg_bytes(32, 20, seed=99))  # no rows
    with open(root / "oidv6-train-annotations-bbox.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(OI_COLUMNS)
        w.writerows(rows)
    with open(root / "oidv7-class-descriptions-boxable.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["LabelName", "DisplayName"])
        w.writerows(sorted(labels.items()))
    return root


def make_bdd(root: Path, n_frames: int = 4, seed: int = 0) -> Path:
    """images/100k/train/*.jpg + labels/det_20/det_train.json; the last frame's image is missing, one label
    has no box2d, one frame has labels: null, and the first frame's last box2d label is a crowd."""
    rng = np.random.default_rng(seed)
    frames = []
    lid = 0
    for i in range(n_frames):
        name = f"{i:08x}-{i * 7:08x}.jpg"
        if i != n_frames - 1:
            write(root / "images" / "100k" / "train" / name, jpeg_bytes(40, 24, seed=200 + i))
        labels = []
        for _ in range(int(rng.integers(1, 5))):
            x1, y1 = float(rng.uniform(0, 20)), float(rng.uniform(0, 10))
            labels.append(
                {
                    "id": str(lid),
                    "category": str(rng.choice(["car", "pedestrian", "traffic sign"])),
                    "attributes": {"occluded": bool(rng.integers(2)), "truncated": False},
                    "box2d": {"x1": x1, "y1": y1, "x2": x1 + 8, "y2": y1 + 6},
                }
            )
            lid += 1
        frames.append(
            {
                "name": name,
                "attributes": {
                    "weather": "clear",
                    "scene": "city street",
                    "timeofday": ["daytime", "night"][i % 2],
                },
                "timestamp": 10000,
                "labels": labels if i != 1 else None,
            }
        )
    frames[0]["labels"][-1]["attributes"]["crowd"] = True
    frames[0]["labels"].append({"id": "poly", "category": "drivable area", "attributes": {}, "poly2d": []})
    (root / "labels" / "det_20").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "det_20" / "det_train.json").write_text(json.dumps(frames))
    return root


def resave_like_spreadsheet(src: Path, dst: Path) -> Path:
    """`src` CSV as a European-locale spreadsheet saves it: ';' separators, CR line ends, UTF-8 BOM and decimal
    commas in numbers (written with the csv module, so quoting stays valid)."""
    with open(src, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))

    def cell(v: str) -> str:
        try:
            float(v)
        except ValueError:
            return v
        return v.replace(".", ",")

    with open(dst, "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f, delimiter=";", lineterminator="\r").writerows([[cell(v) for v in r] for r in rows])
    return dst


def make_bad_images(directory: Path) -> dict[str, Path]:
    """One file per input case the shard writer must handle, keyed by case."""
    good = jpeg_bytes(30, 20, seed=7)
    cases = {
        "ok": good,
        "grayscale": jpeg_bytes(30, 20, mode="L", seed=8),
        "cmyk": jpeg_bytes(30, 20, mode="CMYK", seed=9),
        "png_as_jpg": png_bytes(30, 20, seed=10),
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "garbage": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "trailing_bytes": good + b"\x00\x00\x00",
    }
    return {k: write(directory / f"{k}.jpg", v) for k, v in cases.items()}


# ----------------------------------------------------------------------------------------------- a learnable toy
CLASSES = ("a", "b", "c")


def class_image(rng: np.random.Generator, cls: int, side: int = 40) -> Image.Image:
    """Noise with a bright square in channel ``cls``: a class a few SGD steps can tell apart."""
    arr = (rng.random((side, side, 3)) * 60).astype(np.uint8)
    arr[side // 5: side - side // 5, side // 5: side - side // 5, cls] = 220
    return Image.fromarray(arr)


def make_class_folder(root: Path, n_train: int = 8, n_val: int = 4, seed: int = 0) -> Path:
    """An ImageFolder classification target (train / val) of the three toy classes."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                class_image(rng, c).save(root / split / name / f"{i}.png")
    return root


def make_class_shards(root: Path, n: int = 32, seed: int = 1) -> Path:
    """Webdataset shards (two of them) of ``n`` toy images, as the shard step writes them."""
    from data_prep.records import Record
    from data_prep.shards import write_shards

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        path = root / f"img_{i:03d}.jpg"
        class_image(rng, i % 3).save(path, quality=90)
        records.append(Record(key=f"img_{i:03d}", path=str(path), cls=CLASSES[i % 3], boxes=[], split="train",
                              width=40, height=40))
    out = root / "shards"
    write_shards(records, out, "tiny", max_per_shard=n // 2, min_shards=2, progress=False)
    return out
