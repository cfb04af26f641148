"""Readers for fine-tuned dense transfer: VOC segmentation (any year, DeepLab's train_aug), Cityscapes,
VOC detection (07+12) and NYU Depth v2 (depth, and 40-class semantic segmentation), from their real on-disk layouts.

Like ``analysis.targets`` (whose error classes they raise), the readers list a split's items without decoding
pixels, never download, and stop with an error that names the missing file or folder and the layout they
expect. ``analysis.targets.load_split`` routes the formats ``voc_seg``, ``cityscapes``, ``voc_det``,
``nyud_depth`` and ``nyud_seg`` here.
"""

from __future__ import annotations

import hashlib
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from analysis.targets import (
    VOC_CLASSES,
    VOC_SEG_CLASSES,
    EmptySplitError,
    SegmentationSplit,
    TargetError,
    TargetNotFoundError,
    _fingerprint,
    _read_list,
    _require,
    _voc_dir,
    load_label_png,
    load_rgb,
)

VOC_YEARS = (2007, 2008, 2009, 2010, 2011, 2012)
VOC_LAYOUT = (
    "<root>/VOC<year>/JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/<imageset>.txt, "
    "ImageSets/Segmentation/<split>.txt and SegmentationClass/<id>.png, i.e. the VOCtrainval / VOCtest tars "
    "extracted into <root> (= VOCdevkit)"
)
SBD_LAYOUT = (
    "<sbd_root>/dataset/cls/<id>.mat (struct GTcls with field Segmentation), dataset/img/<id>.jpg, "
    "dataset/train.txt and dataset/val.txt, i.e. SBD's benchmark.tgz extracted (sbd_root = benchmark_RELEASE)"
)
CITYSCAPES_LAYOUT = (
    "<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png and <root>/gtFine/<split>/<city>/*_gtFine_labelIds.png, "
    "i.e. leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip extracted into <root>"
)
NYUD_LAYOUT = (
    "<root>/nyu_depth_v2_labeled.mat (MATLAB v7.3 / HDF5 with datasets images (N, 3, W, H) uint8 and depths "
    "(N, W, H) metres as h5py sees them) and <root>/splits.mat (MATLAB v5 with trainNdxs / testNdxs, 1-based)"
)
NYUD_CLASS_MAP_LAYOUT = (
    "Gupta et al.'s classMapping40.mat (rgbd-pp / nyud2 release, benchmarkData/metadata): a MATLAB file whose "
    "`mapClass` (1 x 894) maps label k of the `labels` dataset to class 1..40 (0 = ignore), with an optional "
    "`className` (1 x 40 cell) naming the classes"
)
NYUD_SEG_LAYOUT = (
    "<root>/nyu_depth_v2_labeled.mat (as nyud_depth, plus its `labels` dataset (N, W, H) of 894-class ids, 0 = "
    f"unlabeled), <root>/splits.mat, and `class_map`: {NYUD_CLASS_MAP_LAYOUT}"
)
# The 40 classes of Gupta et al. (CVPR 2013) in mapClass order; className in the mapping file overrides them.
NYUD40_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
    "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes", "ceiling", "books",
    "refridgerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person", "night stand",
    "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)  # fmt: skip


def _year(value: Any, target: str) -> int:
    try:
        year = int(value)
    except (TypeError, ValueError):
        year = -1
    if year not in VOC_YEARS:
        raise TargetError(f"target {target!r}: VOC year {value!r} is not one of {list(VOC_YEARS)}")
    return year


def voc_year_dir(target: str, root: str | Path, year: int | str = 2007) -> Path:
    """``<root>/VOC<year>`` (root may also be that folder itself). 2007 keeps ``targets._voc_dir``'s rules."""
    year = _year(year, target)
    if year == 2007:
        return _voc_dir(target, root)
    root = Path(root)
    _require(root, target, "root", f"point `root` at the folder that contains VOC{year}/; expected layout: {VOC_LAYOUT}")
    if (root / f"VOC{year}").is_dir():
        return root / f"VOC{year}"
    if root.name == f"VOC{year}" and (root / "JPEGImages").is_dir():
        return root
    raise TargetNotFoundError(
        f"target {target!r}: {root}/VOC{year} does not exist; point `root` at its parent. Expected layout: "
        f"{VOC_LAYOUT}"
    )


# ------------------------------------------------------------------------------------ VOC segmentation


def load_sbd_mask(path: str | Path, target: str = "?") -> np.ndarray:
    """SBD ``cls/<id>.mat`` -> (H, W) uint8 class ids (``GTcls.Segmentation``; SBD has no void band)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:
        raise TargetError(f"target {target!r}: cannot read SBD mask {path} ({exc})") from exc
    gt = mat.get("GTcls")
    seg = getattr(gt, "Segmentation", None)
    if seg is None:
        raise TargetError(f"target {target!r}: SBD mask {path} lacks GTcls.Segmentation; expected {SBD_LAYOUT}")
    seg = np.asarray(seg)
    if seg.ndim != 2 or (seg.size and (seg.min() < 0 or seg.max() > 255)):
        raise TargetError(f"target {target!r}: GTcls.Segmentation of {path} is not a 2-D map of class ids")
    return seg.astype(np.uint8)


@dataclass
class VocSegSplit(SegmentationSplit):
    """A VOC segmentation split whose masks are VOC / DeepLab PNGs or SBD ``.mat`` files (by file suffix)."""

    def load_mask(self, i: int) -> np.ndarray:
        path = self.masks[i]
        if path.endswith(".mat"):
            return load_sbd_mask(path, self.target)
        return load_label_png(path, self.target)


def _sbd_dataset_dir(target: str, sbd_root: str | Path) -> Path:
    sbd = Path(sbd_root)
    _require(sbd, target, "sbd_root", f"expected layout: {SBD_LAYOUT}")
    for cand in (sbd / "dataset", sbd):
        if (cand / "cls").is_dir():
            return cand
    raise TargetNotFoundError(
        f"target {target!r}: {sbd}/dataset/cls does not exist; expected layout: {SBD_LAYOUT}"
    )


def read_voc_seg(
    target: str, root: str | Path, split: str, year: int | str = 2007, sbd_root: str | Path | None = None
) -> SegmentationSplit:
    """VOC semantic segmentation of ``<root>/VOC<year>``: ``ImageSets/Segmentation/<split>.txt`` +
    ``SegmentationClass/<id>.png`` (the year defaults to 2007 for old configs; the real protocol uses 2012).

    ``split="train_aug"`` (10582 images: VOC2012 train + SBD train + SBD val minus VOC2012 val) is read from
    ``ImageSets/Segmentation/train_aug.txt`` with masks ``SegmentationClassAug/<id>.png`` (DeepLab's convention)
    when that list exists, else built from ``sbd_root`` (SBD's benchmark_RELEASE): VOC train ids keep their VOC
    masks, the others are read from SBD's ``cls/<id>.mat``; images come from VOC's JPEGImages, or SBD's img/
    where VOC lacks one. Masks are (H, W) uint8 class ids, 255 = ignore.
    """
    voc = voc_year_dir(target, root, year)
    seg = voc / "ImageSets" / "Segmentation"
    if split == "train_aug" and not (seg / "train_aug.txt").exists():
        if sbd_root is None:
            raise TargetNotFoundError(
                f"target {target!r}: split 'train_aug' needs either {seg}/train_aug.txt with masks "
                f"{voc}/SegmentationClassAug/<id>.png (DeepLab's SegmentationClassAug release), or `sbd_root` in "
                f"the target config pointing at SBD: {SBD_LAYOUT}; neither is there"
            )
        return _voc_sbd_train_aug(target, voc, sbd_root)
    list_file = seg / f"{split}.txt"
    _require(list_file, target, "image list", f"expected layout: {VOC_LAYOUT}")
    ids = _read_list(list_file, target)
    if not ids:
        raise EmptySplitError(f"target {target!r}: {list_file} lists no image")
    mask_dir = voc / ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass")
    _require(mask_dir, target, "mask folder", f"expected {mask_dir}/<id>.png for every id of {list_file}")
    images = [str(voc / "JPEGImages" / f"{i}.jpg") for i in ids]
    masks = [str(mask_dir / f"{i}.png") for i in ids]
    for p in (images[0], masks[0]):
        _require(Path(p), target, "file", f"expected layout: {VOC_LAYOUT}")
    return SegmentationSplit(target, split, images, masks, list(VOC_SEG_CLASSES), source=str(voc))


def _voc_sbd_train_aug(target: str, voc: Path, sbd_root: str | Path) -> VocSegSplit:
    ds = _sbd_dataset_dir(target, sbd_root)
    seg = voc / "ImageSets" / "Segmentation"
    voc_train = _read_list(_require(seg / "train.txt", target, "image list", f"expected layout: {VOC_LAYOUT}"), target)
    voc_val = set(_read_list(_require(seg / "val.txt", target, "image list", f"expected layout: {VOC_LAYOUT}"), target))
    sbd_ids: list[str] = []
    for name in ("train.txt", "val.txt"):
        sbd_ids += _read_list(_require(ds / name, target, "SBD list", f"expected layout: {SBD_LAYOUT}"), target)
    ids = sorted((set(voc_train) | set(sbd_ids)) - voc_val)
    if not ids:
        raise EmptySplitError(f"target {target!r}: train_aug from {seg} and {ds} has no image")
    voc_train_set = set(voc_train)
    images, masks, missing = [], [], []
    for i in ids:
        img = voc / "JPEGImages" / f"{i}.jpg"
        if not img.exists() and (ds / "img" / f"{i}.jpg").exists():
            img = ds / "img" / f"{i}.jpg"
        png = voc / "SegmentationClass" / f"{i}.png"
        mask = png if i in voc_train_set and png.exists() else ds / "cls" / f"{i}.mat"
        missing += [p for p in (img, mask) if not p.exists()]
        images.append(str(img))
        masks.append(str(mask))
    if missing:
        raise TargetNotFoundError(
            f"target {target!r}: {len(missing)} file(s) of train_aug are missing, e.g. {missing[0]}; expected "
            f"VOC's {VOC_LAYOUT} and SBD's {SBD_LAYOUT}"
        )
    return VocSegSplit(target, "train_aug", images, masks, list(VOC_SEG_CLASSES), source=str(voc))


# ----------------------------------------------------------------------------------------------- Cityscapes


@cache
def cityscapes_train_ids() -> tuple[np.ndarray, tuple[str, ...]]:
    """(256,) uint8 look-up table label id -> train id (255 ignore) and the 19 train-id class names, both from
    torchvision's own ``Cityscapes.classes`` table."""
    from torchvision.datasets import Cityscapes

    lut = np.full(256, 255, np.uint8)
    names: dict[int, str] = {}
    for c in Cityscapes.classes:
        if 0 <= c.train_id < 255 and 0 <= c.id < 256:
            lut[c.id] = c.train_id
            names[c.train_id] = c.name
    return lut, tuple(names[k] for k in range(len(names)))


@dataclass
class CityscapesSplit(SegmentationSplit):
    """Cityscapes fine annotations: ``masks`` are the ``*_gtFine_labelIds.png``; ``load_mask`` returns train ids
    (0..18, 255 = ignore, which includes 'unlabeled' and every class not evaluated)."""

    def load_mask(self, i: int) -> np.ndarray:
        return cityscapes_train_ids()[0][load_label_png(self.masks[i], self.target)]


def read_cityscapes(target: str, root: str | Path, split: str) -> CityscapesSplit:
    """Cityscapes ``gtFine`` semantic segmentation through ``torchvision.datasets.Cityscapes`` (which never
    downloads). Splits: train / val / test (test ships no labels: its masks are all ignore)."""
    from torchvision.datasets import Cityscapes

    root = Path(root)
    if split not in ("train", "val", "test"):
        raise TargetError(f"target {target!r}: Cityscapes split {split!r} is not one of train, val, test")
    _require(root, target, "root", f"expected layout: {CITYSCAPES_LAYOUT} (downloads are disabled)")
    for sub in ("leftImg8bit", "gtFine"):
        d = root / sub / split
        if not d.is_dir():
            raise TargetNotFoundError(
                f"target {target!r}: Cityscapes folder {d} does not exist; expected layout: {CITYSCAPES_LAYOUT} "
                "(this project does not download: place the files there, or point the target's root at them)"
            )
    try:
        ds = Cityscapes(str(root), split=split, mode="fine", target_type="semantic")
    except (RuntimeError, ValueError, OSError) as exc:
        raise TargetNotFoundError(
            f"target {target!r}: Cityscapes {split!r} not readable under {root} ({exc}); expected layout: "
            f"{CITYSCAPES_LAYOUT}"
        ) from exc
    pairs = sorted(
        (img, tgt[0]) for img, tgt in zip(ds.images, ds.targets, strict=True) if img.endswith("_leftImg8bit.png")
    )
    if not pairs:
        raise EmptySplitError(
            f"target {target!r}: {root}/leftImg8bit/{split} holds no <city>/*_leftImg8bit.png; expected layout: "
            f"{CITYSCAPES_LAYOUT}"
        )
    missing = [t for _, t in pairs if not os.path.exists(t)]
    if missing:
        raise TargetNotFoundError(
            f"target {target!r}: {len(missing)} label map(s) of Cityscapes {split!r} are missing, e.g. {missing[0]}; "
            f"expected layout: {CITYSCAPES_LAYOUT}"
        )
    images, masks = [p[0] for p in pairs], [p[1] for p in pairs]
    return CityscapesSplit(target, split, images, masks, list(cityscapes_train_ids()[1]), source=str(root))


# ----------------------------------------------------------------------------------------------- VOC detection


@dataclass
class DetectionSplit:
    """Images with boxes: ``boxes[i]`` float32 (n, 4) x1, y1, x2, y2 in 0-based pixel-edge coordinates (VOC's
    1-based inclusive xmin / ymin minus 1, xmax / ymax as they are: torchvision detection models' convention),
    ``labels[i]`` int64 (n,) in 1..len(classes) (0 is background), ``difficult[i]`` bool (n,). Images without
    any object are kept (empty arrays). ``ids`` are ``<year>/<image id>``."""

    target: str
    split: str
    ids: list[str]
    paths: list[str]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    difficult: list[np.ndarray]
    classes: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.paths)

    def load(self, i: int) -> Image.Image:
        return load_rgb(self.paths[i], self.target)


def parse_voc_det_split(target: str, split: str, default_year: int | str = 2007) -> list[tuple[int, str]]:
    """"2007_trainval+2012_trainval" -> [(2007, "trainval"), (2012, "trainval")]; a part without a year
    ("test") uses ``default_year``."""
    parts = []
    for part in str(split).split("+"):
        part = part.strip()
        m = re.fullmatch(r"(?:(\d{4})_)?(\w+)", part)
        if not m:
            raise TargetError(
                f"target {target!r}: VOC detection split {split!r}: expected <year>_<imageset> parts joined by '+', "
                "e.g. '2007_trainval+2012_trainval' or '2007_test'"
            )
        parts.append((_year(m.group(1) or default_year, target), m.group(2)))
    return parts


def parse_voc_xml(
    path: Path, target: str, classes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One VOC annotation -> (boxes float32 (n, 4) 0-based x1 y1 x2 y2, labels int64 (n,) 1-based, difficult)."""
    classes = list(classes or VOC_CLASSES)
    index = {c: k + 1 for k, c in enumerate(classes)}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise TargetError(f"target {target!r}: annotation {path} is malformed XML ({exc})") from exc
    except OSError as exc:
        raise TargetNotFoundError(f"target {target!r}: cannot read annotation {path} ({exc})") from exc
    boxes, labels, difficult = [], [], []
    for n, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            raise TargetError(
                f"target {target!r}: annotation {path}: object {n} has unknown class {name!r}; known: {classes}"
            )
        bb = obj.find("bndbox")
        try:
            assert bb is not None
            x1, y1, x2, y2 = (float(bb.findtext(k) or "") for k in ("xmin", "ymin", "xmax", "ymax"))
            diff = int(float((obj.findtext("difficult") or "0").strip() or 0))
        except (AssertionError, ValueError) as exc:
            raise TargetError(
                f"target {target!r}: annotation {path}: object {n} ({name}) lacks a numeric bndbox "
                "xmin/ymin/xmax/ymax or difficult flag"
            ) from exc
        if x2 < x1 or y2 < y1:
            raise TargetError(f"target {target!r}: annotation {path}: object {n} ({name}) has xmax < xmin or ymax < ymin")
        boxes.append((x1 - 1.0, y1 - 1.0, x2, y2))
        labels.append(index[name])
        difficult.append(bool(diff))
    return (
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(labels, np.int64),
        np.asarray(difficult, bool),
    )


def read_voc_det(target: str, root: str | Path, split: str, year: int | str = 2007) -> DetectionSplit:
    """PASCAL VOC detection: ``Annotations/<id>.xml`` + ``ImageSets/Main/<imageset>.txt`` + ``JPEGImages/<id>.jpg``
    of each ``<root>/VOC<year>`` named by ``split`` ("2007_trainval+2012_trainval" is MoCo's 07+12 train set,
    "2007_test" its test set). ``year`` is the year of parts written without one."""
    parts = parse_voc_det_split(target, split, year)
    ids, paths, boxes, labels, difficult, seen = [], [], [], [], [], set()
    sources = []
    for y, imageset in parts:
        voc = voc_year_dir(target, root, y)
        sources.append(str(voc))
        list_file = voc / "ImageSets" / "Main" / f"{imageset}.txt"
        _require(list_file, target, "image list", f"expected layout: {VOC_LAYOUT}")
        for i in _read_list(list_file, target):
            if (y, i) in seen:
                continue
            seen.add((y, i))
            xml = _require(voc / "Annotations" / f"{i}.xml", target, "annotation", f"expected layout: {VOC_LAYOUT}")
            img = _require(voc / "JPEGImages" / f"{i}.jpg", target, "image", f"expected layout: {VOC_LAYOUT}")
            b, lab, d = parse_voc_xml(xml, target)
            ids.append(f"{y}/{i}")
            paths.append(str(img))
            boxes.append(b)
            labels.append(lab)
            difficult.append(d)
    if not ids:
        raise EmptySplitError(f"target {target!r}: VOC detection split {split!r} under {root} lists no image")
    return DetectionSplit(
        target, str(split), ids, paths, boxes, labels, difficult, list(VOC_CLASSES), source=os.path.commonpath(sources)
    )


# ----------------------------------------------------------------------------------------------- NYU Depth v2


@dataclass
class DepthSplit:
    """NYU Depth v2 labeled images: ``load(i)`` PIL RGB, ``load_depth(i)`` float32 (H, W) metres (0 = missing),
    ``load_labels(i)`` (H, W) class ids where the file has ``labels`` (0 = unlabeled). ``ids`` are ``nyud/<n>``
    by 1-based index into the .mat, ``rows`` the 0-based rows.

    The HDF5 file is opened lazily, once per process: a pickled or forked copy (DataLoader workers) reopens it
    on first use instead of sharing a handle.
    """

    target: str
    split: str
    ids: list[str]
    rows: list[int]
    path: str
    source: str = ""
    _h5: Any = field(default=None, init=False, repr=False, compare=False)
    _pid: int = field(default=-1, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def fingerprint(self) -> str:
        return _fingerprint([str(Path(self.path).resolve()), *self.ids])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5"], state["_pid"] = None, -1
        return state

    def _file(self) -> Any:
        if self._h5 is None or self._pid != os.getpid():
            import h5py

            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5, self._pid = None, -1

    def load(self, i: int) -> Image.Image:
        rgb = np.asarray(self._file()["images"][self.rows[i]]).transpose(2, 1, 0)  # (3, W, H) -> (H, W, 3)
        return Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")

    def load_depth(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(self._file()["depths"][self.rows[i]], np.float32).T)

    def load_labels(self, i: int) -> np.ndarray:
        f = self._file()
        if "labels" not in f:
            raise TargetError(f"target {self.target!r}: {self.path} has no `labels` dataset")
        return np.ascontiguousarray(np.asarray(f["labels"][self.rows[i]]).T)


def read_nyud_depth(target: str, root: str | Path, split: str) -> DepthSplit:
    """NYU Depth v2 labeled set (``nyu_depth_v2_labeled.mat`` + ``splits.mat``); splits "train" (795 images
    in the real release) and "test" (654)."""
    mat, one_based = _nyud_rows(target, root, split)
    return DepthSplit(
        target, split, [f"nyud/{k:05d}" for k in one_based], [k - 1 for k in one_based], str(mat), source=str(root)
    )


def _nyud_rows(target: str, root: str | Path, split: str, labels: bool = False) -> tuple[Path, list[int]]:
    """The labeled-set file and the split's 1-based image indices, after checking the layout (and, with
    ``labels``, that the file has a ``labels`` dataset shaped like ``depths``)."""
    import h5py
    from scipy.io import loadmat

    root = Path(root)
    layout = NYUD_SEG_LAYOUT if labels else NYUD_LAYOUT
    _require(root, target, "root", f"expected layout: {layout} (downloads are disabled)")
    keys = {"train": "trainNdxs", "test": "testNdxs"}
    if split not in keys:
        raise TargetError(f"target {target!r}: NYUD split {split!r} is not one of train, test")
    mat = _require(root / "nyu_depth_v2_labeled.mat", target, "labeled set", f"expected layout: {layout}")
    splits_file = _require(root / "splits.mat", target, "split file", f"expected layout: {layout}")
    try:
        with h5py.File(mat, "r") as f:
            if "images" not in f or "depths" not in f:
                raise TargetError(
                    f"target {target!r}: {mat} lacks the `images` / `depths` datasets; expected layout: {layout}"
                )
            shape_i, shape_d = f["images"].shape, f["depths"].shape
            shape_l = f["labels"].shape if "labels" in f else None
    except OSError as exc:
        raise TargetError(
            f"target {target!r}: {mat} is not a MATLAB v7.3 (HDF5) file ({exc}); expected layout: {layout}"
        ) from exc
    if len(shape_i) != 4 or shape_i[1] != 3 or tuple(shape_d) != (shape_i[0], *shape_i[2:]):
        raise TargetError(
            f"target {target!r}: {mat}: images {shape_i} / depths {shape_d} do not match (N, 3, W, H) / (N, W, H)"
        )
    if labels and (shape_l is None or tuple(shape_l) != tuple(shape_d)):
        found = "has no `labels` dataset" if shape_l is None else f"has labels {shape_l}, depths {shape_d}"
        raise TargetError(
            f"target {target!r}: {mat} {found}; nyud_seg needs the per-pixel class ids as (N, W, H), i.e. "
            f"{NYUD_SEG_LAYOUT}"
        )
    try:
        idx = loadmat(str(splits_file)).get(keys[split])
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:
        raise TargetError(f"target {target!r}: cannot read split file {splits_file} ({exc})") from exc
    if idx is None:
        raise TargetError(f"target {target!r}: {splits_file} lacks {keys[split]}; expected layout: {layout}")
    idx = np.asarray(idx, np.float64).ravel()
    if idx.size == 0:
        raise EmptySplitError(f"target {target!r}: {splits_file}: {keys[split]} is empty")
    n = int(shape_i[0])
    if not np.all(idx == np.round(idx)) or idx.min() < 1 or idx.max() > n:
        raise TargetError(
            f"target {target!r}: {splits_file}: {keys[split]} must hold 1-based indices in 1..{n} "
            f"(the number of images in {mat.name})"
        )
    return mat, [int(k) for k in idx]


# ------------------------------------------------------------------------------------ NYU Depth v2 segmentation


def _mat_field(path: Path, target: str, names: tuple[str, ...]) -> dict[str, Any]:
    """The named variables of a MATLAB file, v5 (scipy) or v7.3 (HDF5, cell arrays as their string contents)."""
    import h5py
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    if not h5py.is_hdf5(path):
        try:
            mat = loadmat(str(path), squeeze_me=True, variable_names=list(names))
        except (OSError, ValueError, TypeError, NotImplementedError, MatReadError) as exc:
            raise TargetError(f"target {target!r}: class map {path} is not a readable MATLAB file ({exc}); "
                              f"expected {NYUD_CLASS_MAP_LAYOUT}") from exc  # fmt: skip
        return {k: mat[k] for k in names if k in mat}
    out: dict[str, Any] = {}
    try:
        with h5py.File(path, "r") as f:
            for k in names:
                if k not in f:
                    continue
                arr = np.asarray(f[k])
                if arr.dtype == object:  # cell of strings: references to uint16 character arrays
                    arr = np.array(["".join(map(chr, np.asarray(f[r]).ravel())) for r in arr.ravel()], dtype=object)
                out[k] = arr.squeeze()
    except OSError as exc:
        raise TargetError(f"target {target!r}: class map {path} is not a readable MATLAB file ({exc}); "
                          f"expected {NYUD_CLASS_MAP_LAYOUT}") from exc  # fmt: skip
    return out


@cache
def _class_map(path: str, mtime_ns: int, target: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """(lut, class names) of a classMapping40.mat: ``lut[label]`` is the 0-based class (255 = ignore) of an
    894-class label (0 = unlabeled -> 255); cached per file version."""
    mat = _mat_field(Path(path), target, ("mapClass", "className"))
    bad = f"target {target!r}: class map {path}"
    if "mapClass" not in mat:
        raise TargetError(f"{bad} has no `mapClass` variable; expected {NYUD_CLASS_MAP_LAYOUT}")
    raw = np.asarray(mat["mapClass"])
    if raw.dtype == object or raw.ndim > 1 or raw.size == 0 or not np.issubdtype(raw.dtype, np.number):
        raise TargetError(f"{bad}: `mapClass` must be a numeric 1 x N vector (N = 894 labels), got shape "
                          f"{raw.shape} of {raw.dtype}; expected {NYUD_CLASS_MAP_LAYOUT}")  # fmt: skip
    values = raw.astype(np.float64).ravel()
    names = NYUD40_CLASSES
    if "className" in mat:
        cells = np.atleast_1d(np.asarray(mat["className"], dtype=object)).ravel()
        names = tuple(str(c) for c in cells)
        if not names or not all(isinstance(c, str) and c for c in cells):
            raise TargetError(f"{bad}: `className` must be a 1 x 40 cell of class names; expected "
                              f"{NYUD_CLASS_MAP_LAYOUT}")  # fmt: skip
    if not np.all(values == np.round(values)) or values.min() < 0 or values.max() > len(names):
        raise TargetError(f"{bad}: `mapClass` must hold integer classes in 0..{len(names)} (0 = ignore), got "
                          f"{values.min():g}..{values.max():g}; expected {NYUD_CLASS_MAP_LAYOUT}")  # fmt: skip
    lut = np.full(values.size + 1, 255, np.uint8)  # index 0: unlabeled
    mapped = values.astype(np.int64)
    lut[1:] = np.where(mapped > 0, mapped - 1, 255)
    return lut, names


@dataclass
class NyudSegSplit(DepthSplit):
    """NYUD-v2 semantic segmentation: the labeled set's images and ``labels`` mapped through ``class_map``
    (classMapping40.mat). ``load_mask(i)`` is (H, W) uint8 in 0..39, 255 = ignore (unlabeled pixels and labels
    the map sends to 0), the interface of ``SegmentationSplit`` that ``SegmentationTask`` trains on."""

    class_map: str = ""
    classes: list[str] = field(default_factory=list)
    lut: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8), repr=False, compare=False)
    ignore_index: int = 255

    @property
    def fingerprint(self) -> str:
        mapping = hashlib.sha256(self.lut.tobytes()).hexdigest()[:16]  # another mapping is another target
        return _fingerprint([str(Path(self.path).resolve()), mapping, *self.ids])

    def load_mask(self, i: int) -> np.ndarray:
        labels = self.load_labels(i)
        top = int(labels.max()) if labels.size else 0
        if top >= len(self.lut):
            raise TargetError(
                f"target {self.target!r}: {self.path} image {self.ids[i]} has label {top}, but class map "
                f"{self.class_map} maps labels 1..{len(self.lut) - 1} only; use the classMapping40.mat of this release"
            )
        return self.lut[labels]


def read_nyud_seg(target: str, root: str | Path, split: str, class_map: str | Path | None) -> NyudSegSplit:
    """NYUD-v2 40-class semantic segmentation (Gupta et al.'s classes) on the labeled set's standard split (795
    train / 654 test from ``splits.mat``): the same files as ``read_nyud_depth`` plus the user's mapping file
    ``class_map`` (classMapping40.mat; nothing is downloaded)."""
    if not class_map:
        raise TargetError(
            f"target {target!r}: format nyud_seg needs `class_map`, the path of Gupta et al.'s classMapping40.mat "
            f"(894 NYUD labels -> 40 classes); expected {NYUD_SEG_LAYOUT}"
        )
    path = _require(Path(class_map), target, "class map (`class_map`)", f"expected {NYUD_CLASS_MAP_LAYOUT}")
    lut, names = _class_map(str(path.resolve()), path.stat().st_mtime_ns, target)
    mat, one_based = _nyud_rows(target, root, split, labels=True)
    return NyudSegSplit(
        target, split, [f"nyud/{k:05d}" for k in one_based], [k - 1 for k in one_based], str(mat),
        source=str(root), class_map=str(path), classes=list(names), lut=lut,
    )  # fmt: skip
