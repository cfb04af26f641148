"""Readers for the four pretraining formats: annotations in, `Record`s out, pixels never touched.

Each reader lists the image directory once (a set lookup is far cheaper than one stat per annotation on a
million-image tree), so an annotation that points at a missing file becomes a counted skip and one log line,
not an exception. Records come back sorted by key so every later stage is deterministic.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.records import Box, Record, make_keys

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DatasetLayoutError(FileNotFoundError):
    """The dataset root (or a file it must contain) is missing; the message names the expected layout."""


@dataclass
class ReadResult:
    records: list[Record]
    skipped: Counter = field(default_factory=Counter)


class _SkipLog:
    """Counts skips by reason and logs the first few of each, so a broken dataset does not flood the log."""

    def __init__(self, fmt: str, limit: int = 5):
        self.fmt, self.limit, self.counts = fmt, limit, Counter()

    def __call__(self, reason: str, detail: str, n: int = 1) -> None:
        if n <= 0:
            return
        self.counts[reason] += n
        if self.counts[reason] - n < self.limit:
            log.warning("%s: skip (%s): %s", self.fmt, reason, detail)
        elif self.counts[reason] - n == self.limit:
            log.warning("%s: further '%s' skips are counted, not logged", self.fmt, reason)


def _require(path: Path, fmt: str, layout: str, what: str) -> None:
    if not path.exists():
        raise DatasetLayoutError(f"{fmt}: {what} {path} does not exist. Expected layout: {layout}")


def _list_files(directory: Path) -> dict[str, str]:
    """File name -> absolute path for the regular files of one directory (not recursive)."""
    out = {}
    with os.scandir(directory) as it:
        for e in it:
            if e.is_file():
                out[e.name] = e.path
    return out


def _finish(root: Path, items: list[tuple[str, Record]], skipped: Counter) -> ReadResult:
    """Assign keys from paths relative to the root and sort by key."""
    keys = make_keys([rel for rel, _ in items])
    records = []
    for key, (_, rec) in zip(keys, items, strict=True):
        rec.key = key
        records.append(rec)
    records.sort(key=lambda r: r.key)
    return ReadResult(records=records, skipped=skipped)


# ------------------------------------------------------------------------------------------------ imagenet

IMAGENET_LAYOUT = (
    "<root>/<split>/<wnid>/<wnid>_<n>.JPEG, optional <root>/LOC_synset_mapping.txt ('wnid name' lines) and "
    "<root>/LOC_<split>_solution.csv (ImageId,PredictionString)"
)


def _read_loc(path: Path) -> dict[str, list[Box]]:
    """LOC_*_solution.csv: PredictionString is repeated 'wnid x1 y1 x2 y2' groups."""
    out: dict[str, list[Box]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise ValueError(f"{path}: header must be 'ImageId,PredictionString', got {header}")
        for line, row in enumerate(reader, start=2):
            if len(row) < 2:
                continue
            parts = row[1].split()
            if len(parts) % 5:
                raise ValueError(
                    f"{path}:{line}: PredictionString must be groups of 'wnid x1 y1 x2 y2', got {row[1]!r}"
                )
            out[row[0]] = [
                Box(
                    float(parts[i + 1]),
                    float(parts[i + 2]),
                    float(parts[i + 3]),
                    float(parts[i + 4]),
                    parts[i],
                )
                for i in range(0, len(parts), 5)
            ]
    return out


def read_imagenet(root: str | Path, split: str = "train") -> ReadResult:
    """ImageNet folder tree: class = wnid folder; n_objects from LOC boxes when an image has them, else 1."""
    root = Path(root)
    _require(root, "imagenet", IMAGENET_LAYOUT, "dataset root")
    split_dir = root / split
    _require(split_dir, "imagenet", IMAGENET_LAYOUT, "split directory")
    skip = _SkipLog("imagenet")

    names: dict[str, str] = {}
    mapping = root / "LOC_synset_mapping.txt"
    if mapping.exists():
        for line in mapping.read_text(encoding="utf-8").splitlines():
            if line.strip():
                wnid, _, name = line.strip().partition(" ")
                names[wnid] = name
    loc_path = root / f"LOC_{split}_solution.csv"
    loc = _read_loc(loc_path) if loc_path.exists() else {}

    items: list[tuple[str, Record]] = []
    seen: set[str] = set()

    def add(cls: str, name: str, path: str, rel: str) -> None:
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTS:
            skip("not_image", path)
            return
        boxes = loc.get(stem)
        seen.add(stem)
        attrs = {"name": names[cls]} if cls in names else {}
        rec = Record(
            key="",
            path=path,
            cls=cls,
            boxes=list(boxes or []),
            split=split,
            attributes=attrs,
            object_count=None if boxes else 1,
        )
        items.append((rel, rec))

    with os.scandir(split_dir) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.is_dir():
            if names and e.name not in names:
                files = _list_files(Path(e.path))
                skip(
                    "unknown_class", f"{e.path}: folder not in {mapping} ({len(files)} images)", n=len(files)
                )
                continue
            for fname, fpath in sorted(_list_files(Path(e.path)).items()):
                add(e.name, fname, fpath, f"{split}/{e.name}/{fname}")
        elif e.is_file():
            # Flat layout (ImageNet val): the class comes from the first box's wnid in the solution file.
            stem = os.path.splitext(e.name)[0]
            if stem not in loc or not loc[stem]:
                skip("unlabelled_image", f"{e.path}: flat file with no row in {loc_path}")
                continue
            add(loc[stem][0].label, e.name, e.path, f"{split}/{e.name}")
    for image_id in sorted(set(loc) - seen):
        skip("annotation_without_image", f"{loc_path}: {image_id} has no image under {split_dir}")
    return _finish(root, items, skip.counts)


# ------------------------------------------------------------------------------------------------ coco

COCO_LAYOUT = "<root>/<split><year>/<12-digit id>.jpg and <root>/annotations/instances_<split><year>.json"


def read_coco(root: str | Path, split: str = "train", year: str = "2017") -> ReadResult:
    """COCO instances JSON: images without annotations are kept (0 objects); crowd boxes count but are flagged
    in attributes['crowd'] (indices into boxes)."""
    root = Path(root)
    _require(root, "coco", COCO_LAYOUT, "dataset root")
    folder = split if split[-4:].isdigit() else f"{split}{year}"
    img_dir = root / folder
    ann_path = root / "annotations" / f"instances_{folder}.json"
    _require(img_dir, "coco", COCO_LAYOUT, "image directory")
    _require(ann_path, "coco", COCO_LAYOUT, "annotation file")
    skip = _SkipLog("coco")
    with open(ann_path, encoding="utf-8") as f:
        data = json.load(f)
    for k in ("images", "annotations", "categories"):
        if k not in data:
            raise ValueError(f"{ann_path}: missing top-level key {k!r}; is this a COCO instances file?")
    cats = {c["id"]: c["name"] for c in data["categories"]}
    files = _list_files(img_dir)
    images = {}
    for im in data["images"]:
        images[im["id"]] = im
    per_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        if ann["image_id"] not in images:
            skip(
                "annotation_without_image",
                f"{ann_path}: annotation {ann.get('id')} -> image_id {ann['image_id']}",
            )
            continue
        if ann["category_id"] not in cats:
            skip(
                "unknown_class",
                f"{ann_path}: annotation {ann.get('id')} has category_id {ann['category_id']}",
            )
            continue
        per_image[ann["image_id"]].append(ann)

    items = []
    for image_id in sorted(images):
        im = images[image_id]
        fname = im["file_name"]
        if fname not in files:
            skip("missing_image", f"{img_dir / fname} (image id {image_id}) listed in {ann_path}")
            continue
        anns = sorted(per_image.get(image_id, []), key=lambda a: a.get("id", 0))
        boxes, crowd = [], []
        for i, a in enumerate(anns):
            x, y, w, h = (float(v) for v in a["bbox"])
            boxes.append(Box(x, y, x + w, y + h, cats[a["category_id"]]))
            if a.get("iscrowd", 0):
                crowd.append(i)
        attrs = {"image_id": image_id}
        if crowd:
            attrs["crowd"] = crowd
        rec = Record(
            key="",
            path=files[fname],
            cls=None,
            boxes=boxes,
            split=split,
            width=im.get("width"),
            height=im.get("height"),
            attributes=attrs,
        )
        items.append((f"{folder}/{fname}", rec))
    return _finish(root, items, skip.counts)


# ---------------------------------------------------------------------------------------------- openimages

OPENIMAGES_LAYOUT = (
    "<root>/<split>/<ImageID>.jpg, <root>/oidv6-<split>-annotations-bbox.csv (ImageID,...,LabelName,...,"
    "XMin,XMax,"
    "YMin,YMax,...) and <root>/oidv7-class-descriptions-boxable.csv (LabelName,DisplayName)"
)


def _read_oi_classes(path: Path) -> dict[str, str]:
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if len(row) < 2 or row[:2] == ["LabelName", "DisplayName"]:
                continue
            out[row[0]] = row[1]
    return out


def read_openimages(
    root: str | Path,
    split: str = "train",
    boxes_csv: str | None = None,
    classes_csv: str | None = None,
    include_unannotated: bool = False,
) -> ReadResult:
    """OpenImages box CSV grouped by ImageID; label = DisplayName. Image sizes are not in the CSV and readers
    do not open pixels, so boxes stay normalised (attributes['box_coords'] = 'normalized'); the shard writer
    makes them absolute once it has parsed the JPEG header."""
    root = Path(root)
    _require(root, "openimages", OPENIMAGES_LAYOUT, "dataset root")
    img_dir = root / split
    box_path = root / (boxes_csv or f"oidv6-{split}-annotations-bbox.csv")
    cls_path = root / (classes_csv or "oidv7-class-descriptions-boxable.csv")
    if classes_csv is None and not cls_path.exists() and (root / "class-descriptions-boxable.csv").exists():
        cls_path = root / "class-descriptions-boxable.csv"
    for p, what in (
        (img_dir, "image directory"),
        (box_path, "box annotation file"),
        (cls_path, "class file"),
    ):
        _require(p, "openimages", OPENIMAGES_LAYOUT, what)
    skip = _SkipLog("openimages")
    classes = _read_oi_classes(cls_path)
    files = _list_files(img_dir)
    by_stem = {os.path.splitext(n)[0]: n for n in files}

    per_image: dict[str, list[Box]] = defaultdict(list)
    with open(box_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        need = ["ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax"]
        missing = [c for c in need if c not in header]
        if missing:
            raise ValueError(f"{box_path}: missing columns {missing}; header is {header}")
        i_id, i_lab, i_x1, i_x2, i_y1, i_y2 = (header.index(c) for c in need)
        for row in reader:
            label = classes.get(row[i_lab])
            if label is None:
                skip(
                    "unknown_class",
                    f"{box_path}: {row[i_id]} has LabelName {row[i_lab]} not in {cls_path.name}",
                )
                continue
            per_image[row[i_id]].append(
                Box(float(row[i_x1]), float(row[i_y1]), float(row[i_x2]), float(row[i_y2]), label)
            )

    items = []
    for image_id in sorted(per_image):
        if image_id not in by_stem:
            skip(
                "missing_image",
                f"{img_dir}/{image_id}.jpg has {len(per_image[image_id])} boxes in {box_path.name}",
            )
            continue
    wanted = sorted(set(per_image) & set(by_stem)) if not include_unannotated else sorted(by_stem)
    unannotated = len(set(by_stem) - set(per_image))
    if unannotated and not include_unannotated:
        skip(
            "image_without_annotations", f"{unannotated} images in {img_dir} have no box rows", n=unannotated
        )
    for image_id in wanted:
        fname = by_stem[image_id]
        boxes = per_image.get(image_id, [])
        rec = Record(
            key="",
            path=files[fname],
            cls=None,
            boxes=boxes,
            split=split,
            attributes={"box_coords": "normalized"},
        )
        items.append((f"{split}/{fname}", rec))
    return _finish(root, items, skip.counts)


# ------------------------------------------------------------------------------------------------ bdd100k

BDD_LAYOUT = "<root>/images/100k/<split>/<name>.jpg and <root>/labels/det_20/det_<split>.json"


def read_bdd100k(root: str | Path, split: str = "train") -> ReadResult:
    """BDD100K det_20 JSON: only box2d labels are objects; frame attributes (weather, scene, timeofday) and
    per-box attributes (occluded, truncated, aligned with boxes) are carried."""
    root = Path(root)
    _require(root, "bdd100k", BDD_LAYOUT, "dataset root")
    img_dir = root / "images" / "100k" / split
    ann_path = root / "labels" / "det_20" / f"det_{split}.json"
    _require(img_dir, "bdd100k", BDD_LAYOUT, "image directory")
    _require(ann_path, "bdd100k", BDD_LAYOUT, "label file")
    skip = _SkipLog("bdd100k")
    with open(ann_path, encoding="utf-8") as f:
        frames = json.load(f)
    if not isinstance(frames, list):
        raise ValueError(f"{ann_path}: expected a JSON list of frames, got {type(frames).__name__}")
    files = _list_files(img_dir)
    items = []
    for fr in frames:
        name = fr["name"]
        if name not in files:
            skip("missing_image", f"{img_dir / name} listed in {ann_path}")
            continue
        boxes, box_attrs = [], []
        for lab in fr.get("labels") or []:
            b = lab.get("box2d")
            if not b:
                skip("label_without_box2d", f"{name}: label {lab.get('id')} ({lab.get('category')})")
                continue
            boxes.append(Box(float(b["x1"]), float(b["y1"]), float(b["x2"]), float(b["y2"]), lab["category"]))
            box_attrs.append(dict(lab.get("attributes") or {}))
        attrs = dict(fr.get("attributes") or {})
        if "timestamp" in fr:
            attrs["timestamp"] = fr["timestamp"]
        if box_attrs:
            attrs["box_attributes"] = box_attrs
        items.append(
            (
                f"images/100k/{split}/{name}",
                Record(key="", path=files[name], cls=None, boxes=boxes, split=split, attributes=attrs),
            )
        )
    return _finish(root, items, skip.counts)


READERS: dict[str, Callable[..., ReadResult]] = {
    "imagenet": read_imagenet,
    "coco": read_coco,
    "openimages": read_openimages,
    "bdd100k": read_bdd100k,
}


def read_records(fmt: str, root: str | Path, split: str = "train", **opts) -> ReadResult:
    """Dispatch to the reader for `fmt`; `opts` are that reader's keyword options."""
    if fmt not in READERS:
        raise ValueError(f"unknown dataset format {fmt!r}; known formats: {', '.join(sorted(READERS))}")
    result = READERS[fmt](root, split=split, **opts)
    log.info(
        "%s %s: %d records, skipped %s", fmt, root, len(result.records), dict(result.skipped) or "nothing"
    )
    return result
