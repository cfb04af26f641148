"""Shard loader for pretraining: webdataset tars -> batches of multi-view crops.

Each shard holds ``{key}.jpg`` (original bytes) and ``{key}.json`` (``class_index``, -1 if none; ``width``,
``height``). Per sample: sample the geometry (``study.crops.sample_views``), decode the JPEG once with PIL's DCT
scaling (``Image.draft``) as far as the smallest box still covers its output size, crop+resize every box in one
PIL call (bilinear, antialiased), mirror flagged views, then (``render="pil"``) the per-view colour pipelines
(``study.augment.view_pipelines``) to uint8, batches normalised to float once; or (``render="batched"``,
``data.render``) stop at uint8 pixels (A+ views that draw AutoAugment get it here, flagged in ``autoaug``) and
leave colour and normalisation to ``study.colour.BatchColour`` on the training device. With ``decode="device"``
(``data.decode``, batched only, no A+) the workers stop before the pixels: they read the header, sample the
same geometry, skip (and count) truncated JPEGs, and send the encoded bytes with the boxes and flips;
``study.decode.decode_crops`` decodes and crops on the training device.

Stream: ``iter(loader)`` gives an endless stream of batches (passes over the shards, reshuffled each pass), so
a trainer just takes ``steps`` batches. With ``epoch_len`` each ``iter()`` yields exactly that many batches and
the next ``iter()`` starts a new, differently seeded epoch; resuming at step ``s`` is
``make_loader(..., start_epoch=s // epoch_len)``. Shards are split disjointly over DDP ranks
(``wds.split_by_node``) and loader workers (``wds.split_by_worker``); with fewer shards than ranks x workers
every reader opens all shards and keeps every n-th sample instead (still disjoint, with a warning).

Class mixing: each reader interleaves its shards, taking one sample from each of up to ``interleave`` open
shards in turn (a shard that ends is replaced by the reader's next one), before the shuffle buffer. The
query encoder's BatchNorm normalises with per-batch statistics, so a batch made of a few classes gives
class-specific statistics and biases the study; reading one shard front to back would do exactly that for
shards written in class order (``data_prep.shards`` before its ``shuffle_seed``, e.g. ImageNet subsets in
wnid order), since a shuffle buffer only mixes nearby samples. Shards written by the current writer are
already in a seeded random order, which is the fix; interleaving is the reader's part: a batch can only hold
classes from its reader's own shards, so it rescues an old class-ordered set only when each reader has many
shards (``tests/test_class_mix.py`` measures both against the exact expectation for random batches; at
paper scale, ~3 shards of ~9 classes per reader, old shards give ~9.5 classes per batch of 64 instead of
~62, so rebuild them; ``data_prep.shards.load_manifest`` warns). The round robin is deterministic given the
shard order, so readers that share all shards (fewer shards than readers) still see one stream and keep
disjoint every n-th samples.

Integrity: a tar reader stops *silently* at a corrupt member header, so a damaged shard would just give
fewer samples. With ``expected_counts`` (the manifest's, ``data_prep.shards.manifest_counts`` or
``verify_shards(...).counts``) every shard read to its end must yield exactly its count, and a reader error
(truncated file) is re-raised naming the shard; both as ``ShardIntegrityError`` with the rebuild command, also
from DataLoader workers. Readers always read whole shards (with fewer shards than readers each reads all of
them and keeps every n-th sample), so the count holds for every reader; a pass cut short (``epoch_len``) checks
nothing.

Randomness (shard order, shuffle buffer, geometry, colour ops) is seeded from (seed, rank, worker, epoch, pass);
torch's global RNG (and thread count) is swapped in and out around each sample, so ``num_workers=0`` leaves
the trainer's RNG alone.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from data_prep.shards import ShardError, ShardIntegrityError, rebuild_command
from study.augment import aug_settings, batch_normalizer, view_pipelines, worker_pipelines
from study.crops import CropSpec, box_iou, crop_spec, sample_views

IMAGE_EXTS = ("jpg", "jpeg", "png")
DRAFT_FACTORS = (8, 4, 2, 1)  # the DCT scalings libjpeg offers through PIL's draft()
RENDERS = ("pil", "batched")  # data.render: where the colour augmentation runs (module docstring)
DECODES = ("cpu", "device")  # data.decode: where the JPEGs are decoded and cropped (batched render only)
JPEG_EOI = b"\xff\xd9"


def check_render(render: Any) -> str:
    """``render`` if it is one of ``RENDERS``, else a ValueError naming the config key."""
    if render not in RENDERS:
        raise ValueError(f"data.render must be one of {', '.join(RENDERS)}, got {render!r}")
    return str(render)


def check_decode(decode: Any, render: str, aplus: bool) -> str:
    """``decode`` if valid and compatible with ``render`` and A+, else a ValueError naming the keys."""
    if decode not in DECODES:
        raise ValueError(f"data.decode must be one of {', '.join(DECODES)}, got {decode!r}")
    if decode == "device" and render != "batched":
        raise ValueError(f"data.decode=device needs data.render=batched (the views are decoded and coloured on "
                         f"the training device), got data.render={render}")
    if decode == "device" and aplus:
        raise ValueError("data.decode=device cannot run with aug.aplus=true: A+'s AutoAugment needs the PIL "
                         "pixels in the loader workers; use data.decode=cpu")
    return str(decode)


def jpeg_complete(data: bytes) -> bool:
    """Whether a JPEG's end-of-image marker is near its end: a truncated file (the common corruption, which PIL
    rejects when it decodes) is caught without decoding. Some writers pad after the marker, hence the window."""
    return data.rfind(JPEG_EOI) >= max(2, len(data) - 4096)


class ShardDataError(ShardError):
    """Shards are missing, empty or unusable; the message names the file and the fix."""


def draft_factor(boxes: np.ndarray, sizes: Sequence[int]) -> int:
    """Largest JPEG DCT reduction (8, 4, 2 or 1) that keeps every box at least its output size on both sides."""
    boxes = np.asarray(boxes)
    room = float(np.min(np.minimum(boxes[:, 2], boxes[:, 3]) / np.asarray(sizes, dtype=np.float64)))
    for r in DRAFT_FACTORS:
        if room >= r:
            return r
    return 1


def draft_decode(img: Image.Image, boxes: np.ndarray, sizes: Sequence[int]) -> tuple[Image.Image, float]:
    """Decode an opened (lazy) image as RGB, JPEG-downscaled by the largest factor the boxes allow.

    Returns ``(image, s)`` where source pixel ``x`` maps to ``x / s`` in the returned image.
    """
    s = 1.0
    r = draft_factor(boxes, sizes)
    if r > 1 and img.format == "JPEG":
        W, H = img.size
        res = img.draft("RGB", (max(1, W // r), max(1, H // r)))
        if res is not None:
            s = W / res[1][2]
    if img.mode != "RGB":
        img = img.convert("RGB")
    else:
        img.load()
    return img, s


def decode_for_boxes(data: bytes, boxes: np.ndarray, sizes: Sequence[int]) -> tuple[Image.Image, float]:
    """``draft_decode`` from encoded bytes."""
    return draft_decode(Image.open(io.BytesIO(data)), boxes, sizes)


def views_from_image(
    img: Image.Image,
    boxes: np.ndarray,
    sizes: Sequence[int],
    flips: Sequence[bool],
    pipelines: Sequence[Callable],
    scale: float = 1.0,
) -> list[Any]:
    """Pixels for given geometry: crop each source box (``[top, left, h, w]``, divided by ``scale`` for a
    downscaled decode), resize to ``sizes[v]`` (bilinear), mirror if ``flips[v]``, apply ``pipelines[v]``.

    Crop and resize are one PIL ``resize(box=...)`` call: it takes fractional boxes (needed after a draft
    decode) and skips the crop copy; unlike torchvision's crop-then-resize, the filter reads the real pixels
    just outside the box instead of clamping at its edge, which only touches the outermost output pixels.
    """
    if not len(boxes) == len(sizes) == len(flips) == len(pipelines):
        raise ValueError("boxes, sizes, flips and pipelines need one entry per view")
    out = []
    for (top, left, h, w), size, flip, pipe in zip(boxes, sizes, flips, pipelines, strict=True):
        box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
        view = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
        if flip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(pipe(view))
    return out


class _TorchRNG:
    """A private torch CPU RNG stream, swapped into the global generator that torchvision transforms use.

    Also runs the per-view ops single-threaded: on tiny images intra-op threads only add overhead (10x slower
    blurs on a busy 2-core box with ``num_workers=0``); the caller's thread count is restored on exit.
    """

    def __init__(self, seed: int):
        g = torch.Generator()
        g.manual_seed(seed)
        self.state = g.get_state()

    def __enter__(self) -> None:
        self._saved = torch.get_rng_state()
        self._threads = torch.get_num_threads()
        torch.set_rng_state(self.state)
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        self.state = torch.get_rng_state()
        torch.set_rng_state(self._saved)
        torch.set_num_threads(self._threads)


def _seed_words(*parts: int) -> list[int]:
    return [int(p) & 0xFFFFFFFF for p in parts]


def _rebuild(url: str) -> str:
    d = os.path.dirname(url) or "."
    return f"check with `python -m data_prep.shards verify {d}`, rebuild with `{rebuild_command(d)}`"


def _shard_samples(shard: dict) -> Iterator[dict]:
    """The samples of one shard (opened on the first ``next``). With ``shard["count"]``, ending with another
    number of samples is an error (a corrupt header ends a tar silently); a reader error (truncated file) is
    re-raised naming the shard."""
    url, expected = shard["url"], shard.get("count")
    offset = shard.get("offset")  # position of the shard's first sample in the manifest order (None: unknown)
    it = wds.tarfile_to_samples()(iter([{"url": url}]))
    n = 0
    try:
        while True:
            try:
                sample = next(it)
            except StopIteration:
                break
            except ShardError:
                raise
            except Exception as err:  # tarfile.ReadError, EOFError, OSError, ... from deep inside webdataset
                # webdataset appends " @ <file object>" and more args to the message; keep the reason
                why = str(err.args[0] if err.args else err).split(" @ <", 1)[0]
                raise ShardIntegrityError(
                    f"shard {url} is unreadable after {n} samples ({type(err).__name__}: {why}); it is truncated "
                    f"or corrupt: {_rebuild(url)}"
                ) from None
            sample["__index__"] = -1 if offset is None else offset + n
            n += 1
            yield sample
    finally:
        it.close()
    if expected is not None and n != expected:
        raise ShardIntegrityError(
            f"shard {url} gave {n} samples, its manifest.json says {expected}: it is "
            f"{'truncated or corrupt' if n < expected else 'not the shard the manifest describes'}; {_rebuild(url)}"
        )


def interleave_shards(shards: Sequence[dict], open_max: int) -> Iterator[dict]:
    """Samples of ``shards`` (``{"url": ...}`` dicts, in order) interleaved: one from each of up to
    ``open_max`` open shards in turn; an exhausted shard is replaced by the next unopened one in its slot
    (webdataset's ``round_robin_longest``, with a bound on open files). ``open_max=1`` reads the shards one
    after another. Deterministic given the order of ``shards``."""
    if open_max < 1:
        raise ValueError(f"interleave must be >= 1, got {open_max}")
    pending = iter(shards)
    active = [_shard_samples(s) for s in itertools.islice(pending, open_max)]
    i = 0
    try:
        while active:
            i %= len(active)
            try:
                sample = next(active[i])
            except StopIteration:
                nxt = next(pending, None)
                if nxt is None:
                    del active[i]
                else:
                    active[i] = _shard_samples(nxt)
                continue
            i += 1
            yield sample
    finally:
        for it in active:  # an abandoned pass (epoch_len reached) closes its files now, not at GC
            it.close()


class ShardStream(IterableDataset):
    """Iterable of collated batches for the calling rank/worker (see the module docstring)."""

    def __init__(
        self,
        urls: Sequence[str],
        crop_cfg: Any,
        aug_cfg: Any,
        batch_size: int,
        seed: int,
        shuffle_buffer: int = 1000,
        interleave: int = 64,
        expected_counts: Mapping[str, int] | None = None,
        render: str = "pil",
        decode: str = "cpu",
    ):
        super().__init__()
        self.render = check_render(render)
        self.decode = check_decode(decode, self.render, bool(aug_settings(aug_cfg)["aplus"]))
        if interleave < 1:
            raise ValueError(f"interleave must be >= 1 (shards read at once per reader), got {interleave}")
        self.urls = list(urls)
        self.counts = _counts_for(self.urls, expected_counts)
        # Stable sample index = position in the manifest order (shards in ``urls`` order, members in tar order);
        # the memory bank (study/mechanisms.py, Wu et al. 2018) keys its entries by it. -1 without counts.
        self.offsets: dict[str, int] = {}
        if len(self.counts) == len(self.urls):
            self.offsets = dict(zip(self.urls, itertools.accumulate((self.counts[u] for u in self.urls),
                                                                    initial=0), strict=False))
        self.spec: CropSpec = crop_spec(crop_cfg)
        self.sizes = self.spec.sizes
        if self.render == "batched":
            self.pipelines: list[Callable] = worker_pipelines(aug_cfg, self.sizes)
        else:
            self.pipelines = view_pipelines(aug_cfg, self.sizes, flip=False, to_float=False)
        self.normalize = batch_normalizer(aug_cfg)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.interleave = int(interleave)
        self.epoch = 0
        self.skipped = 0

    # -- per sample -------------------------------------------------------------------------------------
    def _process(self, sample: dict, rng: np.random.Generator, trng: _TorchRNG) -> dict | None:
        key = sample.get("__key__", "?")
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise ShardDataError(
                f"{sample.get('__url__', '?')}: sample {key!r} has no image member (.jpg/.jpeg/.png); "
                "rewrite the shard with data_prep.shards"
            )
        meta = json.loads(sample["json"]) if "json" in sample else {}
        label = meta.get("class_index", -1)
        try:
            img = Image.open(io.BytesIO(sample[ext]))  # lazy: reads the header only
            W, H = img.size
            boxes, flips, fell_back = sample_views(H, W, self.spec, rng)
            if self.decode == "device":  # same draws as below; decode_crops does the pixels on the device
                if img.format == "JPEG" and not jpeg_complete(sample[ext]):
                    raise OSError("JPEG is truncated (no end-of-image marker)")
                views = {"encoded": torch.frombuffer(bytearray(sample[ext]), dtype=torch.uint8),
                         "jpeg": img.format == "JPEG", "boxes": torch.as_tensor(boxes, dtype=torch.float32),
                         "flips": torch.as_tensor(flips, dtype=torch.bool), "size": (H, W)}
            else:
                img, s = draft_decode(img, boxes, self.sizes)
                with trng:
                    views = views_from_image(img, boxes, self.sizes, flips, self.pipelines, scale=s)
        except (OSError, ValueError, SyntaxError) as err:  # corrupt / truncated image: skip and count
            self.skipped += 1
            warnings.warn(
                f"skipping sample {key!r} in {sample.get('__url__', '?')}: {err} "
                f"({self.skipped} skipped so far in this reader)",
                stacklevel=2,
            )
            return None
        # realised key/query IoU of the source regions (what the two views show; logged by the trainer)
        iou = float(box_iou(boxes[0], boxes[1]))
        autoaug = None
        if self.decode == "device":
            autoaug = [False] * len(self.sizes)
        elif self.render == "batched":
            views, autoaug = [v for v, _ in views], [bool(a) for _, a in views]
        return {"views": views, "autoaug": autoaug, "label": -1 if label is None else int(label), "fallback": int(fell_back),
                "iou": iou, "key": key, "index": int(sample.get("__index__", -1)), "url": sample.get("__url__", "?")}

    def _collate(self, samples: list[dict]) -> dict:
        views = []
        batched = self.render == "batched"
        extra: dict[str, Any] = {}
        if self.decode == "device":  # one packed byte buffer: one shared-memory tensor per batch, not B
            enc = [s["views"]["encoded"] for s in samples]
            extra = {"encoded": torch.cat(enc),
                     "offsets": torch.tensor([0, *itertools.accumulate(len(e) for e in enc)], dtype=torch.long),
                     "jpeg": torch.tensor([s["views"]["jpeg"] for s in samples], dtype=torch.bool),
                     "boxes": torch.stack([s["views"]["boxes"] for s in samples]),
                     "flips": torch.stack([s["views"]["flips"] for s in samples]),
                     "size": torch.tensor([s["views"]["size"] for s in samples], dtype=torch.long),
                     "url": [s["url"] for s in samples]}
        for v in range(len(self.sizes) if self.decode == "cpu" else 0):
            x = torch.stack([s["views"][v] for s in samples])
            views.append(self.normalize(x) if x.dtype == torch.uint8 and not batched else x)
        if batched:
            extra["autoaug"] = [torch.tensor([s["autoaug"][v] for s in samples], dtype=torch.bool)
                                for v in range(len(self.sizes))]
        if self.decode == "cpu":
            extra["views"] = views
        return {
            **extra,
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "fallbacks": torch.tensor([s["fallback"] for s in samples], dtype=torch.long),
            "iou": torch.tensor([s["iou"] for s in samples], dtype=torch.float64),
            "key": [s["key"] for s in samples],
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        }

    # -- stream -----------------------------------------------------------------------------------------
    def _pass(self, epoch: int, p: int) -> Iterator[dict]:
        rank, world, worker, n_workers = wds.utils.pytorch_worker_info()
        readers = world * n_workers
        order = np.random.default_rng(_seed_words(self.seed, epoch, p)).permutation(len(self.urls))
        shards = [{"url": self.urls[i], "count": self.counts.get(self.urls[i]), "offset": self.offsets.get(self.urls[i])}
                  for i in order]
        if len(shards) >= readers:
            mine = list(wds.split_by_worker(wds.split_by_node(shards)))
            slot = None
        else:
            mine, slot = shards, rank * n_workers + worker
        rng = np.random.default_rng(_seed_words(self.seed, rank, worker, epoch, p))
        trng = _TorchRNG(int(rng.integers(2**62)))
        samples: Iterator[dict] = interleave_shards(mine, self.interleave)
        if slot is not None:
            samples = itertools.islice(samples, slot, None, readers)
        samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer),
                              rng=random.Random(int(rng.integers(2**62))))(samples)
        for sample in samples:
            out = self._process(sample, rng, trng)
            if out is not None:
                yield out

    def __iter__(self) -> Iterator[dict]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        epoch = self.epoch
        batch: list[dict] = []
        for p in itertools.count():
            got = 0
            for sample in self._pass(epoch, p):
                got += 1
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield self._collate(batch)
                    batch = []
            if got == 0:
                raise ShardDataError(
                    f"reader (rank {rank}, worker {worker}) got no usable samples from {len(self.urls)} shard(s) "
                    f"(first: {self.urls[0]}); check the shards are non-empty and hold .jpg + .json members"
                )


class ShardLoader:
    """A DataLoader over ``ShardStream`` that advances the epoch on every ``iter()``.

    ``epoch_len=None``: each ``iter()`` is endless. Otherwise it yields ``epoch_len`` batches per rank.
    """

    def __init__(self, dataset: ShardStream, num_workers: int, epoch_len: int | None, start_epoch: int = 0):
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.epoch_len = epoch_len
        self.epoch = int(start_epoch)
        self.batch_size = dataset.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.epoch_len is None:
            raise TypeError("endless ShardLoader has no length; pass epoch_len to make_loader")
        return self.epoch_len

    def __iter__(self) -> Iterator[dict]:
        self.dataset.epoch = self.epoch
        self.epoch += 1
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )
        it = _worker_errors_named(iter(loader)) if self.num_workers > 0 else iter(loader)
        if self.epoch_len is None:
            return it
        return itertools.islice(it, self.epoch_len)


def _worker_errors_named(batches: Iterator[dict]) -> Iterator[dict]:
    """Batches from DataLoader workers, with a shard error re-raised as its own message.

    torch re-raises a worker's exception as ``type(msg)`` with msg = "Caught X in DataLoader worker process
    N.\nOriginal Traceback ...", a worker traceback ending in the real message; keep just that message (it
    names the shard and the fix) and say where it came from.
    """
    try:
        yield from batches
        return
    except ShardError as err:
        cls, text = type(err), str(err)
        where = re.match(r"Caught \w+ (in .*?)\.\n", text)
        marker = f"{cls.__module__}.{cls.__qualname__}: "
        if where is None or marker not in text:
            raise
        # torch's reraise() leaves a frame <-> exception cycle that keeps the DataLoader iterator (and its
        # workers) alive until a gc run, possibly inside the next loader's forked workers; break it now
        traceback.clear_frames(err.__traceback__)
    clean = cls(f"{text.rsplit(marker, 1)[1].strip()} (raised {where[1]})")
    try:
        raise clean from None
    finally:  # nor a cycle of our own (this frame -> clean -> its traceback -> this frame)
        del clean, batches


def _counts_for(urls: Sequence[str], expected: Mapping[str, int] | None) -> dict[str, int]:
    """The expected sample count of each url, matched by path, else by file name (shards copied elsewhere);
    empty without ``expected``. A url without a count is a wiring mistake, not a shard to skip checking."""
    if expected is None:
        return {}
    by_path = {os.path.abspath(k): int(v) for k, v in expected.items()}
    by_name = {os.path.basename(k): int(v) for k, v in expected.items()}
    out = {}
    for u in urls:
        c = by_path.get(os.path.abspath(u), by_name.get(os.path.basename(u)))
        if c is None:
            raise ValueError(f"expected_counts has no entry for shard {u}; pass its manifest's counts")
        out[u] = c
    return out


def _check_urls(urls: Sequence[str] | str) -> list[str]:
    if isinstance(urls, str):
        urls = list(wds.shardlists.expand_urls(urls))
    urls = [os.fspath(u) for u in urls]
    if not urls:
        raise ShardDataError("no shard URLs given; point the data config at results/data/{dataset}/shards/*.tar")
    for u in urls:
        if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u):
            raise FileNotFoundError(f"shard {u} does not exist; build it first (snakemake results/data/...)")
    return urls


def make_loader(
    urls: Sequence[str] | str,
    crop_cfg: Any,
    aug_cfg: Any,
    batch_size: int,
    num_workers: int,
    seed: int,
    epoch_len: int | None,
    start_epoch: int = 0,
    shuffle_buffer: int = 1000,
    interleave: int = 64,
    expected_counts: Mapping[str, int] | None = None,
    render: str = "pil",
    decode: str = "cpu",
) -> ShardLoader:
    """Batches of ``{views: [Tensor(B,3,S_v,S_v)], label: LongTensor(B), fallbacks: LongTensor(B), iou, key, index}``; ``index``: LongTensor(B), each sample's position in the manifest order (-1 without counts).

    ``iou``: float64 (B,), the key/query IoU of each sample's source regions (``crop.max_iou`` is checked on it
    in the run's log); ``key``: the samples' ``__key__`` strings.

    ``crop_cfg``/``aug_cfg`` are the ``crop:``/``aug:`` config nodes (DictConfig or dict). Views 0 and 1 are
    ``crop.size`` square (0 is the key), views 2.. are ``crop.small_size``. Incomplete batches are dropped.
    ``interleave``: shards each reader reads at once, round robin (class mixing, see the module docstring);
    bounded because each is an open file. ``expected_counts``: samples per shard url from the manifest
    (``data_prep.shards.manifest_counts(shard_dir)`` or ``verify_shards(shard_dir).counts``); a shard read to
    its end with another count, or unreadable, raises ``ShardIntegrityError`` naming it and the fix.
    ``render`` (``data.render``): ``"pil"`` gives float32 normalised views with all colour augmentation done;
    ``"batched"`` gives uint8 views (crop, resize, flip only) plus ``autoaug``: per view a bool (B,) of the
    samples A+ AutoAugmented in the worker; apply ``study.colour.BatchColour`` on the training device.
    ``decode`` (``data.decode``): ``"device"`` (batched only, no A+) gives no ``views`` but the packed encoded
    images (``encoded``, ``offsets``, ``jpeg``, ``size``, ``url``) and the geometry (``boxes`` (B, V, 4) float
    source pixels, ``flips`` (B, V)); ``study.colour.device_views`` decodes them with ``study.decode``.
    """
    render = check_render(render)
    check_decode(decode, render, bool(aug_settings(aug_cfg)["aplus"]))
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    if epoch_len is not None and epoch_len < 1:
        raise ValueError(f"epoch_len must be None (endless) or >= 1, got {epoch_len}")
    urls = _check_urls(urls)
    world = wds.utils.pytorch_worker_info()[1]
    if len(urls) < world * max(1, num_workers):
        warnings.warn(
            f"{len(urls)} shards < {world} ranks x {max(1, num_workers)} workers: every reader scans all shards "
            "and keeps every n-th sample; write more shards (or use fewer workers) for full speed",
            stacklevel=2,
        )
    dataset = ShardStream(
        urls, crop_cfg, aug_cfg, batch_size, seed, shuffle_buffer, interleave, expected_counts, render, decode
    )
    return ShardLoader(dataset, num_workers, epoch_len, start_epoch)
