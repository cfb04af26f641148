"""The embedded default dataset: a procedurally rendered "world" written in the real on-disk formats.

With no dataset on disk the whole study (readers, DAG, trainer, transfer protocols) still runs end to end on
a 2-core CPU in minutes, because this module writes small stand-ins for ImageNet, COCO, OpenImages and
BDD100K (pretraining sources) and for an ImageFolder classification set, VOC2007, DAVIS-2017 and NYU Depth v2
(transfer targets) in exactly the layouts the real readers parse. Object-centric vs scene-centric vs domain-specific
is preserved: one large object per ImageNet image, several (COCO) or many (OpenImages) smaller ones per scene,
and monotonous street scenes for BDD100K.

Every image is rendered from a generator seeded by (world seed, dataset, split, index), so a dataset can be
regenerated on its own and the same spec always yields byte-identical files. Each dataset is written into a
temporary folder and renamed into place; ``world.json`` is written last, so a killed run never leaves a world
that looks finished.

CLI: ``python -m data_prep.synthetic --out DIR [--spec-json JSON | --spec FILE.yaml] [--only coco,voc]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep.render import (
    CATALOGUE,
    STREET_ATTRIBUTES,
    STREET_CATEGORIES,
    Rendered,
    mask_to_polygons,
    render_centric,
    render_depth_scene,
    render_scene,
    render_street,
    render_video,
)

log = logging.getLogger(__name__)

WORLD_VERSION = "1"
COLOUR_MODES: tuple[str, ...] = ("class", "random", "grey")
MANIFEST = "world.json"
DATASETS: tuple[str, ...] = ("imagenet", "coco", "openimages", "bdd100k", "cls", "voc", "davis", "nyud")
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # VOC class i is drawn as CATALOGUE[i]


class SpecError(ValueError):
    """A world spec value is missing, mistyped or out of range (the message names the key)."""


# ----------------------------------------------------------------------------------------------- spec


@dataclass
class CentricSpec:
    """Object-centric set (imagenet, cls): ``splits`` maps split name -> images *per class*."""

    splits: dict[str, int]
    n_classes: int = 10
    width: int = 64
    height: int = 64
    scale: tuple[float, float] = (0.55, 0.85)  # object diameter / min(width, height)
    jitter: float = 0.08  # max centre offset as a fraction of the image size


@dataclass
class SceneSpec:
    """Scene set (coco, openimages): ``splits`` maps split name -> number of images."""

    splits: dict[str, int]
    n_classes: int = 10
    width: int = 96
    height: int = 72
    objects: tuple[int, int] = (2, 8)  # objects attempted per image, inclusive range
    scale: tuple[float, float] = (0.15, 0.45)
    class_zipf: float = 0.8  # class frequency ~ 1 / (rank + 1) ** class_zipf (scene datasets are imbalanced)
    min_visible: float = 0.5  # fraction of an object that must stay visible when later objects occlude it


@dataclass
class BddSpec:
    """Street scenes; ``splits`` maps split name -> images; attribute tables map value -> probability."""

    splits: dict[str, int] = field(default_factory=lambda: {"train": 300})
    width: int = 112
    height: int = 64
    objects: tuple[int, int] = (3, 10)
    min_visible: float = 0.25
    weather: dict[str, float] = field(default_factory=lambda: {
        "clear": 0.5, "overcast": 0.15, "partly cloudy": 0.1, "rainy": 0.1, "snowy": 0.1, "foggy": 0.05})
    scene: dict[str, float] = field(default_factory=lambda: {"city street": 0.6, "highway": 0.25, "residential": 0.15})
    timeofday: dict[str, float] = field(default_factory=lambda: {"daytime": 0.55, "night": 0.35, "dawn/dusk": 0.1})
    categories: dict[str, float] = field(default_factory=lambda: {
        "car": 0.45, "truck": 0.1, "bus": 0.05, "pedestrian": 0.15, "traffic light": 0.1, "traffic sign": 0.15})


@dataclass
class VocSpec:
    """VOC2007 layout; ``splits``: trainval / test image counts (trainval is halved into train and val)."""

    splits: dict[str, int] = field(default_factory=lambda: {"trainval": 120, "test": 120})
    width: int = 96
    height: int = 72
    objects: tuple[int, int] = (1, 5)
    scale: tuple[float, float] = (0.12, 0.6)
    class_zipf: float = 0.0
    min_visible: float = 0.5
    difficult_min_side: int = 10  # objects whose box is thinner than this are marked difficult


@dataclass
class DavisSpec:
    """DAVIS-2017 layout; ``splits`` maps split name -> number of videos."""

    splits: dict[str, int] = field(default_factory=lambda: {"train": 2, "val": 2})
    n_frames: int = 12
    n_classes: int = 10
    width: int = 96
    height: int = 64
    objects: tuple[int, int] = (1, 3)
    scale: tuple[float, float] = (0.3, 0.5)
    speed: tuple[float, float] = (1.0, 3.0)  # pixels per frame
    min_visible: float = 0.5


@dataclass
class NyudSpec:
    """NYU Depth v2 labeled-set layout (``nyu_depth_v2_labeled.mat`` + ``splits.mat``); ``splits``: train / test
    image counts. Depth follows ``render.render_depth_scene``: a room ``depth_range`` = (near, far) metres from the
    bottom to the top rows, and objects at class size / apparent size, class ``k`` having the physical size
    ``class_size[0] + k * (class_size[1] - class_size[0]) / (n_classes - 1)`` metres."""

    splits: dict[str, int] = field(default_factory=lambda: {"train": 120, "test": 60})
    width: int = 64
    height: int = 48
    n_classes: int = 10
    objects: tuple[int, int] = (2, 5)
    scale: tuple[float, float] = (0.12, 0.45)  # object diameter / min(width, height)
    min_visible: float = 0.5
    depth_range: tuple[float, float] = (2.0, 6.0)  # room depth (metres) at the bottom / top edge
    class_size: tuple[float, float] = (0.15, 0.45)  # physical sizes (metres) of the first / last class


_SPEC_TYPES: dict[str, type] = {
    "imagenet": CentricSpec, "coco": SceneSpec, "openimages": SceneSpec, "bdd100k": BddSpec, "cls": CentricSpec,
    "voc": VocSpec, "davis": DavisSpec, "nyud": NyudSpec,
}


@dataclass
class WorldSpec:
    """Every size and count of the world. Defaults are small: ~15 ResNet-18 runs on 2 cores in minutes."""

    seed: int = 0
    jpeg_quality: int = 90
    # "class": each catalogue class has its own colours (colour alone identifies it); "random": colours are
    # drawn per instance, so a class is its shape + texture, and colour-jitter invariance is not penalised;
    # "grey": "random", then stored as luminance, so colour is no instance cue either (README: why the
    # embedded study uses it).
    colours: str = "class"
    # 0: every image draws its own background; N: one of N shared backgrounds, so a background is no instance cue
    backgrounds: int = 0
    imagenet: CentricSpec = field(default_factory=lambda: CentricSpec(splits={"train": 80}))
    coco: SceneSpec = field(default_factory=lambda: SceneSpec(splits={"train2017": 400}))
    openimages: SceneSpec = field(default_factory=lambda: SceneSpec(
        splits={"train": 400}, n_classes=20, objects=(4, 14), scale=(0.12, 0.35)))
    bdd100k: BddSpec = field(default_factory=BddSpec)
    cls: CentricSpec = field(default_factory=lambda: CentricSpec(splits={"train": 40, "val": 20}))
    voc: VocSpec = field(default_factory=VocSpec)
    davis: DavisSpec = field(default_factory=DavisSpec)
    nyud: NyudSpec = field(default_factory=NyudSpec)

    @property
    def object_colours(self) -> str:
        """The renderer's colour mode: grey worlds draw random colours, then drop the chroma when saved."""
        return "random" if self.colours == "grey" else self.colours

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, base: WorldSpec | None = None) -> WorldSpec:
        """Overlay a (partial, nested) dict onto ``base`` (defaults); unknown keys and bad values raise."""
        spec = base.to_dict() if base is not None else cls().to_dict()
        if data:
            if not isinstance(data, dict):
                raise SpecError(f"world spec must be a mapping, got {type(data).__name__}")
            for key, value in data.items():
                if key not in spec:
                    raise SpecError(f"unknown world spec key {key!r}; valid keys: {', '.join(spec)}")
                if isinstance(spec[key], dict):
                    if not isinstance(value, dict):
                        raise SpecError(f"world spec key {key!r} must be a mapping, got {value!r}")
                    for sub, sub_value in value.items():
                        if sub not in spec[key]:
                            raise SpecError(f"unknown world spec key {key}.{sub}; valid: {', '.join(spec[key])}")
                        spec[key][sub] = sub_value  # splits / attribute tables are replaced, not merged
                else:
                    spec[key] = value
        out = cls(seed=_int(spec["seed"], "seed", 0), jpeg_quality=_int(spec["jpeg_quality"], "jpeg_quality", 1),
                  colours=spec["colours"], backgrounds=_int(spec["backgrounds"], "backgrounds", 0))
        if out.jpeg_quality > 100:
            raise SpecError("world spec key jpeg_quality must be in 1..100")
        if out.colours not in COLOUR_MODES:
            raise SpecError(f"world spec key colours must be one of {', '.join(COLOUR_MODES)}, got {out.colours!r}")
        for name, typ in _SPEC_TYPES.items():
            setattr(out, name, _build(typ, spec[name], name))
        return out


def _int(v: Any, key: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise SpecError(f"world spec key {key} must be an integer >= {lo}, got {v!r}")
    return v


def _num(v: Any, key: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise SpecError(f"world spec key {key} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _pair(v: Any, key: str, kind: Callable[[Any, str], Any]) -> tuple[Any, Any]:
    if not isinstance(v, list | tuple) or len(v) != 2:
        raise SpecError(f"world spec key {key} must be a [min, max] pair, got {v!r}")
    a, b = kind(v[0], key), kind(v[1], key)
    if a > b:
        raise SpecError(f"world spec key {key}: min {a} > max {b}")
    return a, b


def _build(typ: type, d: dict[str, Any], name: str) -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(typ):
        key, v = f"{name}.{f.name}", d[f.name]
        if f.name == "splits":
            if not isinstance(v, dict) or not v or not all(isinstance(k, str) and k for k in v):
                raise SpecError(f"world spec key {key} must be a non-empty mapping split -> count, got {v!r}")
            kwargs[f.name] = {k: _int(c, f"{key}.{k}", 0) for k, c in v.items()}
        elif f.name in ("weather", "scene", "timeofday", "categories"):
            if not isinstance(v, dict) or not v:
                raise SpecError(f"world spec key {key} must be a non-empty mapping value -> probability")
            kwargs[f.name] = {str(k): _num(p, f"{key}.{k}", 0, 1e9) for k, p in v.items()}
            if sum(kwargs[f.name].values()) <= 0:
                raise SpecError(f"world spec key {key}: probabilities must not all be zero")
            known = STREET_CATEGORIES if f.name == "categories" else STREET_ATTRIBUTES[f.name]
            if set(kwargs[f.name]) - set(known):
                raise SpecError(f"world spec key {key}: unknown value(s) {sorted(set(kwargs[f.name]) - set(known))}; "
                                f"the renderer knows {', '.join(known)}")
        elif f.name == "objects":
            kwargs[f.name] = _pair(v, key, lambda x, k: _int(x, k, 1))
        elif f.name in ("scale", "speed"):
            hi = 1.0 if f.name == "scale" else 1e6
            kwargs[f.name] = _pair(v, key, lambda x, k, hi=hi: _num(x, k, 1e-3, hi))
        elif f.name in ("depth_range", "class_size"):  # metres; objects are never nearer than 1 m
            lo = 1.0 if f.name == "depth_range" else 1e-3
            kwargs[f.name] = _pair(v, key, lambda x, k, lo=lo: _num(x, k, lo, 1000.0))
        elif f.name in ("min_visible", "jitter"):
            kwargs[f.name] = _num(v, key, 0.0, 1.0)
        elif f.name == "class_zipf":
            kwargs[f.name] = _num(v, key, 0.0, 10.0)
        else:  # integer sizes and counts
            kwargs[f.name] = _int(v, key, 1)
    if "n_classes" in kwargs and kwargs["n_classes"] > len(CATALOGUE):
        raise SpecError(f"world spec key {name}.n_classes must be <= {len(CATALOGUE)} (catalogue size)")
    if min(kwargs.get("width", 16), kwargs.get("height", 16)) < 16:
        raise SpecError(f"world spec keys {name}.width/height must be >= 16 pixels")
    if name == "voc" and set(kwargs["splits"]) != {"trainval", "test"}:
        raise SpecError("world spec key voc.splits must have exactly the keys 'trainval' and 'test'")
    if name == "nyud" and set(kwargs["splits"]) != {"train", "test"}:
        raise SpecError("world spec key nyud.splits must have exactly the keys 'train' and 'test'")
    if name == "davis" and kwargs["n_frames"] < 2:
        raise SpecError("world spec key davis.n_frames must be >= 2 so that objects move")
    return typ(**kwargs)


def tiny_spec(seed: int = 0) -> WorldSpec:
    """A handful of images per dataset: what test fixtures use (whole world in ~1 s)."""
    return WorldSpec.from_dict({
        "seed": seed,
        "imagenet": {"splits": {"train": 4}, "n_classes": 3},
        "coco": {"splits": {"train2017": 6}, "objects": [2, 4]},
        "openimages": {"splits": {"train": 6}, "objects": [6, 10]},
        "bdd100k": {"splits": {"train": 4}},
        "cls": {"splits": {"train": 3, "val": 2}, "n_classes": 3},
        "voc": {"splits": {"trainval": 6, "test": 4}},
        "davis": {"splits": {"train": 1, "val": 1}, "n_frames": 4},
        "nyud": {"splits": {"train": 4, "test": 2}},
    })


def load_spec(path: str | os.PathLike[str] | None = None, json_text: str | None = None) -> WorldSpec:
    """Spec from a YAML file or a JSON string (partial: keys left out keep their defaults)."""
    if path is not None and json_text is not None:
        raise SpecError("give either a spec file or a JSON spec, not both")
    if path is not None:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"world spec file {p} not found; pass an existing YAML file to --spec")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise SpecError(f"world spec file {p} is not valid YAML: {e}") from e
        return WorldSpec.from_dict(data or {})
    if json_text is not None:
        try:
            data = json.loads(json_text)
        except json.JSONDecodeError as e:
            raise SpecError(f"--spec-json is not valid JSON ({e}); e.g. '{{\"seed\": 1}}'") from e
        return WorldSpec.from_dict(data)
    return WorldSpec()


# ----------------------------------------------------------------------------------------------- helpers


def _key(text: str) -> int:
    return zlib.crc32(text.encode())


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """Independent stream per (world seed, dataset, split, index): datasets are reproducible on their own."""
    return np.random.default_rng([seed, *(k if isinstance(k, int) else _key(k) for k in keys)])


def _hexid(seed: int, *keys: Any, n: int = 16) -> str:
    return hashlib.sha1(":".join(map(str, (seed, *keys))).encode()).hexdigest()[:n]


def _zipf(n: int, alpha: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** alpha
    return p / p.sum()


def _jpeg_bytes(r: Rendered, spec: WorldSpec) -> bytes:
    buf = io.BytesIO()
    img = r.to_pil()
    if spec.colours == "grey":  # luminance only, still a 3-channel JPEG as the real sets store
        img = img.convert("L").convert("RGB")
    img.save(buf, format="JPEG", quality=spec.jpeg_quality)
    return buf.getvalue()


def _save_jpeg(r: Rendered, path: Path, spec: WorldSpec) -> None:
    path.write_bytes(_jpeg_bytes(r, spec))


def _jpeg_pixels(r: Rendered, spec: WorldSpec) -> np.ndarray:
    """(H, W, 3) uint8 colours after the same JPEG round trip as every saved image (for datasets stored in
    arrays, like NYUD's .mat, whose real images were once compressed too)."""
    with Image.open(io.BytesIO(_jpeg_bytes(r, spec))) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _voc_palette() -> list[int]:
    """The PASCAL VOC / DAVIS colour map (bit-interleaved label index)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _save_palette_png(arr: np.ndarray, path: Path) -> None:
    img = Image.fromarray(arr.astype(np.uint8), "P")
    img.putpalette(_voc_palette())
    img.save(path, format="PNG")


def _id_map(objects: list, shape: tuple[int, int], values: list[int]) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    for o, v in zip(objects, values, strict=True):
        out[o.mask] = v
    return out


def _void_boundary(ids: np.ndarray) -> np.ndarray:
    """Mark 255 where a pixel's 4-neighbour has another id (object edges, ~2 px band), as in real VOC."""
    diff = np.zeros(ids.shape, bool)
    dv = ids[1:] != ids[:-1]
    dh = ids[:, 1:] != ids[:, :-1]
    diff[1:] |= dv
    diff[:-1] |= dv
    diff[:, 1:] |= dh
    diff[:, :-1] |= dh
    out = ids.copy()
    out[diff] = 255
    return out


def _progress(total: int, name: str) -> tqdm:
    return tqdm(total=total, desc=f"world/{name}", unit="img", leave=False, disable=None, file=sys.stderr)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- writers


def write_imagenet(root: Path, spec: WorldSpec) -> dict[str, Any]:
    s = spec.imagenet
    wnids = [f"n{k:08d}" for k in range(s.n_classes)]
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {CATALOGUE[k].name}\n" for k, w in enumerate(wnids)))
    rows = ["ImageId,PredictionString"]
    counts: dict[str, int] = {}
    with _progress(sum(s.splits.values()) * s.n_classes, "imagenet") as bar:
        for split, per_class in s.splits.items():
            for k, wnid in enumerate(wnids):
                d = root / split / wnid
                d.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    r = render_centric(_rng(spec.seed, "imagenet", split, k, i), k, s.width, s.height, s.scale,
                                       s.jitter, colours=spec.object_colours,
                                       backgrounds=spec.backgrounds)
                    stem = f"{wnid}_{i}"
                    _save_jpeg(r, d / f"{stem}.JPEG", spec)
                    if split == "train":
                        rows.append(f"{stem}," + " ".join(f"{wnid} {x1} {y1} {x2} {y2}"
                                                          for x1, y1, x2, y2 in (o.box for o in r.objects)))
                    bar.update()
            counts[split] = per_class * s.n_classes
    (root / "LOC_train_solution.csv").write_text("\n".join(rows) + "\n")
    return {"images": counts, "classes": s.n_classes, "objects": sum(counts.values())}


def _scene_images(name: str, s: SceneSpec | VocSpec, spec: WorldSpec, split: str, n: int, n_classes: int,
                  hole_free: bool = False):
    probs = _zipf(n_classes, s.class_zipf)
    for i in range(n):
        rng = _rng(spec.seed, name, split, i)
        n_obj = int(rng.integers(s.objects[0], s.objects[1] + 1))
        yield i, render_scene(rng, s.width, s.height, range(n_classes), n_obj, s.scale, probs=probs,
                              min_visible=s.min_visible, hole_free=hole_free, colours=spec.object_colours,
                              backgrounds=spec.backgrounds)


def write_coco(root: Path, spec: WorldSpec) -> dict[str, Any]:
    s = spec.coco
    cats = [{"id": k + 1, "name": CATALOGUE[k].name, "supercategory": "shape"} for k in range(s.n_classes)]
    (root / "annotations").mkdir(parents=True)
    counts, n_obj, image_id, ann_id = {}, 0, 0, 0
    with _progress(sum(s.splits.values()), "coco") as bar:
        for split, n in s.splits.items():
            (root / split).mkdir()
            images, anns = [], []
            for _, r in _scene_images("coco", s, spec, split, n, s.n_classes, hole_free=True):
                image_id += 1
                file_name = f"{image_id:012d}.jpg"
                _save_jpeg(r, root / split / file_name, spec)
                images.append({"id": image_id, "file_name": file_name, "width": s.width, "height": s.height,
                               "license": 1})
                for o in r.objects:
                    ann_id += 1
                    polys, _ = mask_to_polygons(o.mask)
                    x1, y1, x2, y2 = o.box
                    anns.append({"id": ann_id, "image_id": image_id, "category_id": o.label + 1,
                                 "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                                 "area": float(o.area), "iscrowd": 0,
                                 "segmentation": [[float(v) for v in p.reshape(-1)] for p in polys]})
                bar.update()
            data = {"info": {"description": "synthetic world (data_prep.synthetic)", "version": WORLD_VERSION},
                    "licenses": [{"id": 1, "name": "CC0", "url": ""}],
                    "images": images, "annotations": anns, "categories": cats}
            (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
            counts[split] = len(images)
            n_obj += len(anns)
    return {"images": counts, "classes": s.n_classes, "objects": n_obj}


def _mid(name: str) -> str:
    return "/m/0" + hashlib.sha1(name.encode()).hexdigest()[:5]


def write_openimages(root: Path, spec: WorldSpec) -> dict[str, Any]:
    s = spec.openimages
    mids = [_mid(CATALOGUE[k].name) for k in range(s.n_classes)]
    assert len(set(mids)) == len(mids)
    (root / "oidv7-class-descriptions-boxable.csv").write_text(
        "LabelName,DisplayName\n" + "".join(f"{m},{CATALOGUE[k].name.capitalize()}\n" for k, m in enumerate(mids)))
    rows: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    seen: set[str] = set()
    with _progress(sum(s.splits.values()), "openimages") as bar:
        for split, n in s.splits.items():
            (root / split).mkdir()
            for i, r in _scene_images("openimages", s, spec, split, n, s.n_classes):
                image_id = _hexid(spec.seed, "openimages", split, i)
                if image_id in seen:
                    raise RuntimeError(f"OpenImages id collision {image_id}; change the seed")
                seen.add(image_id)
                _save_jpeg(r, root / split / f"{image_id}.jpg", spec)
                for o in r.objects:
                    x1, y1, x2, y2 = o.box
                    rows.append((image_id, f"{image_id},xclick,{mids[o.label]},1,{x1 / s.width:.6f},"
                                 f"{x2 / s.width:.6f},{y1 / s.height:.6f},{y2 / s.height:.6f},"
                                 f"{int(o.visible_fraction < 0.95)},{int(o.truncated)},0,0,0"))
                bar.update()
            counts[split] = n
    rows.sort(key=lambda t: t[0])  # the real file is sorted by ImageID
    header = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"
    (root / "oidv6-train-annotations-bbox.csv").write_text("\n".join([header, *(r for _, r in rows)]) + "\n")
    return {"images": counts, "classes": s.n_classes, "objects": len(rows)}


def _choice(rng: np.random.Generator, table: dict[str, float]) -> str:
    keys = list(table)
    p = np.array([table[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def write_bdd100k(root: Path, spec: WorldSpec) -> dict[str, Any]:
    s = spec.bdd100k
    (root / "labels" / "det_20").mkdir(parents=True)
    counts, n_obj, label_id = {}, 0, 0
    with _progress(sum(s.splits.values()), "bdd100k") as bar:
        for split, n in s.splits.items():
            d = root / "images" / "100k" / split
            d.mkdir(parents=True)
            frames = []
            for i in range(n):
                rng = _rng(spec.seed, "bdd100k", split, i)
                attrs = {"weather": _choice(rng, s.weather), "scene": _choice(rng, s.scene),
                         "timeofday": _choice(rng, s.timeofday)}
                n_req = int(rng.integers(s.objects[0], s.objects[1] + 1))
                r = render_street(rng, s.width, s.height, n_req, min_visible=s.min_visible,
                                  category_probs=[s.categories.get(c, 0.0) for c in STREET_CATEGORIES], **attrs)
                h = _hexid(spec.seed, "bdd100k", split, i)
                name = f"{h[:8]}-{h[8:16]}.jpg"
                _save_jpeg(r, d / name, spec)
                labels = []
                for o in r.objects:
                    label_id += 1
                    x1, y1, x2, y2 = o.box
                    labels.append({"id": str(label_id), "category": o.name,
                                   "attributes": {"occluded": bool(o.visible_fraction < 0.95),
                                                  "truncated": bool(o.truncated)},
                                   "box2d": {"x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2)}})
                frames.append({"name": name, "attributes": attrs, "timestamp": 10000, "labels": labels})
                n_obj += len(labels)
                bar.update()
            (root / "labels" / "det_20" / f"det_{split}.json").write_text(json.dumps(frames, indent=1))
            counts[split] = n
    return {"images": counts, "classes": len(STREET_CATEGORIES), "objects": n_obj}


def write_cls(root: Path, spec: WorldSpec) -> dict[str, Any]:
    s = spec.cls
    counts = {}
    with _progress(sum(s.splits.values()) * s.n_classes, "cls") as bar:
        for split, per_class in s.splits.items():
            for k in range(s.n_classes):
                name = CATALOGUE[k].name
                d = root / split / name
                d.mkdir(parents=True)
                for i in range(per_class):
                    r = render_centric(_rng(spec.seed, "cls", split, k, i), k, s.width, s.height, s.scale, s.jitter,
                                       colours=spec.object_colours,
                                       backgrounds=spec.backgrounds)
                    _save_jpeg(r, d / f"{name}_{i:05d}.jpg", spec)
                    bar.update()
            counts[split] = per_class * s.n_classes
    return {"images": counts, "classes": s.n_classes, "objects": sum(counts.values())}


def _voc_xml(stem: str, s: VocSpec, r: Rendered, segmented: bool, difficult: list[bool]) -> str:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "VOC2007"
    ET.SubElement(ann, "filename").text = f"{stem}.jpg"
    src = ET.SubElement(ann, "source")
    ET.SubElement(src, "database").text = "The synthetic world"
    size = ET.SubElement(ann, "size")
    for tag, v in (("width", s.width), ("height", s.height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(ann, "segmented").text = str(int(segmented))
    for o, diff in zip(r.objects, difficult, strict=True):
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = VOC_CLASSES[o.label]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(o.truncated))
        ET.SubElement(obj, "difficult").text = str(int(diff))
        bb = ET.SubElement(obj, "bndbox")
        x1, y1, x2, y2 = o.box  # VOC boxes are 1-based and inclusive: xmin = x1 + 1, xmax = x2
        for tag, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bb, tag).text = str(v)
    ET.indent(ann)
    return ET.tostring(ann, encoding="unicode") + "\n"


def write_voc(root: Path, spec: WorldSpec) -> dict[str, Any]:
    s = spec.voc
    base = root / "VOC2007"
    dirs = {k: base / k for k in ("JPEGImages", "Annotations", "ImageSets/Main", "ImageSets/Segmentation",
                                  "SegmentationClass", "SegmentationObject")}
    for d in dirs.values():
        d.mkdir(parents=True)
    n_tv, n_test = s.splits["trainval"], s.splits["test"]
    # Image ids are shuffled across trainval/test like the real release; trainval alternates train/val.
    order = _rng(spec.seed, "voc", "ids").permutation(n_tv + n_test)
    ids = {"trainval": [f"{j + 1:06d}" for j in sorted(order[:n_tv])],
           "test": [f"{j + 1:06d}" for j in sorted(order[n_tv:])]}
    lists: dict[str, list[str]] = {"train": ids["trainval"][0::2], "val": ids["trainval"][1::2], **ids}
    present: dict[str, dict[str, int]] = {}  # image id -> class -> 1 (any non-difficult) / 0 (only difficult)
    n_obj, n_difficult = 0, 0
    with _progress(n_tv + n_test, "voc") as bar:
        for split in ("trainval", "test"):
            for i, r in _scene_images("voc", s, spec, split, len(ids[split]), len(VOC_CLASSES)):
                stem = ids[split][i]
                _save_jpeg(r, dirs["JPEGImages"] / f"{stem}.jpg", spec)
                difficult = [min(o.box[2] - o.box[0], o.box[3] - o.box[1]) < s.difficult_min_side
                             for o in r.objects]
                segmented = split == "trainval"
                (dirs["Annotations"] / f"{stem}.xml").write_text(_voc_xml(stem, s, r, segmented, difficult))
                flags = present.setdefault(stem, {})
                for o, diff in zip(r.objects, difficult, strict=True):
                    name = VOC_CLASSES[o.label]
                    flags[name] = max(flags.get(name, 0), 0 if diff else 1)
                if segmented:
                    shape = (s.height, s.width)
                    cls_map = _id_map(r.objects, shape, [o.label + 1 for o in r.objects])
                    inst_map = _id_map(r.objects, shape, list(range(1, len(r.objects) + 1)))
                    _save_palette_png(_void_boundary(cls_map), dirs["SegmentationClass"] / f"{stem}.png")
                    _save_palette_png(_void_boundary(inst_map), dirs["SegmentationObject"] / f"{stem}.png")
                n_obj += len(r.objects)
                n_difficult += sum(difficult)
                bar.update()
    main = dirs["ImageSets/Main"]
    for split, members in lists.items():
        (main / f"{split}.txt").write_text("".join(f"{m}\n" for m in members))
        for name in VOC_CLASSES:
            lines = []
            for m in members:
                flag = present[m].get(name)
                lines.append(f"{m} {-1 if flag is None else flag:2d}\n")
            (main / f"{name}_{split}.txt").write_text("".join(lines))
    for split in ("train", "val"):
        (dirs["ImageSets/Segmentation"] / f"{split}.txt").write_text("".join(f"{m}\n" for m in lists[split]))
    return {"images": {k: len(v) for k, v in ids.items()}, "classes": len(VOC_CLASSES), "objects": n_obj,
            "difficult": n_difficult}


def write_davis(root: Path, spec: WorldSpec) -> dict[str, Any]:
    s = spec.davis
    (root / "ImageSets" / "2017").mkdir(parents=True)
    counts, n_frames_total = {}, 0
    with _progress(sum(s.splits.values()) * s.n_frames, "davis") as bar:
        for split, n in s.splits.items():
            names = []
            for i in range(n):
                rng = _rng(spec.seed, "davis", split, i)
                n_req = int(rng.integers(s.objects[0], s.objects[1] + 1))
                frames = render_video(rng, s.width, s.height, range(s.n_classes), n_req, s.n_frames, s.scale,
                                      s.speed, min_visible=s.min_visible, colours=spec.object_colours,
                                      backgrounds=spec.backgrounds)
                video = "-".join(dict.fromkeys(o.name for o in frames[0].objects)) + f"-{split}{i:02d}"
                names.append(video)
                jd = root / "JPEGImages" / "480p" / video
                ad = root / "Annotations" / "480p" / video
                jd.mkdir(parents=True)
                ad.mkdir(parents=True)
                for f, fr in enumerate(frames):
                    _save_jpeg(fr, jd / f"{f:05d}.jpg", spec)
                    ids = _id_map(fr.objects, (s.height, s.width), list(range(1, len(fr.objects) + 1)))
                    _save_palette_png(ids, ad / f"{f:05d}.png")
                    bar.update()
                n_frames_total += len(frames)
            (root / "ImageSets" / "2017" / f"{split}.txt").write_text("".join(f"{v}\n" for v in names))
            counts[split] = n
    return {"videos": counts, "frames": n_frames_total, "classes": s.n_classes}


def _matlab_header(version: str) -> bytes:
    """The 128-byte MAT-file header; a fixed "Created on" keeps the world byte-identical across runs."""
    text = f"MATLAB {version} MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 1970"
    if version == "7.3":
        text += " HDF5 schema 1.00 ."
    return text.encode("ascii").ljust(116, b" ") + b"\0" * 8 + b"\0\x02IM"


def _write_mat73(path: Path, arrays: dict[str, tuple[np.ndarray, str]]) -> None:
    """A MATLAB v7.3 file: HDF5 behind a 512-byte user block holding the MAT header, as MATLAB writes it.

    ``arrays`` maps name -> (array already in h5py's (column-major-reversed) order, MATLAB class name). No
    timestamps are stored, so the same arrays give the same bytes.
    """
    import h5py

    with h5py.File(path, "w", userblock_size=512, track_order=False) as f:
        for name, (arr, matlab_class) in arrays.items():
            ds = f.create_dataset(name, data=arr, track_times=False)
            ds.attrs.create("MATLAB_class", np.bytes_(matlab_class))
    with open(path, "r+b") as fh:
        fh.write(_matlab_header("7.3"))


def _write_mat5(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A MATLAB v5 file (scipy.io.savemat) with a fixed header date instead of the time of writing."""
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, arrays)
    data = bytearray(buf.getvalue())
    data[:116] = _matlab_header("5.0")[:116]
    path.write_bytes(bytes(data))


NYUD_LABELS = 894  # NYU Depth v2's label vocabulary, which classMapping40.mat maps to 40 classes


def nyud_class_map(n_classes: int) -> np.ndarray:
    """``mapClass`` of the world's classMapping40.mat: label ``k + 1`` (world class ``k``) -> NYU40 class
    ``(7 k mod 40) + 1``, a fixed permutation (so a reader that skips the map fails), every other of the 894
    labels -> 40 (otherprop), as the real map sends miscellaneous objects."""
    out = np.full((1, max(NYUD_LABELS, n_classes)), 40.0)
    out[0, :n_classes] = [(7 * k) % 40 + 1 for k in range(n_classes)]
    return out


def write_nyud(root: Path, spec: WorldSpec) -> dict[str, Any]:
    """NYU Depth v2's labeled set: ``nyu_depth_v2_labeled.mat`` (v7.3 / HDF5: ``images`` (N, 3, W, H) uint8,
    ``depths`` (N, W, H) single metres, ``labels`` (N, W, H) uint16 class + 1 (0 none), ``instances`` (N, W, H)
    uint8 object number, i.e. MATLAB's H x W x C x N arrays as h5py sees them) and ``splits.mat`` (v5: 1-based
    ``trainNdxs`` / ``testNdxs`` column vectors). Train and test images are interleaved like the real release.
    Beside them ``classMapping40.mat`` in the layout of Gupta et al.'s file (v5: ``mapClass`` 1 x 894 double,
    ``className`` 1 x 40 cell; ``nyud_class_map``), which the nyud_seg format reads as its ``class_map``; it is
    written after the draws, so the other two files are those of a world without it."""
    s = spec.nyud
    n_train, n_test = s.splits["train"], s.splits["test"]
    n = n_train + n_test
    order = _rng(spec.seed, "nyud", "ids").permutation(n)
    rows = {"train": np.sort(order[:n_train]), "test": np.sort(order[n_train:])}  # 0-based
    images = np.zeros((n, 3, s.width, s.height), np.uint8)
    depths = np.zeros((n, s.width, s.height), np.float32)
    labels = np.zeros((n, s.width, s.height), np.uint16)
    instances = np.zeros((n, s.width, s.height), np.uint8)
    lo, hi = s.class_size
    sizes = [lo + k * (hi - lo) / max(s.n_classes - 1, 1) for k in range(s.n_classes)]
    near, far = s.depth_range
    shape = (s.height, s.width)
    n_obj = 0
    with _progress(n, "nyud") as bar:
        for split in ("train", "test"):
            for i, row in enumerate(rows[split]):
                rng = _rng(spec.seed, "nyud", split, i)
                n_req = int(rng.integers(s.objects[0], s.objects[1] + 1))
                r = render_depth_scene(rng, s.width, s.height, range(s.n_classes), n_req, s.scale, sizes,
                                       near=near, far=far, min_visible=s.min_visible,
                                       colours=spec.object_colours, backgrounds=spec.backgrounds)
                images[row] = _jpeg_pixels(r, spec).transpose(2, 1, 0)
                depths[row] = r.depth.T
                labels[row] = _id_map(r.objects, shape, [o.label + 1 for o in r.objects]).T
                instances[row] = _id_map(r.objects, shape, list(range(1, len(r.objects) + 1))).T
                n_obj += len(r.objects)
                bar.update()
    _write_mat73(root / "nyu_depth_v2_labeled.mat", {
        "images": (images, "uint8"), "depths": (depths, "single"), "labels": (labels, "uint16"),
        "instances": (instances, "uint8")})
    _write_mat5(root / "splits.mat", {"trainNdxs": (rows["train"] + 1.0).reshape(-1, 1),
                                      "testNdxs": (rows["test"] + 1.0).reshape(-1, 1)})
    from analysis.dense_targets import NYUD40_CLASSES  # the reader's own names, so the two cannot drift

    _write_mat5(root / "classMapping40.mat", {"mapClass": nyud_class_map(s.n_classes),
                                              "className": np.array([list(NYUD40_CLASSES)], dtype=object)})
    return {"images": {"train": n_train, "test": n_test}, "classes": s.n_classes, "objects": n_obj,
            "depth_m": [float(depths.min()) if n else 0.0, float(depths.max()) if n else 0.0]}


WRITERS: dict[str, Callable[[Path, WorldSpec], dict[str, Any]]] = {
    "imagenet": write_imagenet, "coco": write_coco, "openimages": write_openimages, "bdd100k": write_bdd100k,
    "cls": write_cls, "voc": write_voc, "davis": write_davis, "nyud": write_nyud,
}


# ----------------------------------------------------------------------------------------------- driver


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _manifest_text(spec: WorldSpec, datasets: dict[str, Any]) -> str:
    body = {"version": WORLD_VERSION, "seed": spec.seed, "spec": spec.to_dict(),
            "datasets": {k: datasets[k] for k in DATASETS if k in datasets}}
    return json.dumps(body, indent=2, sort_keys=False) + "\n"


def _parse_only(only: list[str] | str | None) -> list[str]:
    if only is None:
        return list(DATASETS)
    names = [x.strip() for x in (only.split(",") if isinstance(only, str) else only) if x.strip()]
    bad = [x for x in names if x not in DATASETS]
    if bad or not names:
        raise SpecError(f"unknown dataset(s) {bad or names} in --only; choose from {', '.join(DATASETS)}")
    return [d for d in DATASETS if d in names]


def make_world(out_dir: str | os.PathLike[str], spec: WorldSpec | dict | None = None,
               only: list[str] | None = None, force: bool = False) -> Path:
    """Write the world (or the ``only`` datasets) under ``out_dir`` and return it.

    Idempotent: datasets already recorded in ``world.json`` with the same spec are kept (fast fixtures);
    ``force`` regenerates them. Each dataset appears atomically; ``world.json`` is written last.
    """
    if not isinstance(spec, WorldSpec):
        spec = WorldSpec.from_dict(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = _parse_only(only)
    old = _read_manifest(out)
    same = old is not None and old.get("version") == WORLD_VERSION and old.get("spec") == spec.to_dict()
    done: dict[str, Any] = {k: v for k, v in (old or {}).get("datasets", {}).items()
                            if same and (out / k).is_dir()}
    todo = [d for d in wanted if force or d not in done]
    if not todo:
        return out
    for d in todo:
        done.pop(d, None)
    # Drop the datasets about to be rewritten from the manifest first: a kill mid-way must not leave a
    # manifest vouching for a half-replaced folder.
    _atomic_text(out / MANIFEST, _manifest_text(spec, done))
    for name in todo:
        tmp = out / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            counts = WRITERS[name](tmp, spec)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = out / name
        if final.exists():
            trash = out / f".{name}.old-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, final)
        done[name] = {"path": name, **counts}
        log.info("world/%s: %s", name, json.dumps(counts))
    _atomic_text(out / MANIFEST, _manifest_text(spec, done))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (one sub-folder per dataset + world.json)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--spec-json", help="partial WorldSpec as JSON, e.g. '{\"seed\": 1, \"coco\": {\"splits\": "
                                       "{\"train2017\": 50}}}'")
    g.add_argument("--spec", help="partial WorldSpec as a YAML file")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(DATASETS)}")
    ap.add_argument("--force", action="store_true", help="regenerate datasets even if world.json matches")
    ap.add_argument("--print-spec", action="store_true", help="print the resolved spec as JSON and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        spec = load_spec(args.spec, args.spec_json)
        if args.print_spec:
            print(json.dumps(spec.to_dict(), indent=2))
            return 0
        out = make_world(args.out, spec, _parse_only(args.only), force=args.force)
    except (SpecError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    log.info("world ready at %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
