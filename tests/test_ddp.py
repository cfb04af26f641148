"""The DDP path of MoCo (shuffle BN across ranks, all-gathered enqueue) on two CPU gloo processes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from study.moco import MoCo, invert_perm, query_groups
from study.models import Encoder

WORLD, LOCAL_B, K, DIM = 2, 4, 16, 8
MODEL = {"arch": "resnet18", "small_input": False}
MOCO = {"dim": DIM, "K": K, "m": 0.99, "T": 0.2, "mlp": True, "shuffle_bn": "auto"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # same init on every rank, as DDP would broadcast
        model = MoCo(MODEL, MOCO, {"enabled": True, "k": 2, "lam": 0.4}, None).train()
        gen = torch.Generator().manual_seed(100 + rank)  # each rank sees its own images
        views = [torch.randn(LOCAL_B, 3, 32, 32, generator=gen) for _ in range(2)]
        queue0 = model.queue.clone()
        out = model(views)
        out["loss"].backward()
        grads_ok = all(p.grad is not None for p in model.encoder_q.parameters())
        torch.save(
            {
                "perm": model.last_shuffle,
                "queue0": queue0,
                "queue": model.queue.clone(),
                "queue_g": model.queue_g.clone(),
                "ptr": int(model.queue_ptr),
                "key_views": views[0],
                "encoder_k": model.encoder_k.state_dict(),
                "grads_ok": grads_ok,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_process_shuffle_bn_and_gathered_enqueue(tmp_path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    n = WORLD * LOCAL_B
    assert r0["grads_ok"] and r1["grads_ok"]
    # rank 0's permutation reached every rank
    assert torch.equal(r0["perm"], r1["perm"]) and sorted(r0["perm"].tolist()) == list(range(n))
    # both ranks enqueued the same 2 x local batch keys
    assert r0["ptr"] == r1["ptr"] == n
    assert torch.equal(r0["queue"], r1["queue"]) and torch.equal(r0["queue_g"], r1["queue_g"])
    assert torch.equal(r0["queue"][:, n:], r0["queue0"][:, n:])
    # each rank encoded one chunk of the shuffled global batch; gathered and unshuffled they are the keys
    images = torch.cat([r0["key_views"], r1["key_views"]])
    perm = r0["perm"]
    enc = Encoder(MODEL["arch"], MODEL["small_input"], DIM, mlp=True).train()
    enc.load_state_dict(r0["encoder_k"])
    with torch.no_grad():
        keys = torch.cat([enc(images[perm.view(WORLD, LOCAL_B)[c]])[1] for c in range(WORLD)])
    keys = keys[invert_perm(perm)]
    assert torch.allclose(r0["queue"][:, :n], keys.t(), atol=1e-5)
    # every rank's key chunk holds half of each rank's samples (the shuffle-BN guarantee)
    owner = query_groups(n, WORLD)
    for c in range(WORLD):
        assert torch.bincount(owner[perm.view(WORLD, LOCAL_B)[c]], minlength=WORLD).tolist() == [2, 2]
