"""Inspect a pretraining subset in FiftyOne: a persistent dataset built from `subset.csv`, optional backbone
embeddings with a 2-D Brain visualisation, and the App served on a port (ssh-tunnel friendly).

`import fiftyone` starts (or connects to) a MongoDB, so fiftyone is imported lazily inside the functions that
need it and only after `configure_fiftyone()` has set the database directory; importing this module, or
running the rest of the pipeline, never touches a database. `FIFTYONE_DATABASE_URI`, when set, is honoured.

CLI (`python -m data_prep.inspect ...`):
  build --subset results/data/X/subset.csv --name X [--shards DIR] [--checkpoint CKPT ...] [--overwrite]
  embed --name X --checkpoint CKPT [--brain-key K]
  app   --name X [--port 5151] [--address 127.0.0.1]
  serve --name X --port P --address A [--lifeline]   (internal: the App server process that `app` starts)
  watchdog --session SID                              (internal: what `serve --lifeline` starts, see below)

No orphaned servers. `app` serves from a child `serve` process in a session of its own; FiftyOne starts the
MongoDB and the App's web server under it through its service wrapper (fiftyone/service/main.py), which stops
its service when *its* parent's pipe closes, but (a) nothing tells `serve` that `app` died, and (b) the App's
web server can hang on SIGTERM for tens of seconds, so the wrapper's own cleanup is not enough. Hence a
lifeline: `serve`'s stdin is a pipe whose only write end `app` holds, so the kernel closes it when `app` dies
by any means, SIGKILL included, without polling and with no start-up race (an early EOF is read too). `serve`
first starts a small `watchdog` process in its session that blocks on that stdin; on EOF it signals every
process of the session (serve, the wrappers, mongod, the web server: none of them leaves it), SIGTERM, then
SIGKILL after a grace period, re-reading the session until it is empty (`serve` dies at once on SIGTERM, so
nothing it was about to start is missed). A parent-death signal (prctl PR_SET_PDEATHSIG) was not used: it
fires when the spawning *thread* ends (wrong for `launch_app` called from a worker thread), is Linux-only, and
would end only `serve`, whose hanging web server would then outlive it. `build` and `embed` need nothing of
their own: they start the database in-process through the same wrapper, whose stdin pipe from this process
closes on SIGKILL, and it then stops mongod.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import mimetypes
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_prep.records import Record, SubsetFormatError, atomic_write_text, configure_logging, read_subset_csv
from data_prep.shards import load_manifest

if TYPE_CHECKING:  # pragma: no cover - typing only; the real import starts the database
    import fiftyone as fo
    import numpy as np

log = logging.getLogger(__name__)

DEFAULT_DB_DIR = "results/fiftyone/db"
DEFAULT_PORT = 5151
CLASS_FIELD = "cls"
BOXES_FIELD = "boxes"
# Fields this module writes, plus FiftyOne's own: record attributes with these names get an `attr_` prefix.
RESERVED_FIELDS = frozenset(
    {
        "id",
        "filepath",
        "tags",
        "metadata",
        "media_type",
        "created_at",
        "last_modified_at",
        CLASS_FIELD,
        BOXES_FIELD,
        "n_objects",
        "shard_key",
        "shard",
        "split",
        "embedding",
    }
)
# Record attributes that describe the boxes rather than the image: consumed when building detections.
BOX_ATTRIBUTE_KEYS = ("crowd", "box_attributes", "box_coords")
_BUILDING_SUFFIX = "__building"


class InspectError(ValueError):
    """Bad input for the inspection tools (unknown dataset, port in use, nothing to show, ...)."""


class SubsetNotFoundError(FileNotFoundError):
    """The subset list to inspect does not exist yet; the message names the snakemake target."""


# ----------------------------------------------------------------------------------------------- environment


def configure_fiftyone(db_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Set FiftyOne's environment before it is first imported; returns the settings in force.

    Usage tracking is off unless the user set it, and the bundled MongoDB keeps its files under the project
    (`results/fiftyone/db` by default) instead of ~/.fiftyone, so `make clean` removes it with the rest.
    An explicit `db_dir` wins over `FIFTYONE_DATABASE_DIR`; `FIFTYONE_DATABASE_URI` is left alone (when set,
    FiftyOne connects there and the directory is unused).
    """
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    if db_dir is not None:
        os.environ["FIFTYONE_DATABASE_DIR"] = str(Path(db_dir).resolve())
    else:
        os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(Path(DEFAULT_DB_DIR).resolve()))
    if "fiftyone" in sys.modules:  # config was read at import: a later change does not apply to this process
        current = sys.modules["fiftyone"].config.database_dir
        if os.path.realpath(current) != os.path.realpath(os.environ["FIFTYONE_DATABASE_DIR"]):
            log.warning(
                "fiftyone was already imported with database_dir=%s; %s is ignored in this process",
                current,
                os.environ["FIFTYONE_DATABASE_DIR"],
            )
    keys = ("FIFTYONE_DO_NOT_TRACK", "FIFTYONE_DATABASE_DIR", "FIFTYONE_DATABASE_URI")
    return {k: os.environ[k] for k in keys if k in os.environ}


def _fiftyone():
    """Import fiftyone (starting or attaching to the database) with the project's environment."""
    configure_fiftyone()
    import fiftyone

    _check_database_dir(fiftyone)
    return fiftyone


def _check_database_dir(fo) -> None:
    """Fail when FiftyOne attached to a database of another directory.

    FiftyOne reuses any local database service of the same user, whatever its FIFTYONE_DATABASE_DIR, so a
    second project's (or a test's) datasets could silently land in the wrong database.
    """
    if fo.config.database_uri:
        return
    from fiftyone.core.odm.database import get_db_client

    opts = get_db_client().admin.command("getCmdLineOpts")
    path = opts.get("parsed", {}).get("storage", {}).get("dbPath")
    if path and os.path.realpath(path) != os.path.realpath(fo.config.database_dir):
        raise InspectError(
            f"FiftyOne attached to a database service already running on {path}, "
            f"not {fo.config.database_dir} "
            "(FiftyOne shares one local database per user). Close the other FiftyOne processes (App, "
            f"notebooks), or pass --db-dir {path}, or set FIFTYONE_DATABASE_URI to a MongoDB of your own."
        )


def _subset_hint(subset_csv: Path) -> str:
    parts = subset_csv.parts
    if len(parts) >= 3 and parts[-1] == "subset.csv" and parts[-3] == "data":
        return f"build it with `snakemake --cores 1 {subset_csv}` (rule `subset`, dataset '{parts[-2]}')"
    return "build it with `snakemake --cores 1 results/data/<dataset>/subset.csv` (rule `subset`)"


# ----------------------------------------------------------------------------------------------- dataset


def shard_index(shards: str | os.PathLike) -> dict[str, str]:
    """webdataset key -> shard file name, read from the tar headers the manifest lists.

    The shard writer drops unreadable images, so membership is taken from the archives themselves rather than
    recomputed from the subset order. `shards` is the shards directory or its manifest.json.
    """
    _meta, tars = load_manifest(shards)
    index: dict[str, str] = {}
    for tar_path in tars:
        name = tar_path.name
        with tarfile.open(tar_path) as tf:
            for member in tf:  # headers only: tarfile seeks over the payloads
                key, _, ext = member.name.partition(".")  # keys never contain dots
                if ext == "json":
                    index[key] = name
    return index


def _field_name(key: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", key)
    if not name or name in RESERVED_FIELDS or not name[0].isalpha():
        name = f"attr_{name}"
    return name


def _attribute_fields(records: Sequence[Record]) -> dict[str, tuple[str, type]]:
    """attribute key -> (field name, python type). A key whose values mix types across records (or are
    lists/dicts) becomes a string field, since a FiftyOne field has one type for all samples."""
    types: dict[str, set[type]] = {}
    for rec in records:
        for k, v in rec.attributes.items():
            if k not in BOX_ATTRIBUTE_KEYS and v is not None:
                types.setdefault(k, set()).add(type(v))
    out = {}
    for k, ts in types.items():
        typ = ts.pop() if len(ts) == 1 else str
        if typ not in (str, int, float, bool):
            typ = str
        out[k] = (_field_name(k), typ)
    return out


def _attribute_value(v: Any, typ: type) -> Any:
    if v is None or type(v) is typ:
        return v
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def _detections(fo, rec: Record, width: int, height: int) -> fo.Detections:
    """Boxes as FiftyOne detections: relative [x, y, w, h]. Per-box attributes become detection attributes
    (OpenImages IsOccluded/IsTruncated/IsGroupOf/IsDepiction/IsInside, BDD100K occluded/truncated/crowd), and
    `iscrowd` is set for every format whose reader lists crowd / group-of boxes (attributes['crowd']), so one
    filter (`F("iscrowd")`) finds COCO crowds, OpenImages group-of boxes and BDD100K crowds alike."""
    normalized = rec.attributes.get("box_coords") == "normalized"
    sx, sy = (1.0, 1.0) if normalized else (1.0 / width, 1.0 / height)
    crowd = set(rec.attributes.get("crowd") or [])
    per_box = rec.attributes.get("box_attributes") or []
    dets = []
    for i, b in enumerate(rec.boxes):
        extra = dict(per_box[i]) if i < len(per_box) and isinstance(per_box[i], dict) else {}
        if "crowd" in rec.attributes or "image_id" in rec.attributes:  # COCO: the reader lists crowd indices
            extra["iscrowd"] = i in crowd
        dets.append(
            fo.Detection(
                label=b.label,
                bounding_box=[b.x1 * sx, b.y1 * sy, (b.x2 - b.x1) * sx, (b.y2 - b.y1) * sy],
                **extra,
            )
        )
    return fo.Detections(detections=dets)


def _image_size(rec: Record) -> tuple[int, int]:
    if rec.width and rec.height:
        return int(rec.width), int(rec.height)
    from PIL import Image

    with Image.open(rec.path) as im:  # reads the header only
        return im.size


@dataclass
class BuildReport:
    """What `build_dataset` added and what it skipped (by reason), kept in the dataset's `info` too."""

    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    not_in_shards: int = 0


def build_dataset(
    subset_csv: str | os.PathLike,
    name: str,
    *,
    shard_manifest: str | os.PathLike | None = None,
    persistent: bool = True,
    overwrite: bool = False,
    batch_size: int = 1000,
    progress: bool = True,
) -> fo.Dataset:
    """Build the FiftyOne dataset `name` from a subset.csv and its source images.

    Per sample: `cls` (Classification, when the subset has classes), `boxes` (Detections in relative
    coordinates; absent for images whose objects were counted without boxes), `n_objects`, the record's scalar
    attributes as fields (e.g. BDD weather/scene/timeofday), `shard_key` (the webdataset key) and `shard` (the
    tar holding it, when `shard_manifest` is given), `split`, and the tag `subset:<name>`. Images missing on
    disk or with an unreadable header are skipped, counted in the log and in `dataset.info["skipped"]`.

    The dataset is built under a temporary name and renamed at the end, so an interrupted build never leaves a
    half-filled dataset under `name`.
    """
    subset_csv = Path(subset_csv)
    if not subset_csv.is_file():
        raise SubsetNotFoundError(f"subset list {subset_csv} does not exist; {_subset_hint(subset_csv)}")
    records = read_subset_csv(subset_csv)
    if not records:
        raise InspectError(
            f"{subset_csv} has no rows; nothing to inspect (check the subset rule in config.yaml)"
        )
    shards = shard_index(shard_manifest) if shard_manifest is not None else None

    fo = _fiftyone()
    if fo.dataset_exists(name) and not overwrite:
        raise InspectError(
            f"FiftyOne dataset '{name}' already exists ({_db_location(fo)}); pass overwrite=True "
            f"(CLI: --overwrite) to rebuild it, or choose another --name"
        )
    tmp_name = name + _BUILDING_SUFFIX
    if fo.dataset_exists(tmp_name):  # left by an interrupted build
        fo.delete_dataset(tmp_name)
    dataset = fo.Dataset(tmp_name)
    try:
        report = _fill(fo, dataset, records, name, shards, batch_size, progress)
        if report.samples == 0:
            first = records[0].path
            raise InspectError(
                f"none of the {len(records)} images of {subset_csv} could be read (first: {first}); "
                f"skipped {dict(report.skipped)}. Was the dataset root moved? Rebuild the subset."
            )
        dataset.info = {
            "subset_csv": str(subset_csv.resolve()),
            "shards": None if shard_manifest is None else str(Path(shard_manifest).resolve()),
            "records": len(records),
            "samples": report.samples,
            "skipped": dict(sorted(report.skipped.items())),
            "not_in_shards": report.not_in_shards,
        }
        labels = (
            sorted(set(dataset.distinct(f"{BOXES_FIELD}.detections.label")))
            if dataset.has_field(BOXES_FIELD)
            else []
        )
        classes = sorted({r.cls for r in records if r.cls is not None})
        dataset.classes = {k: v for k, v in ((CLASS_FIELD, classes), (BOXES_FIELD, labels)) if v}
        dataset.save()
        if fo.dataset_exists(name):
            fo.delete_dataset(name)
        dataset.name = name
        dataset.persistent = persistent
    except BaseException:
        dataset.delete()
        raise
    if report.skipped:
        log.warning(
            "%s: skipped %s of %d records (see warnings above)", name, dict(report.skipped), len(records)
        )
    if report.not_in_shards:
        log.warning(
            "%s: %d samples are not in any shard (dropped by the shard writer)", name, report.not_in_shards
        )
    log.info(
        "%s: %d samples in FiftyOne dataset '%s' (%s)", subset_csv, report.samples, name, _db_location(fo)
    )
    return dataset


def _fill(
    fo,
    dataset,
    records: Sequence[Record],
    name: str,
    shards: dict[str, str] | None,
    batch_size: int,
    progress: bool,
) -> BuildReport:
    from tqdm import tqdm

    report = BuildReport()
    attr_fields = _attribute_fields(records)
    tag = f"subset:{name}"
    batch: list = []
    with tqdm(total=len(records), unit="img", desc=f"fiftyone {name}", disable=not progress) as bar:
        for rec in records:
            bar.update(1)
            sample = _sample(fo, rec, tag, attr_fields, shards, report)
            if sample is not None:
                batch.append(sample)
            if len(batch) >= batch_size:
                dataset.add_samples(batch, progress=False)
                report.samples += len(batch)
                batch = []
        if batch:
            dataset.add_samples(batch, progress=False)
            report.samples += len(batch)
    return report


def _sample(fo, rec: Record, tag: str, attr_fields: dict, shards: dict[str, str] | None, report: BuildReport):
    try:
        size_bytes = os.stat(rec.path).st_size
    except OSError as exc:
        _skip(report, "missing_image", f"{rec.key}: {rec.path} ({exc.strerror})")
        return None
    try:
        width, height = _image_size(rec)
    except Exception as exc:  # PIL raises several types for a bad header
        _skip(report, "unreadable_image", f"{rec.key}: {rec.path} ({exc})")
        return None
    sample = fo.Sample(
        filepath=rec.path,
        tags=[tag],
        metadata=fo.ImageMetadata(
            width=width, height=height, size_bytes=size_bytes, mime_type=mimetypes.guess_type(rec.path)[0]
        ),
        n_objects=rec.n_objects,
        split=rec.split,
        shard_key=rec.key,
    )
    if rec.cls is not None:
        sample[CLASS_FIELD] = fo.Classification(label=rec.cls)
    if rec.boxes or rec.object_count is None:  # no Detections where objects were counted but not boxed
        sample[BOXES_FIELD] = _detections(fo, rec, width, height)
    for k, (fname, typ) in attr_fields.items():
        if k in rec.attributes:
            sample[fname] = _attribute_value(rec.attributes[k], typ)
    if shards is not None:
        sample["shard"] = shards.get(rec.key)
        report.not_in_shards += rec.key not in shards
    return sample


def _skip(report: BuildReport, reason: str, detail: str) -> None:
    report.skipped[reason] += 1
    if report.skipped[reason] <= 5:
        log.warning("skip (%s): %s", reason, detail)
    elif report.skipped[reason] == 6:
        log.warning("further '%s' skips are counted, not logged", reason)


def _db_location(fo) -> str:
    if fo.config.database_uri:
        return "database at FIFTYONE_DATABASE_URI"
    return f"database dir {fo.config.database_dir}"


def load_dataset(name: str) -> fo.Dataset:
    """Load a built dataset, or say how to build it."""
    fo = _fiftyone()
    if not fo.dataset_exists(name):
        raise InspectError(
            f"no FiftyOne dataset '{name}' in the {_db_location(fo)} (have: {fo.list_datasets()}); "
            f"build it with `snakemake --cores 1 results/fiftyone/{name}.done` or "
            f"`python -m data_prep.inspect build --subset "
            f"results/data/{name}/subset.csv --name {name}`"
        )
    return fo.load_dataset(name)


# ----------------------------------------------------------------------------------------------- embeddings


def checkpoint_features(
    paths: Sequence[str],
    checkpoint: str | os.PathLike,
    *,
    image_size: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[np.ndarray, dict]:
    """Pooled backbone features (n, feat_dim) of whole images, resized and centre-cropped to `image_size`.

    The size and normalisation default to the checkpoint's own training config (crop.size, aug.mean/std) so
    the features are those of the inputs the network saw; returns the features and the settings used.
    """
    import numpy as np
    import torch
    from PIL import Image
    from torchvision import transforms as T
    from tqdm import tqdm

    from study.models import cfg_get, load_backbone

    net, info = load_backbone(checkpoint)
    cfg = info.get("config") or {}
    size = int(image_size or cfg_get(cfg_get(cfg, "crop"), "size") or (64 if info["small_input"] else 224))
    aug = cfg_get(cfg, "aug")
    mean = list(cfg_get(aug, "mean") or (0.485, 0.456, 0.406))
    std = list(cfg_get(aug, "std") or (0.229, 0.224, 0.225))
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])

    class _Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int):
            with Image.open(paths[i]) as im:
                return tf(im.convert("RGB"))

    loader = torch.utils.data.DataLoader(_Images(), batch_size=batch_size, num_workers=num_workers)
    net.eval().to(device)
    feats = []
    with torch.inference_mode():
        for x in tqdm(loader, desc="embeddings", unit="batch", disable=not progress):
            feats.append(net(x.to(device)).float().cpu().numpy())
    out = np.concatenate(feats) if feats else np.zeros((0, int(info["feat_dim"])), np.float32)
    settings = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "arch": info["arch"],
        "image_size": size,
        "mean": mean,
        "std": std,
        "feat_dim": int(info["feat_dim"]),
    }
    return out, settings


def brain_key_for(name: str) -> str:
    """FiftyOne brain keys must be Python identifiers: `iou-0.5` -> `iou_0_5`, `50ep` -> `k_50ep`."""
    key = re.sub(r"\W", "_", name)
    return key if key.isidentifier() else f"k_{key}"


def default_brain_key(checkpoint: str | os.PathLike) -> str:
    """`results/pretrain/syn_coco/moco_v2/checkpoint.pt` -> `moco_v2`: one key per variant."""
    p = Path(checkpoint)
    return brain_key_for(p.parent.name if p.stem == "checkpoint" and p.parent.name else p.stem)


def _visualization_method(method: str, n: int) -> tuple[str, dict]:
    """Pick a reducer that runs offline with what is installed and fits `n` points.

    UMAP (umap-learn) when installed, else t-SNE (scikit-learn); PCA for a handful of points, where t-SNE's
    perplexity cannot be met. Parameters are capped so tiny subsets do not fail.
    """
    import importlib.util

    if n < 2:
        raise InspectError(f"a 2-D visualisation needs at least 2 samples, the dataset has {n}")
    if method == "auto":
        method = "umap" if importlib.util.find_spec("umap") else "tsne"
        if n < 5:
            method = "pca"
    if method == "umap":
        if not importlib.util.find_spec("umap"):
            raise InspectError(
                "method 'umap' needs umap-learn (`pip install umap-learn`); or use 'tsne' / 'pca'"
            )
        return method, {"num_neighbors": min(15, n - 1)}
    if method == "tsne":
        return method, {
            "perplexity": float(min(30.0, max(1.0, (n - 1) / 3))),
            "pca_dims": min(50, n) if n > 50 else None,
        }
    if method == "pca":
        return method, {}
    raise InspectError(f"unknown visualisation method {method!r}; choose auto, umap, tsne or pca")


def attach_embeddings(
    dataset: fo.Dataset,
    checkpoint: str | os.PathLike,
    *,
    brain_key: str | None = None,
    store_embeddings: bool = True,
    method: str = "auto",
    image_size: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
):
    """Embed every sample with a pretraining checkpoint's backbone and compute a 2-D Brain visualisation.

    Embeddings are stored in the field `emb_<brain_key>` (unless `store_embeddings=False`, e.g. for large
    ResNet-50 subsets) so other reducers can be run later without the network; an existing run under the same
    brain key is replaced. Returns the Brain's VisualizationResults (`.points` is (n, 2)).
    """
    import fiftyone.brain as fob
    from threadpoolctl import threadpool_limits

    key = brain_key_for(brain_key) if brain_key else default_brain_key(checkpoint)
    ids, paths = dataset.values("id"), dataset.values("filepath")
    method, kwargs = _visualization_method(method, len(ids))  # fail before the network runs
    feats, settings = checkpoint_features(
        paths,
        checkpoint,
        image_size=image_size,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
    )
    embeddings: Any = dict(zip(ids, feats, strict=True))
    if store_embeddings:
        emb_field = f"emb_{key}"
        dataset.set_values(emb_field, list(feats))
        embeddings = emb_field
    if key in dataset.list_brain_runs():
        dataset.delete_brain_run(key)
    t0 = time.perf_counter()
    # OpenMP threads only pay off for large t-SNE/UMAP inputs; on a busy machine they slow small ones ~10x.
    with threadpool_limits(limits=1 if len(ids) < 5000 else None):
        results = fob.compute_visualization(
            dataset,
            embeddings=embeddings,
            brain_key=key,
            method=method,
            num_dims=2,
            seed=seed,
            verbose=False,
            progress=progress,
            **kwargs,
        )
    info = dict(dataset.info)
    info.setdefault("embeddings", {})[key] = {**settings, "method": method, **kwargs}
    dataset.info = info
    dataset.save()
    log.info(
        "%s: %s embeddings (%d x %d) -> %s in %.1f s, brain key '%s'",
        dataset.name,
        settings["arch"],
        feats.shape[0],
        feats.shape[1],
        method,
        time.perf_counter() - t0,
        key,
    )
    return results


# ----------------------------------------------------------------------------------------------- App

WATCHDOG_GRACE = 3.0  # seconds between SIGTERM and SIGKILL when the `app` command is gone


def _session_processes(sid: int, exclude: int | None = None) -> list:
    """Live (non-zombie) processes of session `sid` as psutil.Process objects, but `exclude`.

    Everything `serve` starts stays in its session (FiftyOne's wrappers change only their process group), so
    this finds the whole tree even after re-parenting, and children spawned after any snapshot.
    """
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if p.pid != exclude and os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (OSError, psutil.Error):
            continue
    return out


def _end_session(sid: int, grace: float = WATCHDOG_GRACE, timeout: float = 10.0) -> list[int]:
    """SIGTERM every process of session `sid` (but this one), SIGKILL what is left after `grace` seconds, and
    return the pids still running after `timeout` more. The session is re-read at every poll, so a process
    forked while its parent was being signalled is caught too."""
    import psutil

    me = os.getpid()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, timeout)):
        deadline = time.monotonic() + wait
        signalled: set[int] = set()
        while True:
            procs = _session_processes(sid, exclude=me)
            if not procs:
                return []
            for p in procs:
                if p.pid not in signalled or sig == signal.SIGKILL:
                    try:
                        p.send_signal(sig)  # psutil checks the pid still names the same process
                    except psutil.Error:
                        pass
                    signalled.add(p.pid)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    return sorted(p.pid for p in _session_processes(sid, exclude=me))


def _watchdog(session: int, grace: float = WATCHDOG_GRACE) -> int:
    """Block until stdin (the lifeline from `app`) reaches EOF, then end every process of `session`.

    Refuses to run unless its parent leads `session` (i.e. it was started by `serve --lifeline`), so a stray
    manual call cannot signal a login session.
    """
    if os.getsid(0) != session or os.getppid() != session:
        print(
            f"error: watchdog must be started by the `serve` process leading session {session} "
            f"(this one is in session {os.getsid(0)}, parent {os.getppid()})",
            file=sys.stderr,
            flush=True,
        )
        return 2
    # A group of its own, like FiftyOne's wrappers: `serve`'s group then holds `serve` alone, which its parent
    # reaps, so no zombie of ours (re-parented to init when `stop()` kills both) lingers in it.
    os.setpgid(0, 0)
    try:
        while os.read(0, 4096):  # `app` never writes; only the EOF matters
            pass
    except OSError:
        pass
    print(f"watchdog: the `app` command is gone; ending session {session}", flush=True)
    left = _end_session(session, grace)
    if left:
        print(f"watchdog: processes {left} still run after SIGKILL", file=sys.stderr, flush=True)
    return 0 if not left else 1


@dataclass
class AppHandle:
    """A running App server; `stop()` ends every process it started.

    The server runs in its own session, but FiftyOne's service wrapper moves itself into a new process group
    (`os.setpgrp`), so the group alone does not hold the App's web server: `stop()` signals the group, the
    session *and* every descendant seen while the server ran. `process.stdin` is the server's lifeline: when
    it closes (`stop()`, the handle is garbage-collected, or this process dies) the server's watchdog ends it.
    """

    process: subprocess.Popen
    url: str
    log_path: Path
    _seen: dict = field(default_factory=dict, repr=False)

    @property
    def pgid(self) -> int:
        return self.process.pid  # start_new_session=True: the child leads its own group

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def processes(self) -> list:
        """The server's process tree and group (psutil.Process objects), remembered across calls so that
        processes re-parented after their parent died are still found."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            for p in [root, *root.children(recursive=True)]:
                self._seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == self.pgid or os.getsid(p.pid) == self.pgid:
                    self._seen.setdefault(p.pid, p)
            except (ProcessLookupError, psutil.Error):
                continue
        return list(self._seen.values())

    def alive(self) -> list[int]:
        """Pids of the server's processes that still run (zombies waiting for a reaper do not count)."""
        import psutil

        self.process.poll()  # reap our direct child
        pids = []
        for p in self.processes():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    pids.append(p.pid)
            except psutil.Error:
                continue
        return sorted(pids)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the App answers HTTP 200; raise with the server's log if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.processes()
            if self.process.poll() is not None:
                self.stop()
                raise InspectError(
                    f"the App server exited with status {self.process.returncode}; its log "
                    f"({self.log_path}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url, timeout=2) as resp:
                    if resp.status == 200:
                        self.processes()
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(
            f"the App did not answer on {self.url} within {timeout:.0f} s; its log "
            f"({self.log_path}):\n{self.log_tail()}"
        )

    def stop(self, grace: float = 5.0, timeout: float = 10.0) -> None:
        """SIGTERM the group and every known descendant (web server, a database it started), SIGKILL whatever
        still runs after `grace` seconds (the web server drains open App connections first), and wait up to
        `timeout` more for them to go."""
        import psutil

        self.processes()
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, timeout)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                pass
            for p in self._seen.values():
                try:
                    if p.is_running():
                        p.send_signal(sig)
                except psutil.Error:
                    continue
            deadline = time.monotonic() + wait
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.alive():
                break
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("App server %d did not exit after SIGKILL", self.process.pid)
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()  # the lifeline; its watchdog was signalled with the rest
        left = self.alive()
        if left:
            log.warning("App server processes %s are still running after stop()", left)

    def __enter__(self) -> AppHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _check_port(address: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the server: TIME_WAIT is no conflict
        try:
            s.bind((address, port))
        except OSError as exc:
            raise InspectError(
                f"cannot serve the App on {address}:{port} ({exc.strerror}); another App or "
                f"program uses it: pick another --port"
            ) from None


def launch_app(
    dataset_name: str,
    port: int = DEFAULT_PORT,
    address: str = "127.0.0.1",
    *,
    db_dir: str | os.PathLike | None = None,
    wait: bool = True,
    timeout: float = 120.0,
    log_path: str | os.PathLike | None = None,
) -> AppHandle:
    """Serve the App for `dataset_name` from a child process in a new session and return its handle.

    The server runs `python -m data_prep.inspect serve --lifeline` so that it, the App's server process and
    any database it had to start share one session that `stop()` can end completely, and that its watchdog
    ends when this process dies, even by SIGKILL (see the module docstring). Keep the handle: dropping it
    closes the lifeline and stops the server. This process does not import fiftyone. With `wait`, returns
    once the App answers HTTP 200.
    """
    env_settings = configure_fiftyone(db_dir)
    _check_port(address, port)
    if log_path is None:
        base = Path(env_settings["FIFTYONE_DATABASE_DIR"]).parent
        base = base if os.access(base, os.W_OK) else Path(tempfile.gettempdir())
        log_path = base / f"app-{dataset_name}-{port}.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [
        sys.executable,
        "-m",
        "data_prep.inspect",
        "serve",
        "--name",
        dataset_name,
        "--port",
        str(port),
        "--address",
        address,
        "--lifeline",
    ]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,  # the lifeline: only this process holds the write end (close_fds)
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    host = "127.0.0.1" if address in ("0.0.0.0", "") else address
    handle = AppHandle(process=proc, url=f"http://{host}:{port}/", log_path=log_path)
    if wait:
        try:
            handle.wait_ready(timeout)
        except BaseException:  # Ctrl-C while waiting must not orphan the server either
            handle.stop()
            raise
    return handle


def tunnel_command(port: int) -> str:
    """The ssh port-forward a user runs on their laptop to open an App served on this machine."""
    return f"ssh -N -L {port}:127.0.0.1:{port} {getpass.getuser()}@{socket.gethostname()}"


def _start_watchdog() -> subprocess.Popen:
    """Start `watchdog` in this session, on this process's stdin (the lifeline), before anything else runs
    here: its stdout/stderr go to the same log."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    sid = os.getsid(0)
    return subprocess.Popen(
        [sys.executable, "-m", "data_prep.inspect", "watchdog", "--session", str(sid)], env=env
    )


def _serve(name: str, port: int, address: str, lifeline: bool = False) -> int:
    if lifeline:
        if os.getsid(0) != os.getpid():
            print("error: serve --lifeline must lead its own session (start_new_session)", file=sys.stderr)
            return 2
        _start_watchdog()
    try:
        fo = _fiftyone()
        dataset = load_dataset(name)
    except InspectError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except ConnectionError as exc:  # FiftyOne's own startup: mongod did not answer
        print(
            f"error: FiftyOne could not reach its database ({exc}; cause: {exc.__cause__}). "
            "Run the command again; if it persists, look for stale `mongod` processes of this user.",
            file=sys.stderr,
            flush=True,
        )
        return 3
    session = fo.launch_app(dataset, port=port, address=address, remote=True)
    print(f"serving '{name}' at {session.url}", flush=True)
    session.wait(-1)
    return 0


# ----------------------------------------------------------------------------------------------- CLI


def _write_done(path: Path, dataset, embeddings: list[str]) -> None:
    info = dict(dataset.info)
    marker = {
        "dataset": dataset.name,
        "samples": len(dataset),
        "skipped": info.get("skipped", {}),
        "not_in_shards": info.get("not_in_shards", 0),
        "brain_keys": embeddings,
        "database": "FIFTYONE_DATABASE_URI"
        if os.environ.get("FIFTYONE_DATABASE_URI")
        else os.environ["FIFTYONE_DATABASE_DIR"],
    }
    atomic_write_text(path, json.dumps(marker, indent=1, sort_keys=True) + "\n")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _embedding_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        required=required,
        help="pretraining checkpoint.pt; repeat for several (one brain key each)",
    )
    p.add_argument(
        "--brain-key", default=None, help="brain key (default: the checkpoint's variant directory)"
    )
    p.add_argument(
        "--method",
        default="auto",
        choices=["auto", "umap", "tsne", "pca"],
        help="2-D reducer (auto: umap if umap-learn is installed, else tsne)",
    )
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's crop.size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--no-store-embeddings", action="store_true", help="keep only the 2-D points (large subsets)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--db-dir",
        default=None,
        help=f"MongoDB data dir (default: $FIFTYONE_DATABASE_DIR or {DEFAULT_DB_DIR}); "
        "ignored when FIFTYONE_DATABASE_URI is set",
    )
    p.add_argument("--log", default=None, help="also log to this file")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build a persistent dataset from a subset.csv")
    b.add_argument("--subset", required=True, help="results/data/<dataset>/subset.csv")
    b.add_argument("--name", required=True, help="FiftyOne dataset name (use the config's dataset key)")
    b.add_argument("--shards", default=None, help="shards directory (adds the shard file of each sample)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    b.add_argument("--done", default=None, help="write a JSON marker with the sample count here (Snakemake)")

    _embedding_args(b)
    e = sub.add_parser("embed", help="attach checkpoint embeddings + a 2-D visualisation to a built dataset")
    e.add_argument("--name", required=True)
    e.add_argument("--done", default=None, help="write a JSON marker here when finished (Snakemake)")
    _embedding_args(e, required=True)

    for name in ("app", "serve"):
        a = sub.add_parser(
            name,
            help="serve the App (Ctrl-C stops it)" if name == "app" else "internal: the server `app` starts",
        )
        a.add_argument("--name", required=True)
        a.add_argument("--port", type=int, default=DEFAULT_PORT)
        a.add_argument("--address", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
        if name == "app":
            a.add_argument(
                "--timeout", type=float, default=180.0, help="seconds to wait for the App to start"
            )
        else:
            a.add_argument(
                "--lifeline",
                action="store_true",
                help="stop everything started here when stdin reaches EOF (the parent holds its write end)",
            )
    w = sub.add_parser("watchdog", help="internal: ends the session of `serve --lifeline` when `app` is gone")
    w.add_argument("--session", type=int, required=True, help="the session id (= pid) of its `serve` parent")
    w.add_argument("--grace", type=float, default=WATCHDOG_GRACE, help="seconds from SIGTERM to SIGKILL")

    args = p.parse_args(argv)
    if getattr(args, "brain_key", None) and len(args.checkpoint) > 1:
        p.error(
            "--brain-key names one run; leave it out with several --checkpoint (keys come from their dirs)"
        )
    configure_logging(args.log)
    configure_fiftyone(args.db_dir)

    if args.cmd == "watchdog":
        return _watchdog(args.session, args.grace)
    if args.cmd == "serve":
        return _serve(args.name, args.port, args.address, args.lifeline)
    if args.cmd == "app":
        # Ctrl-C, and SIGTERM from a job manager, must reach `stop()`; SIGINT is set explicitly because a
        # shell starts background jobs (`... &`) with it ignored, which would leave the server running.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
        try:
            handle = launch_app(args.name, args.port, args.address, timeout=args.timeout)
        except (InspectError, TimeoutError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        print(f"FiftyOne App for '{args.name}': {handle.url}datasets/{args.name}   (log: {handle.log_path})")
        print(
            f"From another machine, tunnel the port and open http://localhost:{args.port}/ :\n"
            f"  {tunnel_command(args.port)}"
        )
        print("Ctrl-C stops the App.", flush=True)
        try:
            handle.process.wait()
            print(
                f"the App server exited ({handle.process.returncode}); log:\n{handle.log_tail()}",
                file=sys.stderr,
            )
        except KeyboardInterrupt:
            print("stopping the App ...", file=sys.stderr, flush=True)
        finally:
            handle.stop()
        return 0

    try:
        return _build_or_embed(args)
    except (InspectError, FileNotFoundError, SubsetFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        stop_database()


def stop_database() -> None:
    """Stop the database service this process started, and wait until it is gone.

    FiftyOne leaves this to the service object's finaliser, which may run after the process has exited: the
    service then shuts mongod down in the background, and a command started right after (`build`, then
    `app`) registers with that dying service and fails with "Could not connect to `mongod`".
    """
    odm = sys.modules.get("fiftyone.core.odm.database")
    service = getattr(odm, "_db_service", None) if odm is not None else None
    if service is None or getattr(service, "child", None) is None:
        return
    try:
        odm._disconnect()
    except Exception:  # noqa: BLE001 - a failed disconnect must not keep mongod running
        log.debug("disconnect before stopping the database failed", exc_info=True)
    service.stop()
    odm._db_service = None
    os.environ.pop("FIFTYONE_PRIVATE_DATABASE_PORT", None)


def _build_or_embed(args: argparse.Namespace) -> int:
    if args.cmd == "build":
        dataset = build_dataset(args.subset, args.name, shard_manifest=args.shards, overwrite=args.overwrite)
    else:
        dataset = load_dataset(args.name)
    keys = []
    for ckpt in args.checkpoint:
        key = brain_key_for(args.brain_key) if args.brain_key else default_brain_key(ckpt)
        attach_embeddings(
            dataset,
            ckpt,
            brain_key=key,
            store_embeddings=not args.no_store_embeddings,
            method=args.method,
            image_size=args.image_size,
            batch_size=args.batch_size,
            device=args.device,
        )
        keys.append(key)
    if args.done:
        _write_done(Path(args.done), dataset, keys)
    print(
        f"{dataset.name}: {len(dataset)} samples; open it with "
        f"`python -m data_prep.inspect app --name {dataset.name}`",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
