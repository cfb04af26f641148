"""Readers for the four pretraining formats: annotations in, `Record`s out, pixels never touched.

Each reader lists the image directory once (a set lookup is far cheaper than one stat per annotation on a
million-image tree), so an annotation that points at a missing file becomes a counted skip and one log line,
not an exception. Records come back sorted by key so every later stage is deterministic.

A reader that yields nothing, or skips most of what it read, stops instead of returning: real annotation files
taught us that a class list saved by a spreadsheet (';' separators, CR line ends) parses to zero classes, and a
run that then writes empty shards and exits 0 hides the mistake until training. CSVs are therefore sniffed
(delimiter, BOM, any line ends), and each reader records what it parsed so `read_records` can name the file
and the likely cause when the yield is implausible.

Per-box flags (COCO iscrowd, OpenImages IsOccluded/IsTruncated/IsGroupOf/IsDepiction/IsInside, BDD100K
occluded/truncated/crowd) are kept as `attributes['box_attributes']` (one dict per box, aligned with `boxes`),
and crowd / group-of boxes are listed in `attributes['crowd']` (indices into boxes) for every format that has
the notion, so statistics and FiftyOne treat them alike.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.records import Box, Record, make_keys

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# A reader that skips more than this fraction of what it parsed (rows, images, annotations) stops.
MAX_SKIP_FRACTION = 0.5

# Annotation file names a config may override per format (`datasets.<name>.files`), as reader keywords;
# relative names are taken under the dataset root.
FILE_OPTIONS: dict[str, tuple[str, ...]] = {
    "imagenet": ("loc_csv", "synset_mapping"),
    "coco": ("annotations_json",),
    "openimages": ("boxes_csv", "classes_csv"),
    "bdd100k": ("labels_json",),
}


class DatasetLayoutError(FileNotFoundError):
    """The dataset root (or a file it must contain) is missing; the message names the expected layout."""


class AnnotationParseError(ValueError):
    """An annotation file parsed to nothing, or most of it was skipped; the message names the file, what was
    parsed and the likely cause."""


@dataclass
class YieldCheck:
    """What one reader parsed from one file, so an implausible yield can be reported against that file."""

    path: str
    what: str  # unit of `total`, e.g. "box rows"
    total: int
    skipped: int
    reason: str  # the skip reason(s) counted in `skipped`
    cause: str  # the likely cause to print when too much was skipped


@dataclass
class ReadResult:
    records: list[Record]
    skipped: Counter = field(default_factory=Counter)
    checks: list[YieldCheck] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # annotation files read

    def check_yield(self, fmt: str, root: str | Path, max_skip_fraction: float = MAX_SKIP_FRACTION) -> None:
        """Raise AnnotationParseError when no record came out or a check skipped > max_skip_fraction."""
        for c in self.checks:
            if c.total and c.skipped / c.total > max_skip_fraction:
                raise AnnotationParseError(
                    f"{fmt}: {c.path}: {c.skipped} of {c.total} {c.what} skipped ({c.reason}), more than "
                    f"{max_skip_fraction:.0%}; likely cause: {c.cause}"
                )
        if not self.records:
            parsed = "; ".join(f"{c.path}: {c.total} {c.what}, {c.skipped} skipped" for c in self.checks)
            files = ", ".join(self.sources) or str(root)
            raise AnnotationParseError(
                f"{fmt}: no records from {files} under {root} (parsed: {parsed or 'nothing'}; skipped: "
                f"{dict(self.skipped) or 'nothing'}); likely cause: wrong root/split, an annotation file that "
                "does not belong to these images, or a file re-saved by a spreadsheet (separators, line ends)"
            )


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


def _describe_text(path: Path, n: int = 4096) -> str:
    """Separators, line ends and BOM of a text file's start, for error messages ("what it looks like")."""
    raw = path.read_bytes()[:n]
    crlf = raw.count(b"\r\n")
    cr, lf = raw.count(b"\r") - crlf, raw.count(b"\n") - crlf
    ends = [name for name, k in (("CRLF", crlf), ("CR", cr), ("LF", lf)) if k] or ["no"]
    seps = [repr(chr(c)) for c in b",;\t|" if raw.count(bytes([c]))]
    first = raw.replace(b"\r", b"\n").split(b"\n", 1)[0][:80]
    bom = ", UTF-8 BOM" if raw.startswith(b"\xef\xbb\xbf") else ""
    return (
        f"{'/'.join(ends)} line ends, separators seen {', '.join(seps) or 'none'}{bom}, first line {first!r}"
    )


_DELIMITERS = ",;\t|"


def _sniff_delimiter(path: Path, header: Sequence[str] = (), sample_chars: int = 64 * 1024) -> str:
    """The CSV delimiter of `path` (',' ';' tab or '|').

    A file with a known header is split by the delimiter that yields those column names: the sniffer alone
    picks ',' for a ';' file whose numbers have decimal commas, since both occur on every data line. Otherwise
    csv.Sniffer decides on whole lines of the file's start. Only the delimiter is taken from the sniffer: its
    quote and whitespace guesses are unreliable on short samples, and every OpenImages file uses standard
    quoting. A file the sniffer cannot decide is read as ','.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        sample = f.read(sample_chars)
    if header:
        first = sample.replace("\r", "\n").split("\n", 1)[0]
        for d in _DELIMITERS:
            cells = {c.strip() for c in next(csv.reader([first], delimiter=d), [])}
            if set(header) <= cells:
                return d
    cut = max(sample.rfind("\n"), sample.rfind("\r"))
    if 0 < cut < len(sample) - 1:
        sample = sample[: cut + 1]
    try:
        return csv.Sniffer().sniff(sample, delimiters=_DELIMITERS).delimiter
    except csv.Error:
        return ","


def _csv_rows(path: Path, header: Sequence[str] = ()) -> tuple[Iterator[list[str]], str]:
    """Rows of a CSV in any dialect a spreadsheet writes (sniffed delimiter, UTF-8 with or without BOM, LF,
    CRLF or CR line ends: newline='' hands the csv module the raw line ends, which it splits on all three).
    `header`: column names the first row must hold, which settles the delimiter."""
    delim = _sniff_delimiter(path, header)

    def rows() -> Iterator[list[str]]:
        with open(path, newline="", encoding="utf-8-sig") as f:
            for row in csv.reader(f, delimiter=delim):
                if row and any(c.strip() for c in row):
                    yield [c.strip() for c in row]

    return rows(), delim


def _number(text: str, decimal_comma: bool) -> float:
    """float() that also takes '0,25' from files whose separator is not ',' (a European-locale spreadsheet
    writes ';' separators because ',' is its decimal mark)."""
    return float(text.replace(",", ".") if decimal_comma else text)


def _list_files(directory: Path) -> dict[str, str]:
    """File name -> absolute path for the regular files of one directory (not recursive)."""
    out = {}
    with os.scandir(directory) as it:
        for e in it:
            if e.is_file():
                out[e.name] = e.path
    return out


def _finish(
    root: Path,
    items: list[tuple[str, Record]],
    skipped: Counter,
    checks: list[YieldCheck] | None = None,
    sources: list[Path] | None = None,
) -> ReadResult:
    """Assign keys from paths relative to the root and sort by key."""
    keys = make_keys([rel for rel, _ in items])
    records = []
    for key, (_, rec) in zip(keys, items, strict=True):
        rec.key = key
        records.append(rec)
    records.sort(key=lambda r: r.key)
    return ReadResult(
        records=records, skipped=skipped, checks=list(checks or []), sources=[str(p) for p in sources or []]
    )


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


def read_imagenet(
    root: str | Path, split: str = "train", loc_csv: str | None = None, synset_mapping: str | None = None
) -> ReadResult:
    """ImageNet folder tree: class = wnid folder; n_objects from LOC boxes when an image has them, else 1.
    `loc_csv` / `synset_mapping` override the default file names (relative to the root); a named file must
    exist, the default ones are optional."""
    root = Path(root)
    _require(root, "imagenet", IMAGENET_LAYOUT, "dataset root")
    split_dir = root / split
    _require(split_dir, "imagenet", IMAGENET_LAYOUT, "split directory")
    skip = _SkipLog("imagenet")

    names: dict[str, str] = {}
    mapping = root / (synset_mapping or "LOC_synset_mapping.txt")
    if synset_mapping:
        _require(
            mapping, "imagenet", IMAGENET_LAYOUT, "synset mapping (datasets.<name>.files.synset_mapping)"
        )
    if loc_csv:
        _require(root / loc_csv, "imagenet", IMAGENET_LAYOUT, "LOC box file (datasets.<name>.files.loc_csv)")
    if mapping.exists():
        for line in mapping.read_text(encoding="utf-8").splitlines():
            if line.strip():
                wnid, _, name = line.strip().partition(" ")
                names[wnid] = name
        if not names:
            raise AnnotationParseError(
                f"imagenet: synset mapping {mapping} parsed to 0 classes ({_describe_text(mapping)}); expected "
                "'wnid name' lines such as 'n01440764 tench, Tinca tinca'"
            )
    loc_path = root / (loc_csv or f"LOC_{split}_solution.csv")
    loc = _read_loc(loc_path) if loc_path.exists() else {}
    n_folder_images = n_flat = 0

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
            files = _list_files(Path(e.path))
            n_folder_images += len(files)
            if names and e.name not in names:
                skip(
                    "unknown_class", f"{e.path}: folder not in {mapping} ({len(files)} images)", n=len(files)
                )
                continue
            for fname, fpath in sorted(files.items()):
                add(e.name, fname, fpath, f"{split}/{e.name}/{fname}")
        elif e.is_file():
            # Flat layout (ImageNet val): the class comes from the first box's wnid in the solution file.
            stem = os.path.splitext(e.name)[0]
            n_flat += 1
            if stem not in loc or not loc[stem]:
                skip("unlabelled_image", f"{e.path}: flat file with no row in {loc_path}")
                continue
            add(loc[stem][0].label, e.name, e.path, f"{split}/{e.name}")
    for image_id in sorted(set(loc) - seen):
        skip("annotation_without_image", f"{loc_path}: {image_id} has no image under {split_dir}")
    checks = [
        YieldCheck(
            str(mapping),
            "images in class folders",
            n_folder_images,
            skip.counts["unknown_class"],
            "folder not in the synset mapping",
            "the synset mapping belongs to another ImageNet variant, or the class folders are not wnids",
        ),
        YieldCheck(
            str(loc_path),
            "flat image files",
            n_flat,
            skip.counts["unlabelled_image"],
            "no row in the LOC solution file",
            "the LOC file is for another split, or its ImageId column does not match the file names",
        ),
    ]
    sources = [p for p in (mapping, loc_path) if p.exists()]
    return _finish(root, items, skip.counts, checks, sources)


# ------------------------------------------------------------------------------------------------ coco

COCO_LAYOUT = "<root>/<split><year>/<12-digit id>.jpg and <root>/annotations/instances_<split><year>.json"


def read_coco(
    root: str | Path, split: str = "train", year: str = "2017", annotations_json: str | None = None
) -> ReadResult:
    """COCO instances JSON: images without annotations are kept (0 objects); crowd boxes count (one object
    each) but are flagged in attributes['crowd'] (indices into boxes). `annotations_json` overrides
    annotations/instances_<split><year>.json (relative to the root)."""
    root = Path(root)
    _require(root, "coco", COCO_LAYOUT, "dataset root")
    folder = split if split[-4:].isdigit() else f"{split}{year}"
    img_dir = root / folder
    ann_path = root / (annotations_json or f"annotations/instances_{folder}.json")
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
    checks = [
        YieldCheck(
            str(ann_path),
            "images listed",
            len(images),
            skip.counts["missing_image"],
            f"file not in {img_dir}",
            "the annotation file is for another split or year than the image folder",
        ),
        YieldCheck(
            str(ann_path),
            "annotations",
            len(data["annotations"]),
            skip.counts["annotation_without_image"] + skip.counts["unknown_class"],
            "image_id or category_id not defined in the file",
            "a truncated or hand-merged instances file",
        ),
    ]
    return _finish(root, items, skip.counts, checks, [ann_path])


# ---------------------------------------------------------------------------------------------- openimages

OPENIMAGES_LAYOUT = (
    "<root>/<split>/<ImageID>.jpg, <root>/oidv6-<split>-annotations-bbox.csv (ImageID,...,LabelName,...,"
    "XMin,XMax,"
    "YMin,YMax,...) and <root>/oidv7-class-descriptions-boxable.csv (LabelName,DisplayName)"
)
# Per-box flag columns of the OpenImages box CSVs: 1 / 0, and -1 (or empty) where the flag was not annotated.
OI_FLAG_COLUMNS = ("IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside")
_OI_FLAG_VALUES = {"1": True, "0": False, "-1": None, "": None}
_SPREADSHEET_CAUSE = (
    "the file was re-saved by a spreadsheet or editor (separator, quoting or line ends changed) or is not "
    "this kind of file; compare it with the original download"
)


def _read_oi_classes(path: Path) -> dict[str, str]:
    """LabelName -> DisplayName; a header row is optional (oidv7 has one, older lists do not)."""
    out = {}
    rows, delim = _csv_rows(path)
    n = 0
    for row in rows:
        n += 1
        if len(row) < 2 or row[:2] == ["LabelName", "DisplayName"]:
            continue
        out[row[0]] = row[1]
    if not out:
        raise AnnotationParseError(
            f"openimages: class file {path} parsed to 0 classes ({n} rows with delimiter {delim!r}; "
            f"{_describe_text(path)}); expected 'LabelName,DisplayName' rows such as '/m/011k07,Tortoise'; "
            f"likely cause: {_SPREADSHEET_CAUSE}"
        )
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
    makes them absolute once it has parsed the JPEG header.

    The flag columns present (OI_FLAG_COLUMNS) are kept per box in attributes['box_attributes'] (True / False,
    None where -1 = not annotated); group-of boxes are also listed in attributes['crowd'], as COCO's iscrowd.
    """
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
    per_flags: dict[str, list[dict]] = defaultdict(list)
    need = ["ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax"]
    rows, delim = _csv_rows(box_path, need)
    header = next(rows, None) or []
    missing = [c for c in need if c not in header]
    if missing:
        raise AnnotationParseError(
            f"openimages: {box_path}: missing columns {missing}; header parsed as {header[:8]} with delimiter "
            f"{delim!r} ({_describe_text(box_path)}); likely cause: {_SPREADSHEET_CAUSE}"
        )
    i_id, i_lab, i_x1, i_x2, i_y1, i_y2 = (header.index(c) for c in need)
    flag_cols = [(c, header.index(c)) for c in OI_FLAG_COLUMNS if c in header]
    decimal_comma = delim != ","
    n_rows = 0
    for line, row in enumerate(rows, start=2):
        n_rows += 1
        if len(row) < len(header):
            skip("short_row", f"{box_path}:{line}: {len(row)} fields, header has {len(header)}")
            continue
        label = classes.get(row[i_lab])
        if label is None:
            skip(
                "unknown_class",
                f"{box_path}: {row[i_id]} has LabelName {row[i_lab]} not in {cls_path.name}",
            )
            continue
        try:
            x1, x2, y1, y2 = (_number(row[i], decimal_comma) for i in (i_x1, i_x2, i_y1, i_y2))
        except ValueError:
            raise AnnotationParseError(
                f"openimages: {box_path}:{line}: coordinates {[row[i] for i in (i_x1, i_x2, i_y1, i_y2)]} are "
                f"not numbers (delimiter {delim!r}); likely cause: {_SPREADSHEET_CAUSE}"
            ) from None
        per_image[row[i_id]].append(Box(x1, y1, x2, y2, label))
        per_flags[row[i_id]].append({c: _OI_FLAG_VALUES.get(row[i], None) for c, i in flag_cols})

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
        attrs: dict = {"box_coords": "normalized"}
        if flag_cols:
            flags = per_flags.get(image_id, [])
            attrs["box_attributes"] = flags
            attrs["crowd"] = [i for i, f in enumerate(flags) if f.get("IsGroupOf")]
        rec = Record(key="", path=files[fname], cls=None, boxes=boxes, split=split, attributes=attrs)
        items.append((f"{split}/{fname}", rec))
    checks = [
        YieldCheck(
            str(box_path),
            "box rows",
            n_rows,
            skip.counts["unknown_class"] + skip.counts["short_row"],
            f"LabelName not in {cls_path.name}, or fewer fields than the header",
            f"{cls_path.name} is not the class list of this box file (another OpenImages version?), or "
            f"{_SPREADSHEET_CAUSE}",
        ),
        YieldCheck(
            str(box_path),
            "annotated images",
            len(per_image),
            skip.counts["missing_image"],
            f"no <ImageID>.jpg in {img_dir}",
            "the box file is for another split than the image folder, or only part of the images is downloaded",
        ),
    ]
    return _finish(root, items, skip.counts, checks, [cls_path, box_path])


# ------------------------------------------------------------------------------------------------ bdd100k

BDD_LAYOUT = "<root>/images/100k/<split>/<name>.jpg and <root>/labels/det_20/det_<split>.json"


def read_bdd100k(root: str | Path, split: str = "train", labels_json: str | None = None) -> ReadResult:
    """BDD100K det_20 JSON: only box2d labels are objects; frame attributes (weather, scene, timeofday) and
    per-box attributes (occluded, truncated, crowd; aligned with boxes) are carried, and crowd boxes are listed
    in attributes['crowd'] as COCO's iscrowd. `labels_json` overrides labels/det_20/det_<split>.json."""
    root = Path(root)
    _require(root, "bdd100k", BDD_LAYOUT, "dataset root")
    img_dir = root / "images" / "100k" / split
    ann_path = root / (labels_json or f"labels/det_20/det_{split}.json")
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
        attrs["crowd"] = [i for i, a in enumerate(box_attrs) if a.get("crowd")]
        items.append(
            (
                f"images/100k/{split}/{name}",
                Record(key="", path=files[name], cls=None, boxes=boxes, split=split, attributes=attrs),
            )
        )
    checks = [
        YieldCheck(
            str(ann_path),
            "frames",
            len(frames),
            skip.counts["missing_image"],
            f"image not in {img_dir}",
            "the label file is for another split than the image folder (images/100k/<split>)",
        )
    ]
    return _finish(root, items, skip.counts, checks, [ann_path])


READERS: dict[str, Callable[..., ReadResult]] = {
    "imagenet": read_imagenet,
    "coco": read_coco,
    "openimages": read_openimages,
    "bdd100k": read_bdd100k,
}


def read_records(
    fmt: str,
    root: str | Path,
    split: str = "train",
    max_skip_fraction: float = MAX_SKIP_FRACTION,
    **opts,
) -> ReadResult:
    """Dispatch to the reader for `fmt`; `opts` are that reader's keyword options (FILE_OPTIONS names the
    annotation-file ones). Raises AnnotationParseError when nothing, or too little, was read."""
    if fmt not in READERS:
        raise ValueError(f"unknown dataset format {fmt!r}; known formats: {', '.join(sorted(READERS))}")
    result = READERS[fmt](root, split=split, **opts)
    log.info(
        "%s %s: %d records, skipped %s", fmt, root, len(result.records), dict(result.skipped) or "nothing"
    )
    result.check_yield(fmt, root, max_skip_fraction)
    return result


def file_options(fmt: str, files: dict[str, str] | None) -> dict[str, str]:
    """Validate a config's `files:` mapping for `fmt` and return it as reader keywords."""
    files = dict(files or {})
    allowed = FILE_OPTIONS.get(fmt, ())
    bad = sorted(set(files) - set(allowed))
    if bad:
        raise ValueError(
            f"{fmt}: unknown annotation file option(s) {bad} in datasets.<name>.files; "
            f"allowed for {fmt}: {', '.join(allowed) or 'none'}"
        )
    return files
