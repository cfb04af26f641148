"""The fine-tuned dense protocols (paper Tables 3 and 9): per task its splits, augmentation, loss and test metric.

A task hands ``analysis.finetune`` samples drawn with a given numpy generator (so a step's batch depends only
on the seed and the step: a resumed run sees exactly the batches an unbroken one would), a collate function,
the training loss and the evaluation on the test split. Recipes: REFERENCE.md "Transfer protocols".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from analysis import dense_metrics, metrics
from analysis.dense_models import FCN, FCRN, berhu_loss, faster_rcnn_c4
from analysis.targets import TargetError, load_split


def _pair(v: Any) -> tuple[int, int]:
    """(height, width) from an int or a [height, width] pair."""
    if isinstance(v, (list, tuple)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _normalise(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _crop_box(rng: np.random.Generator, hw: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int]:
    return int(rng.integers(0, hw[0] - crop[0] + 1)), int(rng.integers(0, hw[1] - crop[1] + 1))


def _pad_to(x: torch.Tensor, crop: tuple[int, int], value: float) -> torch.Tensor:
    ph, pw = max(crop[0] - x.shape[-2], 0), max(crop[1] - x.shape[-1], 0)
    return F.pad(x, (0, pw, 0, ph), value=value) if ph or pw else x


class Task:
    """Common interface; ``metric`` is the primary metric, ``lower_is_better`` its direction."""

    metric: str = ""
    lower_is_better: bool = False

    def __init__(self, name: str, cfg: Mapping[str, Any], s: Mapping[str, Any]) -> None:
        self.name, self.cfg, self.s = name, cfg, s
        self.train = load_split(name, cfg, "train")
        self.test = load_split(name, cfg, "test")
        if len(self.train) == 0 or len(self.test) == 0:
            raise TargetError(f"target {name!r}: empty train or test split")

    def build(self, backbone: nn.Module) -> nn.Module:
        raise NotImplementedError

    def sample(self, i: int, rng: np.random.Generator) -> Any:
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        return items

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, device: torch.device, progress: bool = False) -> dict[str, Any]:
        raise NotImplementedError


class SegmentationTask(Task):
    """FCN fine-tuning: random scale, flip and crop (pad with the mean and with ignore); whole-image test."""

    metric = "mIoU"

    def build(self, backbone: nn.Module) -> nn.Module:
        s = self.s
        return FCN(backbone, len(self.train.classes), int(s["head_channels"]), int(s["head_dilation"]),
                   bool(s["dilate"]))  # fmt: skip

    def sample(self, i: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s
        img, mask = self.train.load(i), self.train.load_mask(i)
        lo, hi = (float(v) for v in s["scale_range"])
        f = float(rng.uniform(lo, hi))
        size = (max(1, round(img.width * f)), max(1, round(img.height * f)))
        img = img.resize(size, Image.BILINEAR)
        m = Image.fromarray(mask.astype(np.uint8)).resize(size, Image.NEAREST)
        x, y = _normalise(img, s["mean"], s["std"]), torch.from_numpy(np.asarray(m, dtype=np.int64).copy())
        if rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        crop = _pair(s["crop_size"])
        x, y = _pad_to(x, crop, 0.0), _pad_to(y, crop, 255)  # 0 after normalisation = the mean colour
        top, left = _crop_box(rng, tuple(x.shape[-2:]), crop)
        return x[:, top:top + crop[0], left:left + crop[1]], y[top:top + crop[0], left:left + crop[1]]

    def collate(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x.to(device)).float(), y.to(device), ignore_index=255)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, progress: bool = False) -> dict[str, Any]:
        n = len(self.test.classes)
        conf = np.zeros((n, n), np.int64)
        for i in tqdm(range(len(self.test)), desc=f"{self.name} test", disable=not progress):
            x = _normalise(self.test.load(i), self.s["mean"], self.s["std"])[None].to(device)
            pred = model(x).float().argmax(1)[0].cpu().numpy()
            gt = self.test.load_mask(i)
            if gt.shape != pred.shape:
                raise TargetError(f"target {self.name!r}: mask {i} is {gt.shape}, image {pred.shape}")
            conf += metrics.confusion_matrix(pred, gt, n)
        iou = metrics.iou_per_class(conf)
        return {"mIoU": metrics.mean_iou(conf), "pixel_acc": float(np.trace(conf) / max(conf.sum(), 1)),
                "per_class_IoU": [None if np.isnan(v) else float(v) for v in iou]}  # fmt: skip


class DetectionTask(Task):
    """Faster R-CNN C4 fine-tuning: horizontal flip + multi-scale training (the model's transform); difficult
    objects are trained on (detectron2's VOC loader keeps them) and ignored by the AP."""

    metric = "AP50"

    def build(self, backbone: nn.Module) -> nn.Module:
        s = self.s
        return faster_rcnn_c4(
            backbone, len(self.train.classes), min_size=[int(v) for v in s["min_size_train"]],
            max_size=int(s["max_size"]), anchor_sizes=s["anchor_sizes"], mean=s["mean"], std=s["std"],
            box_detections_per_img=int(s["detections_per_img"]), box_score_thresh=float(s["score_thresh"]),
            rpn_pre_nms_top_n_train=int(s["rpn_pre_nms_train"]), rpn_post_nms_top_n_train=int(s["rpn_post_nms_train"]),
            rpn_pre_nms_top_n_test=int(s["rpn_pre_nms_test"]), rpn_post_nms_top_n_test=int(s["rpn_post_nms_test"]),
            rpn_batch_size_per_image=int(s["rpn_batch_per_image"]),
            box_batch_size_per_image=int(s["roi_batch_per_image"]),
        )  # fmt: skip

    def _image(self, split: Any, i: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(split.load(i), dtype=np.float32) / 255.0).permute(2, 0, 1)

    def sample(self, i: int, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self._image(self.train, i)
        boxes = torch.as_tensor(self.train.boxes[i], dtype=torch.float32).reshape(-1, 4)
        if rng.random() < 0.5:
            w = x.shape[-1]
            x, boxes = x.flip(-1), torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        return x, {"boxes": boxes, "labels": torch.as_tensor(self.train.labels[i], dtype=torch.int64)}

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        images = [x.to(device) for x, _ in batch]
        targets = [{k: v.to(device) for k, v in t.items()} for _, t in batch]
        return sum(model(images, targets).values())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, progress: bool = False) -> dict[str, Any]:
        inner = model.module if hasattr(model, "module") else model
        inner.transform.min_size = (int(self.s["min_size_test"]),)
        preds, gts = [], []
        for i in tqdm(range(len(self.test)), desc=f"{self.name} test", disable=not progress):
            out = model([self._image(self.test, i).to(device)])[0]
            preds.append({k: out[k].float().cpu().numpy() if k != "labels" else out[k].cpu().numpy()
                          for k in ("boxes", "scores", "labels")})  # fmt: skip
            gts.append({"boxes": self.test.boxes[i], "labels": self.test.labels[i],
                        "difficult": self.test.difficult[i]})  # fmt: skip
        res = dense_metrics.detection_ap(preds, gts, len(self.test.classes),
                                         use_07_metric=bool(self.s["use_07_metric"]))  # fmt: skip
        res["detections"] = int(sum(len(p["scores"]) for p in preds))
        return res


class DepthTask(Task):
    """FCRN fine-tuning with the berHu loss on valid pixels (depth > 0): flip and random crop."""

    metric = "rmse"
    lower_is_better = True

    def build(self, backbone: nn.Module) -> nn.Module:
        return FCRN(backbone, self.s["decoder_channels"], int(self.s["n_up"]))

    def _pair(self, split: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, depth = split.load(i), np.asarray(split.load_depth(i), np.float32)
        f = float(self.s["resize"])
        if f != 1.0:
            size = (max(1, round(img.width * f)), max(1, round(img.height * f)))
            img = img.resize(size, Image.BILINEAR)
            depth = np.asarray(Image.fromarray(depth.astype(np.float32)).resize(size, Image.NEAREST), np.float32)
        return _normalise(img, self.s["mean"], self.s["std"]), torch.from_numpy(depth.copy())

    def sample(self, i: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, d = self._pair(self.train, i)
        if rng.random() < 0.5:
            x, d = x.flip(-1), d.flip(-1)
        if self.s["crop_size"] is not None:
            crop = _pair(self.s["crop_size"])
            x, d = _pad_to(x, crop, 0.0), _pad_to(d, crop, 0.0)  # padded depth 0 = invalid
            top, left = _crop_box(rng, tuple(x.shape[-2:]), crop)
            x, d = x[:, top:top + crop[0], left:left + crop[1]], d[top:top + crop[0], left:left + crop[1]]
        return x, d

    def collate(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        x, d = (t.to(device) for t in batch)
        return berhu_loss(model(x).float(), d, d > 0)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, progress: bool = False) -> dict[str, Any]:
        meter = dense_metrics.DepthMeter()
        for i in tqdm(range(len(self.test)), desc=f"{self.name} test", disable=not progress):
            x, d = self._pair(self.test, i)
            meter.update(model(x[None].to(device)).float()[0].cpu(), d)
        return meter.compute()


TASKS: dict[str, Callable[..., Task]] = {
    "finetune_seg": SegmentationTask,
    "finetune_det": DetectionTask,
    "finetune_depth": DepthTask,
}
