"""The Memory Transformer's ablations (Burtsev et al. 2020) as own-pass regimes, and the 2x2 attention block map."""
import pytest
import torch

from continual_mem import ORIGINAL, MemoryViT, build_optimizer, train_step
from continual_mem.accounting import task_cost
from continual_mem.analysis import memory_attention, plot_block_map
from helpers import images, make_backbone, model_with_an_old_task, perturb


def _twins(regime):
    """A DINOv2-shaped model with an ``input-memory`` task ``base`` and a ``regime`` task ``t`` holding the same
    token, memory and head; and two images."""
    net = MemoryViT(make_backbone("dinov2"))
    base = net.add_task("base", 3, regime="input-memory")
    perturb(base, seed=1)
    t = net.add_task("t", 3, regime=regime)
    t.load_state_dict({**t.state_dict(), **base.state_dict()})
    return net, t, images(net.backbone, n=2)


def test_a_fresh_controller_is_input_memory_bit_for_bit_and_a_trained_one_is_not():
    net, t, x = _twins("mem-ctrl")
    with torch.no_grad():
        out = net(x)
    assert torch.equal(out["t"], out["base"])
    with torch.no_grad():
        t.controllers[0].mlp.fc2.weight.add_(0.1)
        assert not torch.equal(net(x)["t"], out["base"])
    assert net.separate_pass_tasks == ["base", "t"] and not t.config.preserving


def test_bottleneck_sequence_reads_only_memory():
    net, t, x = _twins("mem-bottleneck")
    with torch.no_grad():
        out = net(x)
    assert not torch.equal(out["t"], out["base"])
    res = memory_attention(net, "t", x)
    for layer in res["block_map"]:
        assert layer["processing"] == pytest.approx(0.0, abs=1e-6) and layer["read"] == pytest.approx(1.0)
        assert 0.0 < layer["memory"] < 1.0
    plain = memory_attention(net, "base", x)["block_map"]
    assert all(0.0 < m["read"] < 1.0 for m in plain)
    perturb(net.add_task("mem", 3, regime="memory", memory=2), seed=4)  # per-layer memory only: nothing writes
    assert "block_map" not in memory_attention(net, "mem", x)


def test_block_map_of_mem_ctrl_reads_memory_rows_from_the_controller(tmp_path):
    net, t, x = _twins("mem-ctrl")
    same = memory_attention(net, "t", x)["block_map"]
    assert same == memory_attention(net, "base", x)["block_map"]  # a fresh controller attends as the block does
    with torch.no_grad():
        t.controllers[1].attn.qkv.weight.mul_(3.0)
    result = memory_attention(net, "t", x)
    moved = result["block_map"]
    assert moved[0] == same[0] and moved[1]["memory"] != same[1]["memory"]
    # the summary over layers is made of the same rows: the controller's, not the discarded frozen-block ones
    assert result["blocks"]["memory"] == pytest.approx(sum(m["memory"] for m in moved) / len(moved))
    assert moved[1]["read"] == same[1]["read"]  # the sequence rows are still the frozen block's
    plot_block_map({"task": "t", "regime": "mem-ctrl", "block_map": moved}, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0


def test_training_moves_only_the_task_and_costs_are_counted():
    net, x, before = model_with_an_old_task("tiny")
    t = net.add_task("c", 3, regime="mem-ctrl")
    net.add_task("b", 3, regime="mem-bottleneck")
    opt = build_optimizer(net, "c", lr=0.5)
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in t.controllers.parameters()}
    backbone = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    train_step(net, "c", x, torch.arange(len(x)) % 3, opt)
    assert all(torch.equal(v, net.backbone.state_dict()[k]) for k, v in backbone.items())
    with torch.no_grad():
        out = net(x)
    assert torch.equal(out[ORIGINAL], before[ORIGINAL]) and torch.equal(out["old"], before["old"])
    ctrl, bottleneck = task_cost(net, "c"), task_cost(net, "b")
    assert ctrl.flops > 1.9 * bottleneck.flops and ctrl.params > bottleneck.params


def test_registry_round_trip_keeps_them_out_of_the_shared_pass(tmp_path):
    from registry_helpers import grow, new_registry

    reg, net = new_registry(tmp_path / "r.db")
    grow(reg, net, "shared", 1)
    grow(reg, net, "c", 2, regime="mem-ctrl")
    report = grow(reg, net, "b", 3, regime="mem-bottleneck")
    assert {c.name: c.status for c in report.tasks} == {"shared": "equal", "c": "equal", "b": "new"}
    loaded = reg.load()
    assert loaded.separate_pass_tasks == ["c", "b"]
    x = images(loaded.backbone, n=2)
    with torch.no_grad():
        for name in ("c", "b"):
            assert torch.equal(loaded(x)[name], net(x)[name])
