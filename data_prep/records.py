"""Records: the one in-memory shape every reader produces and every later stage consumes.

`subset.csv` is the durable artefact of subset selection: it is written before any shard exists so the same
subset can be rebuilt, diffed and shared. Keys are made webdataset-safe here, once, so that shard members,
FiftyOne ids and log lines all agree on a sample's name.

Per-box flags live in `attributes`, not in `Box`, so subset.csv and the shard JSON keep one box shape for every
format: `attributes['box_attributes']` is one dict per box (aligned with `boxes`; OpenImages IsOccluded,
IsTruncated, IsGroupOf, IsDepiction, IsInside; BDD100K occluded, truncated, crowd) and `attributes['crowd']`
lists the indices of crowd / group-of boxes (COCO iscrowd, OpenImages IsGroupOf, BDD100K crowd).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBSET_COLUMNS = ["key", "path", "class", "n_objects", "split", "width", "height", "boxes", "attributes"]

# `{key}.json` must fit the 100-byte ustar name field, so keys are capped well below that.
MAX_KEY_LEN = 80
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")
_KEY_OK = re.compile(r"^[A-Za-z0-9_-]+$")

log = logging.getLogger(__name__)


class SubsetFormatError(ValueError):
    """subset.csv does not have the expected columns or a row cannot be parsed."""


@dataclass
class Box:
    """Axis-aligned box in absolute pixels (xyxy) unless the record says its coords are normalised."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str

    def to_list(self) -> list:
        return [self.x1, self.y1, self.x2, self.y2, self.label]


@dataclass
class Record:
    """One image of a dataset split, as read from annotations (never from pixels)."""

    key: str
    path: str
    cls: str | None
    boxes: list[Box]
    split: str
    width: int | None = None
    height: int | None = None
    attributes: dict = field(default_factory=dict)
    # Object count when it is not len(boxes): ImageNet images without box annotations count as one object.
    object_count: int | None = None

    @property
    def n_objects(self) -> int:
        return self.object_count if self.object_count is not None else len(self.boxes)


def crowd_count(rec: Record) -> int:
    """Boxes of `rec` that stand for a group of instances (crowd / group-of); each still counts as one object."""
    return len(rec.attributes.get("crowd") or [])


def record_from_sample(key: str, meta: dict) -> Record:
    """A record back from a shard's `{key}.json` member (data_prep.shards.sample_json), so later stages can
    count what the shards hold rather than what subset.csv asked for."""
    boxes = [
        Box(float(b[0]), float(b[1]), float(b[2]), float(b[3]), str(b[4])) for b in meta.get("boxes") or []
    ]
    n = meta.get("n_objects")
    return Record(
        key=key,
        path=meta.get("path", ""),
        cls=meta.get("class"),
        boxes=boxes,
        split=meta.get("split", ""),
        width=meta.get("width"),
        height=meta.get("height"),
        attributes=dict(meta.get("attributes") or {}),
        object_count=None if n is None or n == len(boxes) else int(n),
    )


def sanitize_key(stem: str) -> str:
    """Replace every character webdataset would misread (dots split extensions, slashes split dirs)."""
    key = _KEY_BAD.sub("_", stem)
    return key or "_"


def is_valid_key(key: str) -> bool:
    return bool(_KEY_OK.match(key)) and len(key) <= MAX_KEY_LEN


def _digest(text: str, n: int) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def make_keys(rel_paths: Sequence[str]) -> list[str]:
    """Unique webdataset keys for image paths (relative to the dataset root, so keys do not depend on
    where the dataset is mounted).

    The key is the sanitised file stem. Every path whose stem collides with another (or was shortened) gets a
    short hash of its relative path appended, so the result does not depend on the order of the input.
    """
    bases = []
    for rel in rel_paths:
        base = sanitize_key(Path(rel).stem)
        bases.append(base)
    counts = Counter(bases)
    keys = []
    for rel, base in zip(rel_paths, bases, strict=True):
        if counts[base] > 1 or len(base) > MAX_KEY_LEN - 9:
            base = f"{base[: MAX_KEY_LEN - 9]}-{_digest(rel, 8)}"
        keys.append(base)
    # A hashed key could, in principle, equal another file's plain stem: lengthen the hash for those.
    counts = Counter(keys)
    if len(counts) != len(keys):
        for i, (rel, key) in enumerate(zip(rel_paths, keys, strict=True)):
            if counts[key] > 1:
                keys[i] = f"{bases[i][: MAX_KEY_LEN - 17]}-{_digest(rel, 16)}"
        dup = [k for k, c in Counter(keys).items() if c > 1]
        if dup:
            raise ValueError(f"could not make unique keys for {dup[:5]} (duplicate paths in the input?)")
    return keys


def temp_for(path: Path) -> Path:
    """Hidden temp name next to `path`, unique to this process and thread (same filesystem, so os.replace is
    atomic; created with open() so the final file gets the usual umask permissions, unlike mkstemp's 0600).
    Jobs that share a cache (a checkpoint's transfer, SGD-linear and fine-tuning jobs run at once) may write
    the same file together: each writes its own temp file and the last rename wins, never a missing temp."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same directory + os.replace, so readers never see half a file."""
    path = Path(path)
    tmp = temp_for(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def record_to_row(rec: Record) -> list[str]:
    return [
        rec.key,
        rec.path,
        "" if rec.cls is None else rec.cls,
        str(rec.n_objects),
        rec.split,
        "" if rec.width is None else str(rec.width),
        "" if rec.height is None else str(rec.height),
        json.dumps([b.to_list() for b in rec.boxes], separators=(",", ":")),
        json.dumps(rec.attributes, sort_keys=True, separators=(",", ":")),
    ]


def write_subset_csv(records: Iterable[Record], path: str | Path) -> None:
    """Write subset.csv atomically, columns in the contract's order."""
    path = Path(path)
    tmp = temp_for(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(SUBSET_COLUMNS)
            for rec in records:
                w.writerow(record_to_row(rec))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _opt_int(text: str, path: Path, line: int, col: str) -> int | None:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise SubsetFormatError(
            f"{path}:{line}: column {col!r} must be an integer or empty, got {text!r}"
        ) from None


def read_subset_csv(path: str | Path) -> list[Record]:
    """Read subset.csv back into records (n_objects is kept even when it is not len(boxes))."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subset list {path} does not exist; run `python -m data_prep.subsets` first")
    csv.field_size_limit(sys.maxsize)
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != SUBSET_COLUMNS:
            raise SubsetFormatError(
                f"{path}: header is {header}, expected {','.join(SUBSET_COLUMNS)}; "
                "regenerate it with data_prep.subsets"
            )
        for line, row in enumerate(reader, start=2):
            if len(row) != len(SUBSET_COLUMNS):
                raise SubsetFormatError(f"{path}:{line}: {len(row)} columns, expected {len(SUBSET_COLUMNS)}")
            key, p, cls, n_obj, split, w, h, boxes, attrs = row
            try:
                box_list = [
                    Box(float(b[0]), float(b[1]), float(b[2]), float(b[3]), str(b[4]))
                    for b in json.loads(boxes)
                ]
                attributes = json.loads(attrs)
            except (ValueError, IndexError, TypeError) as e:
                raise SubsetFormatError(
                    f"{path}:{line}: key {key!r}: bad boxes/attributes JSON ({e})"
                ) from None
            n = _opt_int(n_obj, path, line, "n_objects")
            rec = Record(
                key=key,
                path=p,
                cls=cls or None,
                boxes=box_list,
                split=split,
                width=_opt_int(w, path, line, "width"),
                height=_opt_int(h, path, line, "height"),
                attributes=attributes,
                object_count=None if n is None or n == len(box_list) else n,
            )
            records.append(rec)
    return records


def configure_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, for Snakemake's `log:` files, to a file as well."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers, force=True
    )
