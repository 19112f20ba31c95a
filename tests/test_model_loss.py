"""ClipLoss: a hand-computed value, the gather helper, and a real 2-process gloo all-gather."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model import ClipLoss
from model.loss import replace_local


def test_loss_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # logits = 2 * img @ txt.T = [[2.0, 1.2], [0.0, 1.6]]
    row0 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.2)))
    row1 = -math.log(math.exp(1.6) / (math.exp(0.0) + math.exp(1.6)))
    col0 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0)))
    col1 = -math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))
    expected = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    assert ClipLoss()(img, txt, scale).item() == pytest.approx(expected, rel=1e-6)


def test_replace_local_routes_gradient_to_local_shard_only():
    other, local = torch.randn(2, 4), torch.randn(2, 4, requires_grad=True)
    gathered = [other, local.detach().clone()]
    full = replace_local(gathered, local, rank=1)
    assert torch.equal(full, torch.cat([other, local.detach()]))
    full.pow(2).sum().backward()
    torch.testing.assert_close(local.grad, 2 * local.detach())


def _features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    return img, txt


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        img, txt = _features()
        b = img.shape[0] // world
        result = {}
        for local in (False, True):
            li = img[rank * b : (rank + 1) * b].clone().requires_grad_(True)
            lt = txt[rank * b : (rank + 1) * b].clone().requires_grad_(True)
            loss = ClipLoss(rank=rank, world_size=world, local_loss=local)(li, lt, torch.tensor(5.0))
            loss.backward()
            result[local] = (loss.detach(), li.grad, lt.grad)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_gather_two_processes(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    img, txt = _features()
    img.requires_grad_(True)
    txt.requires_grad_(True)
    full = ClipLoss()(img, txt, torch.tensor(5.0))
    full.backward()
    b = img.shape[0] // world
    local_losses = []
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        loss, gi, gt = res[False]
        assert loss.item() == pytest.approx(full.item(), rel=1e-6)  # global loss on every rank
        torch.testing.assert_close(gi, img.grad[rank * b : (rank + 1) * b])  # grad through the local shard
        torch.testing.assert_close(gt, txt.grad[rank * b : (rank + 1) * b])
        local_losses.append(res[True][0].item())
    assert sum(local_losses) / world == pytest.approx(full.item(), rel=1e-6)
