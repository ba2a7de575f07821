"""Bottleneck adapters (Houlsby et al. 2019; the paper's Table 4 baseline): ``adapters`` and ``memory+adapters``."""
import pytest
import torch

from continual_mem import MemoryViT, build_optimizer, train_step
from continual_mem.accounting import task_cost
from continual_mem.reference import reference_forward
from continual_mem.state import export_task, import_task
from helpers import check_private_addition, images, make_backbone, model_with_an_old_task, perturb


@pytest.mark.parametrize("kind", ["tiny", "dinov2", "qknorm"])
def test_new_adapters_are_the_identity_bit_for_bit(kind):
    """A fresh adapter adds exact zeros: ``adapters`` gives the frozen backbone's features through the task's head,
    ``memory+adapters`` gives exactly the ``memory`` task with the same tokens, memory and head."""
    bb = make_backbone(kind)
    net = MemoryViT(bb)
    a = net.add_task("a", 4, regime="adapters")
    perturb(a.head)
    mem = net.add_task("m", 4, regime="memory", memory=2)
    perturb(mem)
    both = net.add_task("ma", 4, regime="memory+adapters", memory=2)
    both.load_state_dict({**mem.state_dict(), **{k: v for k, v in both.state_dict().items() if "adapters" in k}})
    x = images(bb, n=3)
    with torch.no_grad():
        out = net(x, original=False)
        ref = a.head(bb.forward_head(bb.forward_features(x), pre_logits=True))
    assert torch.equal(out["a"], ref)
    assert torch.equal(out["ma"], out["m"])
    perturb(a, seed=3)  # trained adapters do change the answer, and the oracle agrees
    with torch.no_grad():
        assert not torch.equal(net(x, tasks=["a"], original=False)["a"], ref)
        torch.testing.assert_close(net(x, original=False)["a"], reference_forward(net, x)["a"])


def test_adapter_tasks_train_only_their_own_parameters_and_keep_the_rest_exact():
    bb = make_backbone("tiny")
    net = MemoryViT(bb)
    old = net.add_task("old", 3)
    perturb(old)
    x = images(bb, n=4)
    with torch.no_grad():
        before = net(x)
    backbone = {k: v.clone() for k, v in bb.state_dict().items()}
    t = net.add_task("ad", 3, regime="memory+adapters", memory=2, adapter_dim=3)
    assert t.config.adapter_dim == 3 and not t.config.preserving and net.separate_pass_tasks == ["ad"]
    opt = build_optimizer(net, "ad", lr=0.5)
    adapters = {k: v.clone() for k, v in t.state_dict().items() if "adapters" in k}
    for _ in range(3):
        train_step(net, "ad", x, torch.tensor([0, 1, 2, 0]), opt)
    assert any(not torch.equal(adapters[k], v) for k, v in t.state_dict().items() if "adapters" in k)
    assert all(torch.equal(backbone[k], v) for k, v in bb.state_dict().items())
    with torch.no_grad():
        after = net(x)
    assert torch.equal(after["original"], before["original"]) and torch.equal(after["old"], before["old"])


def test_bundles_accounting_and_refusals(tmp_path):
    bb = make_backbone("tiny")
    net = MemoryViT(bb)
    t = net.add_task("ad", 5, regime="adapters", adapter_dim=4)
    perturb(t)
    d, depth = bb.embed_dim, len(bb.blocks)
    assert sum(p.numel() for p in t.parameters()) == 2 * depth * (2 * d * 4 + 4 + d) + d * 5 + 5
    assert task_cost(net, "ad").params == sum(p.numel() for p in t.parameters())
    net.add_task("m", 5, regime="memory", memory=2)
    net.add_task("ma", 5, regime="memory+adapters", memory=2, adapter_dim=4)
    seq = bb.num_prefix_tokens + bb.patch_embed.num_patches + 2  # every token, memory included, meets the adapters
    assert task_cost(net, "ma").flops - task_cost(net, "m").flops == depth * 2 * seq * (2 * d * 4 * 2)
    export_task(net, "ad", tmp_path / "ad.cmtask")
    other = MemoryViT(bb)
    import_task(other, tmp_path / "ad.cmtask")
    net.remove_task("m")
    net.remove_task("ma")
    x = images(bb, n=2)
    with torch.no_grad():
        assert torch.equal(other(x, original=False)["ad"], net(x, original=False)["ad"])
    with pytest.raises(ValueError, match="needs adapter_dim >= 1"):
        net.add_task("bad", 3, regime="adapters", adapter_dim=0)
    with pytest.raises(ValueError, match="adapters only inside a late-fork branch"):
        net.add_task("bad", 3, regime="masked-memory", adapter_dim=2)
    from continual_mem.onnx_export import export_onnx

    pytest.importorskip("onnx")
    with pytest.raises(ValueError, match="'ad' \\(adapters\\) needs its own pass"):
        export_onnx(net, tmp_path / "m.onnx")


def test_registry_stores_adapter_tasks_beside_shared_ones(tmp_path):
    from registry_helpers import grow, new_registry

    reg, net = new_registry(tmp_path / "r.db")
    grow(reg, net, "shared", 1)
    report = grow(reg, net, "ad", 2, regime="memory+adapters", memory=2)
    assert {c.name: c.status for c in report.tasks} == {"shared": "equal", "ad": "new"}
    report = grow(reg, net, "fork", 3, memory=2, fork_layers=2, adapter_dim=3)  # preserving: the shared pass
    assert {c.name: c.status for c in report.tasks} == {"shared": "equal", "ad": "equal", "fork": "new"}
    loaded = reg.load()
    assert loaded.tasks["ad"].config.adapter_dim == 5 and loaded.separate_pass_tasks == ["ad"]
    x = images(loaded.backbone, n=2)
    with torch.no_grad():
        assert torch.equal(loaded(x)["ad"], net(x)["ad"])
    assert torch.equal(loaded(x)["fork"], net(x)["fork"]) and loaded.tasks["fork"].config.preserving
    assert reg.verify().ok


@pytest.mark.parametrize("kind", ["tiny", "dinov2"])
def test_adapters_inside_a_late_fork_branch_are_preserving(kind):
    """Adapters in a forked task's private branch: new ones change nothing (bit for bit against the same fork
    without adapters), trained ones match the oracle, and every other output stays bit-identical."""
    net, x, before = model_with_an_old_task(kind)
    plain = net.add_task("plain", 4, memory=2, fork_layers=2, fork_pool=1)
    perturb(plain, seed=1)
    t = net.add_task("fa", 4, memory=2, fork_layers=2, adapter_dim=3)
    assert t.config.preserving and len(t.adapters) == 4 and t.adapters_at(0) is None
    check_private_addition(net, x, before, "fa", lambda key: "adapters" in key)
    with pytest.raises(ValueError, match="adapters only inside a late-fork branch"):
        net.add_task("nofork", 3, adapter_dim=2)
