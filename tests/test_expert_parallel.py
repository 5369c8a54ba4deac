"""Expert parallelism in the plain-PyTorch layer: 2 gloo ranks against one process (CPU)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fairseq_adaptive_moe.moe import ExpertFFN, MoELayer, TopKGate

pytestmark = pytest.mark.multiprocess

E, D, FFN = 4, 8, 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(seed, group=None, rank=0, world=1, **gate_kwargs):
    torch.manual_seed(seed)
    gate = TopKGate(D, E, **gate_kwargs)
    local = E // world
    experts = ExpertFFN(local, D, FFN, first_expert=rank * local, seed=seed)
    return MoELayer(gate, experts, group=group)


def worker(rank, world, port, policy, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        reference = build(0, policy=policy, threshold=0.15)
        sharded = build(0, dist.group.WORLD, rank, world, policy=policy, threshold=0.15)
        torch.manual_seed(100 + rank)  # each rank its own tokens, uneven counts
        x = torch.randn(11 + 6 * rank, D, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)

        y, stats = sharded(x)
        # rows this rank routed to experts held by the other rank: what should cross the wire
        local = range(rank * (E // world), (rank + 1) * (E // world))
        remote_rows = sum(n for e, n in enumerate(stats.expert_load.tolist()) if e not in local)
        y_ref, _ = reference(x_ref)
        g = torch.randn_like(y)
        (y * g).sum().backward()
        (y_ref * g).sum().backward()

        # reference expert grads: sum over all ranks' tokens, then this rank's shard
        ref_expert_grads = [p.grad.clone() for p in reference.experts.parameters()]
        for t in ref_expert_grads:
            dist.all_reduce(t)
        shard = slice(rank * (E // world), (rank + 1) * (E // world))
        checks = {
            "output": torch.allclose(y, y_ref, atol=1e-5),
            "input_grad": torch.allclose(x.grad, x_ref.grad, atol=1e-5),
            "gate_grad": torch.allclose(sharded.gate.wg.weight.grad, reference.gate.wg.weight.grad,
                                        atol=1e-5),
            "expert_grads": all(torch.allclose(p.grad, r[shard], atol=1e-5) for p, r in
                                zip(sharded.experts.parameters(), ref_expert_grads)),
            "load": stats.expert_load.sum().item() == (stats.experts_per_token.sum().item()),
            "bytes": stats.bytes_sent == remote_rows * D * 4,
        }
        top2 = build(0, dist.group.WORLD, rank, world, policy="top2")
        _, top2_stats = top2(x.detach())
        # adaptive's slots are a subset of top-2's (same gate): never more bytes, fewer slots
        checks["no_more_bytes_than_top2"] = stats.bytes_sent <= top2_stats.bytes_sent
        if policy == "adaptive":
            checks["fewer_slots_than_top2"] = (stats.expert_load.sum() < top2_stats.expert_load.sum()).item()
        results[rank] = checks
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("policy", ["top2", "adaptive"])
def test_two_ranks_equal_one_process(policy):
    world = 2
    results = mp.Manager().dict()
    mp.spawn(worker, args=(world, free_port(), policy, results), nprocs=world, join=True)
    for rank in range(world):
        assert results[rank] == {k: True for k in results[rank]}, (rank, results[rank])


def test_no_group_is_the_local_path():
    layer = build(0, policy="top2")
    assert layer.exchange is None


def test_expert_count_must_match_the_shard():
    with pytest.raises(ValueError, match="local experts"):
        MoELayer(TopKGate(D, E), ExpertFFN(E // 2, D, FFN))
