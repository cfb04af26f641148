"""Transfer target datasets, read from their real on-disk layouts (see the interface contracts).

Every reader returns a split object that lists its items without loading pixels, so features can be cached
per split and a split's fingerprint (its item ids) can enter the cache key. Missing roots, split files or
files a list points to stop with an error naming the target key and the path; an empty split is an error
too, because it would otherwise surface later as a NaN metric.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from analysis.target_settings import TargetError

if TYPE_CHECKING:
    from analysis.dense_targets import DepthSplit, DetectionSplit

VOC_CLASSES: list[str] = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
VOC_SEG_CLASSES: list[str] = ["background", *VOC_CLASSES]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class TargetNotFoundError(TargetError, FileNotFoundError):
    """A target root, split list or listed file does not exist."""


class EmptySplitError(TargetError):
    """A split has no item; scoring it would give a NaN metric."""


def _require(path: Path, target: str, what: str, fix: str = "") -> Path:
    if not path.exists():
        hint = f"; {fix}" if fix else ""
        raise TargetNotFoundError(f"target {target!r}: {what} {path} does not exist{hint}")
    return path


def _fingerprint(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def load_rgb(path: str | Path, target: str = "?") -> Image.Image:
    """Open an image as RGB, naming the target and the file when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError) as exc:
        raise TargetError(
            f"target {target!r}: cannot read image {path} ({exc}); replace or remove the file"
        ) from exc


def load_label_png(path: str | Path, target: str = "?") -> np.ndarray:
    """Palette PNG -> (H, W) uint8 array of palette indices (class / instance ids, 255 = void)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise TargetError(
                    f"target {target!r}: label {path} has mode {im.mode}; expected a palette (P) or grey (L) PNG"
                )
            return np.array(im, dtype=np.uint8)
    except (OSError, SyntaxError) as exc:
        raise TargetError(f"target {target!r}: cannot read label map {path} ({exc})") from exc


@dataclass
class ImageSplit:
    """Images of one split with image-level labels.

    ``labels`` is (N,) int64 for single-label targets and (N, C) int8 in {0, 1} for multi-label ones
    (``raw_labels`` then keeps VOC's 1 / 0 (difficult) / -1). ``load(i)`` returns image i as a PIL RGB image.
    """

    target: str
    split: str
    ids: list[str]
    labels: np.ndarray
    classes: list[str]
    load: Callable[[int], Image.Image]
    multilabel: bool = False
    raw_labels: np.ndarray | None = None
    source: str = ""  # dataset root: readable cache-file names (the key uses the item fingerprint)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.ids)


@dataclass
class SegmentationSplit:
    """Images and their semantic label maps (palette PNGs, ``ignore_index`` = void)."""

    target: str
    split: str
    images: list[str]
    masks: list[str]
    classes: list[str]
    ignore_index: int = 255
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)

    @property
    def ids(self) -> list[str]:
        return self.images

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.images)

    def load(self, i: int) -> Image.Image:
        return load_rgb(self.images[i], self.target)

    def load_mask(self, i: int) -> np.ndarray:
        return load_label_png(self.masks[i], self.target)


@dataclass
class Video:
    name: str
    frames: list[str]
    annotations: list[str | None] = field(default_factory=list)


@dataclass
class VideoSplit:
    """DAVIS-style videos: frames plus per-frame instance annotations (0 background, 1..n objects)."""

    target: str
    split: str
    videos: list[Video]

    def __len__(self) -> int:
        return len(self.videos)


def frames_split(video_split: VideoSplit, video: Video) -> ImageSplit:
    """The frames of one video as an ImageSplit, so the feature cache can store one file per video."""
    return ImageSplit(
        target=video_split.target,
        split=f"{video_split.split}/{video.name}",
        ids=list(video.frames),
        labels=np.zeros(len(video.frames), dtype=np.int64),
        classes=[],
        load=lambda i, f=video.frames, t=video_split.target: load_rgb(f[i], t),
        source=str(Path(video.frames[0]).parents[2]),
    )


# ----------------------------------------------------------------------------------------------- readers


def read_imagefolder(target: str, root: str | Path, split: str) -> ImageSplit:
    """``<root>/<split>/<class>/<file>``; classes are the sorted folder names of the *train* split when it
    exists, so train and val share one class index even if val misses a class."""
    from torchvision.datasets.folder import has_file_allowed_extension

    root = Path(root)
    _require(root, target, "root", "set `root` of the target in the config")
    split_dir = _require(root / split, target, "split folder", f"expected {root}/{split}/<class>/<image>")
    class_src = root / "train" if (root / "train").is_dir() else split_dir
    classes = sorted(d.name for d in class_src.iterdir() if d.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if d.name not in index:
            raise TargetError(f"target {target!r}: class folder {d} is not among the train classes {classes}")
        for f in sorted(d.rglob("*")):
            if f.is_file() and has_file_allowed_extension(f.name, IMAGE_EXTENSIONS):
                paths.append(str(f))
                labels.append(index[d.name])
    if not paths:
        raise EmptySplitError(f"target {target!r}: split folder {split_dir} holds no image")
    return ImageSplit(
        target, split, paths, np.asarray(labels, np.int64), classes, lambda i: load_rgb(paths[i], target),
        source=str(root),
    )  # fmt: skip


def _voc_dir(target: str, root: str | Path) -> Path:
    root = Path(root)
    _require(root, target, "root", "point `root` at the folder that contains VOC2007/")
    if (root / "VOC2007").is_dir():
        return root / "VOC2007"
    if (root / "JPEGImages").is_dir():  # root is the VOC2007 folder itself
        return root
    raise TargetNotFoundError(f"target {target!r}: {root}/VOC2007 does not exist; point `root` at its parent")


def _read_list(path: Path, target: str) -> list[str]:
    _require(path, target, "image list")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def read_voc07(target: str, root: str | Path, split: str, classes: list[str] | None = None) -> ImageSplit:
    """VOC07 multi-label classification from ``ImageSets/Main/<cls>_<split>.txt`` (1 / 0 difficult / -1).

    Difficult (0) counts as negative (REFERENCE.md, public SVM code); the raw values stay in ``raw_labels``.
    """
    voc = _voc_dir(target, root)
    classes = list(classes or VOC_CLASSES)
    main = voc / "ImageSets" / "Main"
    ids: list[str] | None = None
    split_list = main / f"{split}.txt"
    if split_list.exists():
        ids = _read_list(split_list, target)
    columns: list[dict[str, int]] = []
    for cls in classes:
        f = _require(main / f"{cls}_{split}.txt", target, f"class list of {cls!r}")
        entries: dict[str, int] = {}
        for n, line in enumerate(f.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("1", "0", "-1"):
                raise TargetError(f"target {target!r}: {f}:{n}: expected '<image id> 1|0|-1', got {line!r}")
            entries[parts[0]] = int(parts[1])
        columns.append(entries)
        if ids is None:
            ids = list(entries)
    assert ids is not None
    if not ids:
        raise EmptySplitError(f"target {target!r}: VOC07 split {split!r} under {main} lists no image")
    raw = np.zeros((len(ids), len(classes)), dtype=np.int8)
    for c, entries in enumerate(columns):
        missing = [i for i in ids if i not in entries]
        if missing:
            raise TargetError(
                f"target {target!r}: {main}/{classes[c]}_{split}.txt lacks {len(missing)} image(s) of the split, "
                f"e.g. {missing[0]}"
            )
        raw[:, c] = [entries[i] for i in ids]
    paths = [str(voc / "JPEGImages" / f"{i}.jpg") for i in ids]
    _require(Path(paths[0]), target, "image")
    return ImageSplit(
        target, split, paths, (raw == 1).astype(np.int8), classes,
        lambda i: load_rgb(paths[i], target), multilabel=True, raw_labels=raw, source=str(voc),
    )  # fmt: skip


def read_voc_seg(target: str, root: str | Path, split: str) -> SegmentationSplit:
    """VOC semantic segmentation: ``ImageSets/Segmentation/<split>.txt`` + ``SegmentationClass/<id>.png``."""
    voc = _voc_dir(target, root)
    ids = _read_list(voc / "ImageSets" / "Segmentation" / f"{split}.txt", target)
    if not ids:
        raise EmptySplitError(f"target {target!r}: {voc}/ImageSets/Segmentation/{split}.txt lists no image")
    images = [str(voc / "JPEGImages" / f"{i}.jpg") for i in ids]
    masks = [str(voc / "SegmentationClass" / f"{i}.png") for i in ids]
    for p in (images[0], masks[0]):
        _require(Path(p), target, "file")
    return SegmentationSplit(target, split, images, masks, list(VOC_SEG_CLASSES), source=str(voc))


def read_davis(target: str, root: str | Path, split: str, resolution: str = "480p") -> VideoSplit:
    """DAVIS-2017: ``ImageSets/2017/<split>.txt`` names videos; frames ``JPEGImages/480p/<video>/*.jpg`` and
    annotations ``Annotations/480p/<video>/*.png`` matched by file stem. Annotations are palette indices
    (0 background, 1..n objects, 255 void) or DAVIS-2016-style grey 0/255 masks (one object); the reader
    keeps the raw values, ``protocols.davis_instances`` says how a video's values are read."""
    root = Path(root)
    _require(root, target, "root", "point `root` at the DAVIS folder (with JPEGImages/, Annotations/)")
    names = _read_list(root / "ImageSets" / "2017" / f"{split}.txt", target)
    if not names:
        raise EmptySplitError(f"target {target!r}: {root}/ImageSets/2017/{split}.txt lists no video")
    videos = []
    for name in names:
        fdir = _require(root / "JPEGImages" / resolution / name, target, "frame folder")
        adir = _require(root / "Annotations" / resolution / name, target, "annotation folder")
        frames = sorted(str(p) for p in fdir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not frames:
            raise EmptySplitError(f"target {target!r}: video folder {fdir} holds no frame")
        annots: list[str | None] = []
        for f in frames:
            a = adir / (Path(f).stem + ".png")
            annots.append(str(a) if a.exists() else None)
        if annots[0] is None:
            raise TargetNotFoundError(
                f"target {target!r}: first-frame annotation {adir / (Path(frames[0]).stem + '.png')} is missing; "
                "propagation starts from it"
            )
        videos.append(Video(name, frames, annots))
    return VideoSplit(target, split, videos)


# ----------------------------------------------------------------------------------- torchvision wrappers

# format -> (torchvision class name, default {train, test} split arguments)
TORCHVISION_TARGETS: dict[str, tuple[str, dict[str, Any]]] = {
    "cifar10": ("CIFAR10", {"train": True, "test": False}),
    "food101": ("Food101", {"train": "train", "test": "test"}),
    "pets": ("OxfordIIITPet", {"train": "trainval", "test": "test"}),
    "cars": ("StanfordCars", {"train": "train", "test": "test"}),
    "places365": ("Places365", {"train": "train-standard", "test": "val"}),
    "sun397": ("SUN397", {"train": None, "test": None}),
}


# format -> folder layout torchvision reads under the target's root (from torchvision's own source), shown when
# a split is missing: torchvision's message says "use download=True", which this project disables.
TORCHVISION_LAYOUTS: dict[str, str] = {
    "cifar10": (
        "<root>/cifar-10-batches-py/ with data_batch_1..data_batch_5 (train), test_batch (test) and "
        "batches.meta, i.e. cifar-10-python.tar.gz extracted into <root>"
    ),
    "food101": (
        "<root>/food-101/images/<class>/<id>.jpg and <root>/food-101/meta/ with train.json, test.json and "
        "classes.txt, i.e. food-101.tar.gz extracted into <root>"
    ),
    "pets": (
        "<root>/oxford-iiit-pet/images/<Breed>_<n>.jpg and <root>/oxford-iiit-pet/annotations/ with "
        "trainval.txt and test.txt, i.e. images.tar.gz and annotations.tar.gz extracted into "
        "<root>/oxford-iiit-pet"
    ),
    "cars": (
        "<root>/stanford_cars/devkit/ with cars_meta.mat and cars_train_annos.mat, <root>/stanford_cars/cars_train/"
        " (train), <root>/stanford_cars/cars_test/ and <root>/stanford_cars/cars_test_annos_withlabels.mat (test)"
    ),
    "places365": (
        "<root>/categories_places365.txt, the file lists <root>/places365_train_standard.txt (train) and "
        "<root>/places365_val.txt (val), and the small (256x256) images in <root>/data_256_standard/ (train) "
        "and <root>/val_256/ (val), i.e. filelist_places365-standard.tar, train_256_places365standard.tar and "
        "val_256.tar extracted into <root>"
    ),
    "sun397": "<root>/SUN397/ClassName.txt and <root>/SUN397/<letter>/<class>/sun_*.jpg (SUN397.tar.gz extracted)",
}


def _tv_split_words(fmt: str, role: str, arg: Any) -> str:
    """The split torchvision is asked for, in words (CIFAR10 takes train=True/False, SUN397 no split at all)."""
    if fmt == "cifar10":
        return "training split (data_batch_1..5)" if arg else "test split (test_batch)"
    if fmt == "sun397":
        return (
            f"{role} split (SUN397 has no official split: a seeded fraction of all images is the test split)"
        )
    return f"split {arg!r}" + (f" (the {role!r} role)" if role != arg else "")


def _tv_message(exc: BaseException) -> str:
    """torchvision's error without its advice to download (this project passes download=False)."""
    text = " ".join(part for part in str(exc).split(". ") if "download" not in part).strip().rstrip(".")
    return f" (torchvision: {text})" if text else ""


def _tv_labels(ds: Any) -> list[int]:
    """Labels without decoding images, from the attribute each torchvision class keeps them in."""
    for attr in ("targets", "_labels"):
        if hasattr(ds, attr):
            return [int(x) for x in getattr(ds, attr)]
    if hasattr(ds, "_samples"):
        return [int(s[1]) for s in ds._samples]
    return [int(ds[i][1]) for i in range(len(ds))]


def read_torchvision(
    target: str, fmt: str, root: str | Path, split: str, *, seed: int = 0, test_fraction: float = 0.2
) -> ImageSplit:
    """Thin wrapper over a torchvision dataset with ``download=False``.

    ``split`` is the protocol role ("train" / "test") or the dataset's own split name. SUN397 has no official
    split in torchvision: a seeded ``test_fraction`` of it is the test split (the paper's 10 partitions are not
    shipped with torchvision).
    """
    import torchvision.datasets as tvd

    if fmt not in TORCHVISION_TARGETS:
        raise TargetError(
            f"target {target!r}: unknown torchvision format {fmt!r}; choose {sorted(TORCHVISION_TARGETS)}"
        )
    cls_name, roles = TORCHVISION_TARGETS[fmt]
    root = Path(root)
    layout = TORCHVISION_LAYOUTS[fmt]
    _require(root, target, "root", f"expected layout: {layout} (downloads are disabled)")
    arg = roles.get(split, split)
    what = f"{cls_name} {_tv_split_words(fmt, split, arg)}"
    kwargs: dict[str, Any] = {"root": str(root), "download": False}
    if fmt == "cifar10":
        kwargs["train"] = bool(arg)
    elif fmt == "places365":
        kwargs.update(split=arg, small=True)
    elif fmt != "sun397":
        kwargs["split"] = arg
    try:
        ds = getattr(tvd, cls_name)(**kwargs)
        if fmt == "places365" and not Path(ds.images_dir).is_dir():  # torchvision opens images lazily
            raise FileNotFoundError(f"image folder {ds.images_dir} does not exist")
    except (RuntimeError, FileNotFoundError, OSError, ValueError) as exc:
        raise TargetNotFoundError(
            f"target {target!r}: {what} not found under {root}{_tv_message(exc)}; expected layout: {layout} "
            "(this project does not download: place the files there, or point the target's root at them)"
        ) from exc
    labels = np.asarray(_tv_labels(ds), np.int64)
    index = np.arange(len(ds))
    if fmt == "sun397":
        perm = np.random.default_rng(seed).permutation(len(ds))
        n_test = int(round(test_fraction * len(ds)))
        index = np.sort(perm[:n_test] if split == "test" else perm[n_test:])
    if len(index) == 0:
        raise EmptySplitError(f"target {target!r}: {what} under {root} is empty (expected layout: {layout})")
    classes = [str(c) for c in getattr(ds, "classes", range(int(labels.max()) + 1))]

    def load(i: int) -> Image.Image:
        img = ds[int(index[i])][0]
        return (
            img.convert("RGB")
            if isinstance(img, Image.Image)
            else Image.fromarray(np.asarray(img)).convert("RGB")
        )

    ids = [f"{root.resolve()}/{cls_name}/{arg}/{int(j)}" for j in index]
    return ImageSplit(target, str(split), ids, labels[index], classes, load, source=str(root))


# ----------------------------------------------------------------------------------------------- dispatch

DEFAULT_SPLITS: dict[str, dict[str, str]] = {
    "imagefolder": {"train": "train", "test": "val"},
    "voc07": {"train": "trainval", "test": "test"},
    "voc_seg": {"train": "train", "test": "val"},
    "davis": {"test": "val"},
    # dense fine-tuning targets (analysis.dense_targets); voc_det: MoCo's 07+12 -> 07 test protocol
    "voc_det": {"train": "2007_trainval+2012_trainval", "test": "2007_test"},
    "cityscapes": {"train": "train", "test": "val"},
    "nyud_depth": {"train": "train", "test": "test"},
    "nyud_seg": {"train": "train", "test": "test"},  # 795 / 654 from splits.mat, as nyud_depth
    **{k: {"train": "train", "test": "test"} for k in TORCHVISION_TARGETS},
}


def split_name(cfg: Mapping[str, Any], role: str) -> str:
    """Split name for a protocol role ("train" / "test"): ``cfg["splits"][role]`` or the format's default."""
    fmt = cfg.get("format")
    if fmt not in DEFAULT_SPLITS:
        raise TargetError(f"unknown target format {fmt!r}; choose one of {sorted(DEFAULT_SPLITS)}")
    splits = {**DEFAULT_SPLITS[fmt], **dict(cfg.get("splits") or {})}
    if role not in splits:
        raise TargetError(
            f"target format {fmt!r} has no {role!r} split; set splits.{role} in the target config"
        )
    return splits[role]


def load_split(
    target: str, cfg: Mapping[str, Any], role: str
) -> ImageSplit | SegmentationSplit | VideoSplit | DetectionSplit | DepthSplit:
    """Read the split that plays ``role`` for target ``target`` described by its config mapping.

    voc_seg reads ``year`` (default 2007) and ``sbd_root`` (train_aug without SegmentationClassAug); voc_det
    reads ``year`` (of split parts written without one); nyud_seg reads ``class_map`` (classMapping40.mat); see
    ``analysis.dense_targets``."""
    fmt = cfg.get("format")
    if "root" not in cfg:
        raise TargetError(f"target {target!r}: config lacks `root`")
    root = cfg["root"]
    split = split_name(cfg, role)
    if fmt == "imagefolder":
        return read_imagefolder(target, root, split)
    if fmt == "voc07":
        return read_voc07(target, root, split, cfg.get("classes"))
    if fmt in ("voc_seg", "cityscapes", "voc_det", "nyud_depth", "nyud_seg"):
        from analysis import dense_targets as dense  # imported here: it imports this module

        if fmt == "voc_seg":
            return dense.read_voc_seg(target, root, split, year=cfg.get("year", 2007), sbd_root=cfg.get("sbd_root"))
        if fmt == "voc_det":
            return dense.read_voc_det(target, root, split, year=cfg.get("year", 2007))
        if fmt == "cityscapes":
            return dense.read_cityscapes(target, root, split)
        if fmt == "nyud_seg":
            return dense.read_nyud_seg(target, root, split, cfg.get("class_map"))
        return dense.read_nyud_depth(target, root, split)
    if fmt == "davis":
        return read_davis(target, root, split, cfg.get("resolution", "480p"))
    return read_torchvision(
        target,
        fmt,
        root,
        split,
        seed=int(cfg.get("split_seed", 0)),
        test_fraction=float(cfg.get("test_fraction", 0.2)),
    )
