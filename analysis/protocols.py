"""Transfer protocols on frozen features; each returns ``{metric: value, ..., "settings": {...}}``.

The functions take feature tensors, not checkpoints, so they are testable on hand-made features and reusable
for any backbone; ``analysis.transfer`` wires them to the feature cache and the target readers. Metrics are
fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from analysis import metrics
from analysis.target_settings import DEFAULT_SUBSET_CLASSES, DEFAULT_WD_GRID


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _check_nonempty(name: str, *arrays: torch.Tensor | np.ndarray | Sequence) -> None:
    for a in arrays:
        if len(a) == 0:
            raise ValueError(f"{name}: a split has no sample; check the target's split lists")


# ------------------------------------------------------------------------------------------ linear probe


@dataclass
class LinearProbe:
    """Logistic regression on standardised features; ``effective_weight`` folds the standardisation in so
    ``logits = x @ effective_weight.T + effective_bias`` on raw features (what CAMs need)."""

    weight: torch.Tensor  # (C, D), on standardised features
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight_decay: float
    val_scores: dict[str, float]
    multilabel: bool

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float().to(self.weight.device) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    @property
    def effective_weight(self) -> torch.Tensor:
        return self.weight / self.std

    @property
    def effective_bias(self) -> torch.Tensor:
        return self.bias - (self.weight * (self.mean / self.std)).sum(1)


def _loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y)


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    multilabel: bool,
    max_iter: int = 300,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS on mean cross-entropy (softmax, or one-vs-rest sigmoid) + wd/2 * ||W||^2."""
    w = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-7, tolerance_change=1e-10,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(x @ w.T + b, y, multilabel) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _score(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> float:
    if multilabel:
        yy = y.cpu().numpy()
        if not (yy > 0).any():
            return float("nan")
        return metrics.mean_average_precision(logits.cpu().numpy(), yy)[0]
    return metrics.top1_accuracy(logits.cpu(), y.cpu())


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    *,
    multilabel: bool = False,
    wd_grid: Sequence[float] = DEFAULT_WD_GRID,
    val_fraction: float = 0.2,
    max_iter: int = 300,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> LinearProbe:
    """Select weight decay on a seeded held-out part of train (best metric, then lowest held-out loss), then
    refit on all of train with it."""
    _check_nonempty("linear probe", train_x)
    dev = _device(device)
    x = train_x.float().to(dev)
    y = torch.as_tensor(train_y).to(dev)
    y = y.float() if multilabel else y.long()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    xs = (x - mean) / std
    grid = [float(w) for w in wd_grid]
    if not grid:
        raise ValueError("linear probe: wd_grid is empty; give at least one weight decay")
    val_scores: dict[str, float] = {}
    best = grid[len(grid) // 2]
    n = x.shape[0]
    n_val = int(round(val_fraction * n))
    if len(grid) > 1 and n >= 4 and 0 < n_val < n:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(dev)
        va, tr = perm[:n_val], perm[n_val:]
        best_key = None
        for wd in grid:
            w, b = fit_logistic(xs[tr], y[tr], num_classes, wd, multilabel, max_iter)
            logits = xs[va] @ w.T + b
            score = _score(logits, y[va], multilabel)
            vloss = float(_loss(logits, y[va], multilabel))
            val_scores[f"{wd:g}"] = score
            key = (-math.inf if math.isnan(score) else score, -vloss)
            if best_key is None or key > best_key:
                best_key, best = key, wd
    w, b = fit_logistic(xs, y, num_classes, best, multilabel, max_iter)
    return LinearProbe(w, b, mean, std, best, val_scores, multilabel)


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    *,
    multilabel: bool = False,
    wd_grid: Sequence[float] = DEFAULT_WD_GRID,
    val_fraction: float = 0.2,
    max_iter: int = 300,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict:
    """Linear classification on frozen features: top-1 (single-label) or mAP (multi-label)."""
    _check_nonempty("linear probe", train_x, test_x)
    probe = train_linear_probe(
        train_x, train_y, num_classes, multilabel=multilabel, wd_grid=wd_grid, val_fraction=val_fraction,
        max_iter=max_iter, seed=seed, device=device,
    )  # fmt: skip
    with torch.no_grad():
        logits = probe.logits(test_x).cpu()
    settings = {
        "multilabel": multilabel, "wd_grid": list(wd_grid), "val_fraction": val_fraction, "max_iter": max_iter,
        "seed": seed, "weight_decay": probe.weight_decay, "val_scores": probe.val_scores, "optimizer": "lbfgs",
    }  # fmt: skip
    if multilabel:
        m, aps = metrics.mean_average_precision(logits.numpy(), np.asarray(test_y))
        return {
            "mAP": m,
            "ap_per_class": [None if np.isnan(a) else float(a) for a in aps],
            "settings": settings,
        }
    return {"top1": metrics.top1_accuracy(logits, torch.as_tensor(test_y)), "settings": settings}


# ----------------------------------------------------------------------------------------------------- kNN


def knn_classify(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    device: str | torch.device | None = None,
) -> dict:
    """Weighted kNN top-1 (cosine, exp(sim / T) votes)."""
    _check_nonempty("kNN", train_x, test_x)
    dev = _device(device)
    votes = metrics.knn_predict(
        train_x.to(dev), torch.as_tensor(train_y).to(dev), test_x.to(dev), num_classes, k, temperature
    )
    return {
        "top1": metrics.top1_accuracy(votes.cpu(), torch.as_tensor(test_y)),
        "settings": {"k": k, "temperature": temperature, "k_used": min(k, len(train_x))},
    }


# ---------------------------------------------------------------------------------------------- VOC07 SVM


def voc07_svm(
    train_x: torch.Tensor,
    train_y: np.ndarray,
    test_x: torch.Tensor,
    test_y: np.ndarray,
    *,
    cost: float = 0.5,
    pos_weight: float = 2.0,
    max_iter: int = 2000,
    ap: str = "voc",
) -> dict:
    """One LinearSVC per class on L2-normalised features (public VOC07 SVM benchmark); mAP on test.

    Labels are (N, C) in {0, 1} with difficult already negative. ``ap``: "voc" = interpolated all-points AP
    (the public code), "sklearn" = non-interpolated.
    """
    from sklearn.svm import LinearSVC

    _check_nonempty("VOC07 SVM", train_x, test_x)
    if ap not in ("voc", "sklearn"):
        raise ValueError(f"voc07_svm: ap must be 'voc' or 'sklearn', got {ap!r}")
    xtr = F.normalize(train_x.float(), dim=1).numpy()
    xte = F.normalize(test_x.float(), dim=1).numpy()
    ytr, yte = np.asarray(train_y), np.asarray(test_y)
    scores = np.zeros((len(xte), ytr.shape[1]))
    skipped = []
    for c in range(ytr.shape[1]):
        yc = np.where(ytr[:, c] > 0, 1, -1)
        if len(np.unique(yc)) < 2:
            skipped.append(c)
            continue
        svm = LinearSVC(
            C=cost,
            class_weight={1: pos_weight, -1: 1},
            loss="squared_hinge",
            max_iter=max_iter,
            random_state=0,
        )
        svm.fit(xtr, yc)
        scores[:, c] = svm.decision_function(xte)
    keep = [c for c in range(ytr.shape[1]) if c not in skipped]
    if not keep:
        raise ValueError("voc07_svm: no class has both positives and negatives in the train split")
    m, aps = metrics.mean_average_precision(scores[:, keep], yte[:, keep], interpolated=(ap == "voc"))
    per_class: list[float | None] = [None] * ytr.shape[1]
    for c, a in zip(keep, aps, strict=True):
        per_class[c] = None if np.isnan(a) else float(a)
    return {
        "mAP": m,
        "ap_per_class": per_class,
        "settings": {
            "C": cost, "class_weight": {"1": pos_weight, "-1": 1}, "loss": "squared_hinge", "max_iter": max_iter,
            "ap": ap, "l2_normalised": True, "classes_without_train_positives": skipped,
        },
    }  # fmt: skip


# ------------------------------------------------------------------------------------ segment retrieval


def kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Seeded k-means (k-means++ init, Lloyd steps) on rows of ``x``; returns cluster ids (n,)."""
    n = x.shape[0]
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    centres = [x[torch.randint(n, (1,), generator=g).item()]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        if d2.sum() <= 0:  # fewer distinct points than k: the remaining clusters would be duplicates
            break
        i = torch.multinomial(d2.cpu() / d2.sum().cpu(), 1, generator=g).item()
        centres.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = torch.stack(centres)
    assign = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=len(c)).unsqueeze(1).to(x.dtype)
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)  # an emptied cluster keeps its centre
        new_assign = torch.cdist(x, c).argmin(1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return assign


def _regions(
    feat: torch.Tensor, k: int, iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segments of one (C, h, w) map: (assign (h*w,), region ids (r,), descriptors (r, C) L2-normalised)."""
    emb = F.normalize(feat.float().flatten(1).T, dim=1)
    assign = kmeans(emb, k, iters, seed)
    ids = torch.unique(assign)
    desc = torch.stack([emb[assign == r].mean(0) for r in ids])
    return assign, ids, F.normalize(desc, dim=1)


def _segments_at(assign: torch.Tensor, fhw: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A segment map at feature resolution resized (nearest) to the ground-truth size."""
    t = assign.reshape(1, 1, *fhw).float()
    return F.interpolate(t, size=size, mode="nearest")[0, 0].long().numpy()


def _vote(seg: np.ndarray, gt: np.ndarray, ids: torch.Tensor, nc: int, skip: set[int]) -> list[int | None]:
    """Majority ground-truth class of each segment's pixels, ``skip`` classes left out of the vote; None when
    no pixel remains. Ties go to the highest class id, as MaskContrast's ``max((count, class))``."""
    n_seg = int(seg.max()) + 1
    counts = np.bincount(seg.ravel() * 256 + gt.ravel(), minlength=n_seg * 256).reshape(n_seg, 256)[:, :nc]
    counts[:, [c for c in skip if c < nc]] = 0
    out: list[int | None] = []
    for r in ids.tolist():
        out.append(int(nc - 1 - np.argmax(counts[r, ::-1])) if counts[r].any() else None)
    return out


def segment_retrieval(
    train_feats: torch.Tensor | Sequence[torch.Tensor],
    train_masks: Sequence[np.ndarray],
    val_feats: torch.Tensor | Sequence[torch.Tensor],
    val_masks: Sequence[np.ndarray],
    *,
    classes: Sequence[str],
    subset_classes: Sequence[str] = DEFAULT_SUBSET_CLASSES,
    n_segments: int = 15,
    kmeans_iters: int = 30,
    seed: int = 0,
    ignore_index: int = 255,
    background: str = "keep",
) -> dict:
    """Semantic segment retrieval (paper Table 6) scored in two settings, each with its own memory bank.

    Per image, K-means on the L2-normalised spatial embeddings gives segments; a segment's descriptor is the
    mean embedding inside it. A train segment's label is the majority ground-truth class of its pixels at
    ground-truth resolution (segment map resized nearest), ``ignore_index`` left out of the vote and segments
    without a voting pixel left out of the bank (MaskContrast ``segmentation/utils/retrieval_utils.py``,
    ``build_memory_bank``). Each val segment takes the label of its most similar (cosine) bank segment.

    - ``mIoU_<all>``: all classes, the mean over every class incl. background (MaskContrast's 21-class config
      ``retrieval_..._21_classes.yml``, ``ignore_classes: []``, ``meter.return_score``);
    - ``mIoU_<subset>``: the classes not in ``subset_classes`` (nor background) become ``ignore_index`` in the
      train and the val ground truth before the bank is built and before scoring (MaskContrast
      ``segmentation/data/dataloaders/pascal_voc.py``, ``_load_semseg``), so they are neither bank labels nor
      false positives; the mean runs over ``subset_classes`` only, background left out
      (``retrieval``: ``ignore_classes = [0] + val_dataset.ignore_classes``).

    ``background``: MaskContrast votes over object classes only (``class_ not in [0, 255]``) because its
    segments are saliency masks and the non-salient pixels are predicted background. K-means segments tile the
    whole image, so by default (``"keep"``) background votes like a class and can be retrieved; ``"drop"``
    applies MaskContrast's vote literally (background never a bank label, hence never predicted).
    """
    _check_nonempty("segment retrieval", train_feats, val_feats)
    if len(train_feats) != len(train_masks) or len(val_feats) != len(val_masks):
        raise ValueError("segment retrieval: features and masks differ in number")
    unknown = [c for c in subset_classes if c not in classes]
    if unknown:
        raise ValueError(
            f"segment retrieval: subset_classes {unknown} are not among the classes {list(classes)}"
        )
    if background not in ("keep", "drop"):
        raise ValueError(f"segment retrieval: background must be 'keep' or 'drop', got {background!r}")
    nc = len(classes)
    bg = list(classes).index("background") if "background" in classes else None
    if background == "drop" and bg is None:
        raise ValueError("segment retrieval: background='drop' needs a 'background' class")
    subset_idx = [list(classes).index(c) for c in subset_classes]
    train_regions = [_regions(f, n_segments, kmeans_iters, seed + i) for i, f in enumerate(train_feats)]
    val_regions = [_regions(f, n_segments, kmeans_iters, seed + 100_003 + i) for i, f in enumerate(val_feats)]
    grids = [tuple(f.shape[-2:]) for f in train_feats], [tuple(f.shape[-2:]) for f in val_feats]

    def run(keep: set[int]) -> tuple[np.ndarray, int]:
        """Bank from the train ground truth with classes outside ``keep`` set to ignore; val confusion."""
        lut = np.full(256, ignore_index, dtype=np.int64)
        lut[sorted(keep)] = sorted(keep)
        skip = {ignore_index} | ({bg} if background == "drop" else set())
        bank, labels = [], []
        for (assign, ids, desc), fhw, mask in zip(train_regions, grids[0], train_masks, strict=True):
            gt = lut[np.asarray(mask)]
            votes = _vote(_segments_at(assign, fhw, gt.shape), gt, ids, nc, skip)
            for d, v in zip(desc, votes, strict=True):
                if v is not None:
                    bank.append(d)
                    labels.append(v)
        if not bank:
            raise ValueError("segment retrieval: no train region has a voting ground-truth label")
        bank_t, bank_l = torch.stack(bank), torch.tensor(labels)
        conf = np.zeros((nc, nc), dtype=np.int64)
        for (assign, ids, desc), fhw, mask in zip(val_regions, grids[1], val_masks, strict=True):
            gt = lut[np.asarray(mask)]
            seg_lut = torch.zeros(int(assign.max()) + 1, dtype=torch.long)
            seg_lut[ids] = bank_l[(desc @ bank_t.T).argmax(1)]
            pred = seg_lut.numpy()[_segments_at(assign, fhw, gt.shape)]
            conf += metrics.confusion_matrix(pred, gt, nc, ignore_index)
        return conf, len(labels)

    conf_all, n_bank_all = run(set(range(nc)))
    conf_sub, n_bank_sub = run(set(subset_idx) | ({bg} if bg is not None else set()))
    iou_all, iou_sub = metrics.iou_per_class(conf_all), metrics.iou_per_class(conf_sub)
    return {
        f"mIoU_{nc}": metrics.mean_iou(conf_all),
        f"mIoU_{len(subset_idx)}": metrics.mean_iou(conf_sub, subset_idx),
        "iou_per_class": {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, iou_all, strict=True)},
        f"iou_per_class_{len(subset_idx)}": {
            classes[i]: (None if np.isnan(iou_sub[i]) else float(iou_sub[i])) for i in subset_idx
        },
        "settings": {
            "n_segments": n_segments, "kmeans_iters": kmeans_iters, "seed": seed, "subset_classes": list(subset_classes),
            "n_train_regions": n_bank_all, f"n_train_regions_{len(subset_idx)}": n_bank_sub,
            "region_label": "majority of the segment's ground-truth pixels at ground-truth resolution, void "
            "excluded" + (", background excluded (MaskContrast vote)" if background == "drop" else
                          ", background votes as a class"),
            "background": background,
            "subset_rule": "other classes -> ignore in bank and val ground truth; mean over the subset, "
            "background excluded (MaskContrast retrieval)",
        },
    }  # fmt: skip


# ---------------------------------------------------------------------------------- video propagation


def context_frames(t: int, context: int) -> list[int]:
    """Key frames of target frame ``t``: frame 0 (videowalk's long memory, ``--long-mem 0``) and then the
    ``context`` frames before ``t``, where the missing history of the first frames is frame 0 repeated.

    videowalk pads a video with ``videoLen`` copies of frame 0 (``code/data/vos.py``, ``make_paths``:
    ``i = max(0, i - self.videoLen)``) and gives padded query ``t + n`` the keys ``t .. t + n - 1``
    (``code/utils/test_utils.py``, ``context_index_bank``), i.e. real frames ``max(0, t - n + i)``.
    """
    return [0, *(max(0, t - context + i) for i in range(context))]


def radius_mask(h: int, w: int, radius: float) -> torch.Tensor:
    """(hw, hw) True where two cells of an h x w grid are strictly closer than ``radius`` (Euclidean, in
    cells): videowalk ``code/utils/__init__.py``, ``MaskedAttention.make``: ``D = (D < self.radius)``."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1).float()
    return torch.cdist(pos, pos) < radius


@torch.no_grad()
def propagate_soft(
    feats: torch.Tensor,
    first_labels: np.ndarray,
    n_labels: int,
    *,
    topk: int = 10,
    context: int = 20,
    radius: float = 12,
    temperature: float = 0.05,
    chunk: int = 512,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Label distributions at feature resolution, (T, n_labels, h, w), propagated as ajabri/videowalk's
    ``code/test.py`` does (its ``mem_efficient_batched_affinity`` in ``code/utils/test_utils.py``):

    - keys of frame t are ``context_frames(t, context)``: frame 0 plus the previous ``context`` frames, the
      start of the video padded with copies of frame 0 (so early frames weigh frame 0 several times);
    - affinity = dot product of L2-normalised features / ``temperature``; the ``radius_mask`` (strictly
      ``< radius``) restricts the recent frames only, never the long-memory frame 0
      (``A[0, :, len(long_mem):] += mask``);
    - the top-k affinities over all keys are softmaxed and average the keys' label distributions; predicted
      distributions (not argmaxed, ``--norm_mask`` off) are the labels of later frames;
    - frame 0's distribution is its one-hot labels resized bilinearly (half-pixel centres, no antialias) to
      the feature grid, as ``code/data/vos.py`` does with ``cv2.resize`` (INTER_LINEAR) of the one-hot map.
    """
    dev = _device(device)
    t_len, _, h, w = feats.shape
    emb = F.normalize(feats.to(dev).float(), dim=1).flatten(2).transpose(1, 2)  # (T, hw, C)
    onehot = (
        F.one_hot(torch.from_numpy(np.asarray(first_labels, np.int64)), n_labels).permute(2, 0, 1).float()
    )
    first = F.interpolate(onehot[None], size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    probs = [first[0].flatten(1).T.to(dev)]  # (hw, L)
    within = radius_mask(h, w, radius).to(dev)  # (hw, hw)
    for t in range(1, t_len):
        ctx = context_frames(t, context)
        keys = emb[ctx]  # (m, hw, C); frame 0 first, unmasked
        labels = torch.cat([probs[i] for i in ctx])  # (m*hw, L)
        out = []
        for s in range(0, h * w, chunk):
            sim = torch.einsum("bc,mkc->bmk", emb[t, s : s + chunk], keys) / temperature
            sim[:, 1:] = sim[:, 1:].masked_fill(~within[s : s + chunk, None, :], float("-inf"))
            vals, idx = sim.flatten(1).topk(min(topk, sim.shape[1] * sim.shape[2]), dim=1)
            wts = torch.softmax(vals, dim=1)
            out.append((wts.unsqueeze(2) * labels[idx]).sum(1))
        probs.append(torch.cat(out))
    return torch.stack([p.T.reshape(n_labels, h, w) for p in probs]).cpu()


def propagate_labels(
    feats: torch.Tensor,
    first_labels: np.ndarray,
    n_labels: int,
    out_size: tuple[int, int],
    *,
    topk: int = 10,
    context: int = 20,
    radius: float = 12,
    temperature: float = 0.05,
    chunk: int = 512,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Videowalk label propagation with frozen features (rules: ``propagate_soft``).

    ``feats`` (T, C, h, w); ``first_labels`` (H0, W0) ints in [0, n_labels). The distributions are upsampled
    bilinearly to ``out_size`` and argmaxed (videowalk ``dump_predictions``: ``cv2.resize`` then argmax).
    Returns (T, H, W) int64; frame 0 is the given labels when they have ``out_size``. The affinities are
    dense (T x hw x (context + 1) * hw): run it on a GPU at DAVIS scale.
    """
    maps = propagate_soft(
        feats, first_labels, n_labels, topk=topk, context=context, radius=radius, temperature=temperature,
        chunk=chunk, device=device,
    )  # fmt: skip
    up = F.interpolate(maps, size=out_size, mode="bilinear", align_corners=False)
    pred = up.argmax(1).numpy()
    if tuple(np.shape(first_labels)) == tuple(out_size):
        pred[0] = first_labels  # the given frame is not a prediction
    return pred


def davis_scores(
    preds: Sequence[np.ndarray],
    gts: Sequence[np.ndarray | None],
    object_ids: Sequence[int],
    *,
    bound_th: float = 0.008,
    exclude_last: bool = True,
    void_label: int | None = 255,
) -> tuple[list[float], list[float]]:
    """Per-object mean J and F of one video over frames 1..T-1 (the DAVIS-2017 toolkit also drops the last
    frame: ``exclude_last``, ``all_gt_masks[:, 1:-1]`` in ``davis2017/evaluation.py``); frames without a
    ground-truth file are skipped.

    Ground-truth pixels equal to ``void_label`` are excluded from J and F (``void_masks = gt == 255`` passed
    to ``db_eval_iou`` / ``db_eval_boundary`` in ``_evaluate_semisupervised``). ``void_label=None`` scores
    them as background instead, which is what the released toolkit ends up doing: ``davis2017/davis.py``
    ``_get_all_elements`` sets 255 to 0 before that void mask is taken, so the mask is always empty there.
    """
    end = len(preds) - 1 if exclude_last else len(preds)
    frames = [f for f in range(1, end) if gts[f] is not None]
    if not frames:
        raise ValueError(
            "DAVIS: a video has no annotated frame to score after the first one (need >= 3 frames)"
        )
    j_obj, f_obj = [], []
    for o in object_ids:
        js, fs = [], []
        for f in frames:
            gt, pr = np.asarray(gts[f]), np.asarray(preds[f])
            void = gt == void_label if void_label is not None else None
            js.append(metrics.region_similarity(pr == o, gt == o, void))
            fs.append(metrics.contour_accuracy(pr == o, gt == o, bound_th, void))
        j_obj.append(float(np.mean(js)))
        f_obj.append(float(np.mean(fs)))
    return j_obj, f_obj


def davis_instances(first: np.ndarray, void_label: int = 255) -> tuple[np.ndarray, int, bool]:
    """How to read one video's annotation values: (lut (256,) raw value -> 0 background, 1..n objects,
    ``void_label`` kept; n; binary).

    DAVIS-2017 annotations are palette indices, 0 background, 1..n objects, ``void_label`` void. A first frame
    whose values are only {0, 255} with some 255 is a DAVIS-2016-style binary mask: 255 is then the one object
    (and no pixel is void), so the video is scored rather than found object-less."""
    values = {int(v) for v in np.unique(first)}
    lut = np.zeros(256, dtype=np.int64)
    if values <= {0, 255} and 255 in values:
        lut[255] = 1
        return lut, 1, True
    ids = sorted(values - {0, void_label})
    lut[ids] = np.arange(1, len(ids) + 1)
    lut[void_label] = void_label
    return lut, len(ids), False


def summarise_davis(per_video: dict[str, tuple[list[float], list[float]]], settings: dict) -> dict:
    """J&F mean over all objects of all videos (DAVIS-2017 semi-supervised convention)."""
    j = [v for js, _ in per_video.values() for v in js]
    f = [v for _, fs in per_video.values() for v in fs]
    if not j:
        raise ValueError("DAVIS: no object found in any first-frame annotation")
    jm, fm = float(np.mean(j)), float(np.mean(f))
    return {
        "JF_mean": (jm + fm) / 2, "J_mean": jm, "F_mean": fm, "n_objects": len(j),
        "per_video": {k: {"J": float(np.mean(a)), "F": float(np.mean(b))} for k, (a, b) in per_video.items()},
        "settings": settings,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------- CAMs


def class_activation_maps(maps: torch.Tensor, weight: torch.Tensor, class_idx: Sequence[int]) -> np.ndarray:
    """CAM_c = sum_k w_ck A_k on layer4 maps (n, D, h, w) with linear-probe weights on raw pooled features
    (``LinearProbe.effective_weight``); returned min-max normalised to [0, 1] per image, (n, h, w)."""
    w = weight.float().cpu()[torch.as_tensor(list(class_idx), dtype=torch.long)]  # (n, D)
    cam = torch.einsum("nd,ndhw->nhw", w, maps.float().cpu())
    lo = cam.flatten(1).min(1).values[:, None, None]
    hi = cam.flatten(1).max(1).values[:, None, None]
    return ((cam - lo) / (hi - lo).clamp_min(1e-12)).numpy()


def one_image_per_class(ids: Sequence[str], labels: np.ndarray, n: int, n_classes: int | None = None) -> list[int]:
    """Indices of one image per class for the CAM figure, class by class (the paper's Fig. 6 shows one object
    class per column): for the first ``n`` classes in class-index order that have an image, the image whose id
    sorts first among that class's images not yet picked. Picking by class rather than by file order keeps a
    split stored class by class from filling every column with its first class.

    ``labels``: (N,) class indices, or (N, C) {0, 1} for multi-label splits (an image counts for each of its
    classes but is picked once).
    """
    labels = np.asarray(labels)
    if len(ids) != len(labels):
        raise ValueError(f"{len(ids)} ids but {len(labels)} labels")
    if labels.ndim == 2:
        member = labels > 0
    else:
        c = int(n_classes if n_classes is not None else (labels.max() + 1 if labels.size else 0))
        member = labels[:, None] == np.arange(c)[None, :]
    order = sorted(range(len(ids)), key=lambda i: str(ids[i]))
    picked: list[int] = []
    for c in range(member.shape[1]):
        if len(picked) >= n:
            break
        hit = next((i for i in order if member[i, c] and i not in picked), None)
        if hit is not None:
            picked.append(hit)
    return picked
