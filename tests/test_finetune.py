"""Fine-tuned dense transfer: the models' structure, the schedule, and a killed run resuming exactly."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

from analysis import finetune, finetune_tasks
from analysis.dense_models import FCN, FCRN, berhu_loss, dilate_layer4, faster_rcnn_c4
from analysis.targets import TargetError
from data_prep.synthetic import make_world, tiny_spec
from study.models import build_backbone, load_backbone


def make_checkpoint(path, seed=0, width=8):
    torch.manual_seed(seed)
    net, feat_dim = build_backbone("resnet18", small_input=True, width=width)
    torch.save({"backbone": net.state_dict(), "arch": "resnet18", "small_input": True, "feat_dim": feat_dim,
                "width": width}, path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), tiny_spec(), only=["voc", "nyud"])


def test_dilation_matches_torchvision_rule():
    """Our in-place dilation of a loaded ResNet-50 equals torchvision's replace_stride_with_dilation layout."""
    ours = dilate_layer4(torchvision.models.resnet50(weights=None))
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True])
    convs = {n: (m.stride, m.dilation, m.padding) for n, m in ref.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert {n: (m.stride, m.dilation, m.padding) for n, m in ours.named_modules()
            if isinstance(m, torch.nn.Conv2d)} == convs  # fmt: skip


def test_fcn_keeps_layer3_resolution_and_loaded_weights(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pt")
    net, _ = load_backbone(ckpt)
    w = net.layer4[0].conv1.weight.clone()
    model = FCN(net, n_classes=5, head_channels=16, head_dilation=2)
    x = torch.randn(2, 3, 40, 48)
    assert model(x).shape == (2, 5, 40, 48)
    assert model.trunk(x).shape[-2:] == (10, 12)  # stride 4: layer4 at layer3's stride (small-input stem)
    assert torch.equal(model.trunk.layer4[0].conv1.weight, w)


def test_faster_rcnn_c4_shares_the_backbone_and_trains(tmp_path):
    net, _ = load_backbone(make_checkpoint(tmp_path / "c.pt"))
    layer4 = net.layer4
    model = faster_rcnn_c4(net, n_classes=3, min_size=64, max_size=96, anchor_sizes=(8, 16, 32))
    assert model.roi_heads.box_head.res5 is layer4  # the box head is the pretrained layer4 (C4 layout)
    assert model.backbone.out_channels == 32  # layer3 of the width-8 ResNet-18
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # fmt: skip
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 64, 80)], targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_fcrn_output_size_and_berhu_by_hand(tmp_path):
    net, _ = load_backbone(make_checkpoint(tmp_path / "c.pt"))
    assert FCRN(net, decoder_channels=16, n_up=3)(torch.randn(2, 3, 48, 64)).shape == (2, 48, 64)
    pred, gt = torch.tensor([1.1, 2.0, 5.0]), torch.tensor([1.0, 3.0, 0.0])
    # residuals 0.1 and 1.0 (the third pixel is invalid): c = 0.2; 0.1 -> 0.1, 1.0 -> (1 + 0.04) / 0.4 = 2.6
    assert berhu_loss(pred, gt, gt > 0).item() == pytest.approx((0.1 + 2.6) / 2)


# where the data is and the input size: every target names them (analysis.target_settings)
SEG = {"format": "voc_seg", "root": "unused", "crop_size": 32}
DET = {"format": "voc_det", "root": "unused", "min_size_train": [72], "min_size_test": 72, "max_size": 128}
DEPTH = {"format": "nyud_depth", "root": "unused", "resize": 1.0, "crop_size": None}


def test_lr_schedules_by_hand():
    s = finetune.resolve_settings({"protocol": "finetune_det", "lr": 0.02, "milestones": [6, 8], "warmup_steps": 2, **DET})
    assert finetune.lr_at(0, 10, s) == pytest.approx(0.02 * 1e-3)
    assert finetune.lr_at(1, 10, s) == pytest.approx(0.02 * (1e-3 * 0.5 + 0.5))
    assert [finetune.lr_at(k, 10, s) for k in (5, 6, 8)] == pytest.approx([0.02, 0.002, 0.0002])
    p = finetune.resolve_settings({"protocol": "finetune_seg", "lr": 0.01, **SEG})
    assert finetune.lr_at(5, 10, p) == pytest.approx(0.01 * 0.5**0.9)


def test_batches_cover_each_epoch_once_and_depend_on_the_step_only():
    stream = [i for k in range(5) for i, _ in finetune.batch_slots(k, 4, 10, seed=3)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert finetune.batch_slots(3, 4, 10, seed=3) == finetune.batch_slots(3, 4, 10, seed=3)
    assert finetune.batch_slots(0, 4, 10, seed=3) != finetune.batch_slots(0, 4, 10, seed=4)
    # resumed at step 2 on two processes: the two shares of each step are exactly that step's global batch
    shares = [list(finetune.StepBatches(2, 5, 4, 10, 3, rank, 2)) for rank in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*shares, strict=True)] == [sorted(finetune.batch_slots(k, 4, 10, 3)) for k in (2, 3, 4)]


def test_bad_settings_are_named():
    with pytest.raises(TargetError, match="optimizer"):
        finetune.resolve_settings({"protocol": "finetune_seg", "optimizer": "lamb"})
    with pytest.raises(TargetError, match="finetune_seg"):
        finetune.resolve_settings({"protocol": "finetune_segm"})


def _seg_cfg(world, **kw):
    return {"protocol": "finetune_seg", "format": "voc_seg", "root": str(world / "voc"), "steps": 6,
            "batch_size": 2, "crop_size": 32, "head_channels": 8, "head_dilation": 2, "save_every": 2, **kw}


class _Kill(Exception):
    pass


def _kill_at(step):
    def hook(done, model):
        if done == step:
            raise _Kill

    return hook


def test_killed_run_resumes_exactly(world, tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pt")
    cfg = _seg_cfg(world)
    full = finetune.finetune(ckpt, "seg", cfg, state_dir=tmp_path / "a", progress=False)
    with pytest.raises(_Kill):
        finetune.finetune(ckpt, "seg", cfg, state_dir=tmp_path / "b", progress=False, on_step=_kill_at(5))
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=True)["step"] == 4  # last save before the kill
    resumed = finetune.finetune(ckpt, "seg", cfg, state_dir=tmp_path / "b", progress=False)
    assert resumed["resumed_from_step"] == 4 and full["resumed_from_step"] == 0
    assert resumed["metrics"] == full["metrics"] and resumed["final_loss"] == full["final_loss"]
    a = torch.load(tmp_path / "a" / "state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # killed after the last save, before the result was written: the rerun only tests, with the same numbers
    again = finetune.finetune(ckpt, "seg", cfg, state_dir=tmp_path / "b", progress=False)
    assert again["resumed_from_step"] == 6 and again["metrics"] == full["metrics"]
    assert again["final_loss"] == full["final_loss"]


def test_state_of_other_settings_is_refused_and_a_damaged_one_set_aside(world, tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pt")
    finetune.finetune(ckpt, "seg", _seg_cfg(world, steps=2), state_dir=tmp_path / "s", progress=False)
    with pytest.raises(TargetError, match="delete it"):
        finetune.finetune(ckpt, "seg", _seg_cfg(world, steps=2, lr=0.5), state_dir=tmp_path / "s", progress=False)
    (tmp_path / "s" / "state.pt").write_bytes(b"truncated")
    res = finetune.finetune(ckpt, "seg", _seg_cfg(world, steps=2), state_dir=tmp_path / "s", progress=False)
    assert res["resumed_from_step"] == 0 and (tmp_path / "s" / "state.pt.corrupt").exists()


def test_cli_writes_a_result_the_tables_read(world, tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pt")
    out = tmp_path / "T.json"
    cfg = _seg_cfg(world, steps=2)
    assert finetune.main(["--checkpoint", str(ckpt), "--name", "T", "--target-json", json.dumps(cfg),
                          "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    assert res["metric"] == "mIoU" and 0.0 <= res["value"] <= 1.0 and res["settings"]["steps"] == 2
    assert len(res["metrics"]["per_class_IoU"]) == 21 and np.isfinite(res["final_loss"])
    assert finetune.main(["--checkpoint", str(tmp_path / "missing.pt"), "--name", "T", "--target-json",
                          json.dumps(cfg), "--out", str(out)]) == 1  # fmt: skip


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, ckpt: str, cfg: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)

    def keep(done, model):
        if done == cfg["steps"]:
            torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, f"{out}/rank{rank}.pt")

    try:
        res = finetune.finetune(ckpt, "seg", cfg, progress=False, on_step=keep)
        if rank == 0:
            finetune.write_json_atomic(res, Path(out) / "res.json")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_on_two_cpu_processes_keeps_the_replicas_equal(world, tmp_path):
    """Two gloo processes split each global batch (slots rank::2); DDP's averaged gradients keep the two
    replicas identical. On CPU SyncBN is off (torch runs it on GPUs only) and the result says so."""
    ckpt = make_checkpoint(tmp_path / "c.pt")
    cfg = _seg_cfg(world, steps=3, batch_size=4)
    mp.spawn(_ddp_worker, args=(_free_port(), str(ckpt), cfg, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["settings"]["world_size"] == 2 and res["settings"]["sync_bn"] is False


def test_bf16_autocast_path_runs_on_cpu(world, tmp_path):
    """precision: bf16 is the CUDA default; forcing it on CPU runs the same autocast code path."""
    res = finetune.finetune(make_checkpoint(tmp_path / "c.pt"), "seg", _seg_cfg(world, steps=2, precision="bf16"),
                            progress=False)  # fmt: skip
    assert res["settings"]["bf16"] is True and np.isfinite(res["final_loss"])


class _Oracle(torch.nn.Module):
    """Returns the ground truth of the test images in evaluation order: the tasks' scoring must then be perfect,
    which checks the plumbing (mask orientation, class offsets, box convention, depth layout) end to end."""

    def __init__(self, answers):
        super().__init__()
        self.answers, self.i = answers, 0
        self.transform = type("T", (), {"min_size": (0,)})()

    def forward(self, x):
        out = self.answers[self.i]
        self.i += 1
        return out


def test_tasks_score_the_ground_truth_perfectly(world):
    s = finetune.resolve_settings({"protocol": "finetune_seg", "steps": 1, **SEG})
    seg = finetune_tasks.SegmentationTask("seg", {"format": "voc_seg", "root": str(world / "voc")}, s)
    masks = [seg.test.load_mask(i) for i in range(len(seg.test))]
    logits = [torch.nn.functional.one_hot(torch.from_numpy(np.where(m == 255, 0, m)).long(), 21)
              .permute(2, 0, 1)[None].float() for m in masks]  # fmt: skip
    assert seg.evaluate(_Oracle(logits), torch.device("cpu"))["mIoU"] == 1.0

    s = finetune.resolve_settings({"protocol": "finetune_det", **DET, "min_size_test": 72})
    det = finetune_tasks.DetectionTask("det", {"format": "voc_det", "root": str(world / "voc"),
                                               "splits": {"train": "2007_trainval", "test": "2007_test"}}, s)
    outs = [[{"boxes": torch.as_tensor(det.test.boxes[i]), "scores": torch.ones(len(det.test.labels[i])),
              "labels": torch.as_tensor(det.test.labels[i])}] for i in range(len(det.test))]  # fmt: skip
    res = det.evaluate(_Oracle(outs), torch.device("cpu"))
    assert res["AP50"] == res["AP75"] == res["AP"] == 1.0

    s = finetune.resolve_settings({"protocol": "finetune_depth", **DEPTH, "resize": 1.0})
    dep = finetune_tasks.DepthTask("depth", {"format": "nyud_depth", "root": str(world / "nyud")}, s)
    depths = [torch.from_numpy(dep.test.load_depth(i))[None] for i in range(len(dep.test))]
    res = dep.evaluate(_Oracle(depths), torch.device("cpu"))
    assert res["rmse"] == 0.0 and res["delta1"] == 1.0
    off = [d + 0.5 * (d > 0) for d in depths]  # every valid pixel 0.5 m too far: rmse 0.5 exactly
    assert dep.evaluate(_Oracle(off), torch.device("cpu"))["rmse"] == pytest.approx(0.5)


def test_depth_samples_at_the_paper_recipe_shape(world):
    """resize 0.5 then a fixed crop (the paper's 228 x 304 on NYUD's 480 x 640): a crop larger than the resized
    image is padded with depth 0, which the loss and the metrics read as missing."""
    s = finetune.resolve_settings({"protocol": "finetune_depth", **DEPTH, "resize": 0.5, "crop_size": [30, 20]})
    task = finetune_tasks.DepthTask("d", {"format": "nyud_depth", "root": str(world / "nyud")}, s)
    h, w = task.train.load_depth(0).shape
    x, d = task.sample(0, np.random.default_rng(0))
    assert x.shape == (3, 30, 20) and d.shape == (30, 20)
    assert (d[round(h * 0.5):] == 0).all() and (d[: round(h * 0.5)] > 0).any()
