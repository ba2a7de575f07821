"""Late fork with its own fine-tuned blocks (``fork_finetune``): surgical fine-tuning of the top blocks inside a
private branch, still preserving."""
import pytest
import torch

from continual_mem import ORIGINAL, MemoryViT, build_optimizer, train_step
from continual_mem.accounting import task_cost
from continual_mem.reference import reference_forward
from continual_mem.train import TrainConfig
from helpers import check_private_addition, images, make_backbone, model_with_an_old_task, perturb


@pytest.mark.parametrize("kind", ["tiny", "dinov2"])
def test_a_fresh_copy_is_the_plain_fork_and_a_trained_one_matches_the_oracle(kind):
    net, x, before = model_with_an_old_task(kind)
    plain = net.add_task("plain", 4, memory=2, fork_layers=2)
    perturb(plain, seed=1)
    ft = net.add_task("ft", 4, memory=2, fork_layers=2, fork_finetune=True)
    assert ft.config.preserving and len(ft.blocks) == 2
    # an untouched copy computes exactly what the backbone's blocks do
    out, ref = check_private_addition(net, x, before, "ft", lambda key: key.startswith("blocks."))
    torch.testing.assert_close(out["plain"], ref["plain"], rtol=1e-4, atol=1e-4)


def test_oracle_with_adapters_and_selected_patches_inside_a_fine_tuned_branch():
    net, x, before = model_with_an_old_task("dinov2")
    t = net.add_task("both", 3, memory=1, fork_layers=2, fork_finetune=True, adapter_dim=2,
                     fork_select=net.backbone.patch_embed.num_patches // 2)
    perturb(t, seed=3)
    with torch.no_grad():
        out = net(x)
        ref = reference_forward(net, x)
    torch.testing.assert_close(out["both"], ref["both"], rtol=1e-4, atol=1e-4)
    assert torch.equal(out[ORIGINAL], before[ORIGINAL]) and torch.equal(out["old"], before["old"])


def test_training_moves_only_the_task_and_the_copy_at_its_smaller_rate():
    net, x, before = model_with_an_old_task("tiny")
    net.add_task("ft", 3, memory=2, fork_layers=2, fork_finetune=True)
    backbone = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    opt = build_optimizer(net, "ft", lr=0.5, finetune_lr_scale=0.1)
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 0.1]
    assert [g["lr"] for g in opt.param_groups] == [0.5, pytest.approx(0.05)]
    copied = {id(p) for p in net.tasks["ft"].blocks.parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == copied
    first = {k: v.clone() for k, v in net.tasks["ft"].state_dict().items()}
    y = torch.arange(len(x)) % 3
    for _ in range(2):
        train_step(net, "ft", x, y, opt)
    assert all(torch.equal(v, net.backbone.state_dict()[k]) for k, v in backbone.items())
    moved = {k for k, v in net.tasks["ft"].state_dict().items() if not torch.equal(v, first[k])}
    assert any(k.startswith("blocks.") for k in moved) and {"tokens", "head.weight"} <= moved
    with torch.no_grad():
        out = net(x)
    for name in (ORIGINAL, "old"):
        assert torch.equal(out[name], before[name])


def test_the_fine_tuned_copy_costs_what_the_plain_fork_costs_and_counts_its_parameters():
    net = MemoryViT(make_backbone("tiny"))
    net.add_task("p", 3, fork_layers=2)
    net.add_task("f", 3, fork_layers=2, fork_finetune=True)
    plain, ft = task_cost(net, "p"), task_cost(net, "f")
    block = sum(p.numel() for p in net.backbone.blocks[-1].parameters())
    assert ft.flops == plain.flops and ft.params == plain.params + 2 * block


def test_errors_and_config_round_trip():
    from continual_mem.config import TaskConfig

    net = MemoryViT(make_backbone("tiny"))
    with pytest.raises(ValueError, match="fork_finetune .* needs fork_layers >= 1"):
        net.add_task("a", 3, fork_finetune=True)
    with pytest.raises(ValueError, match="finetune_lr_scale must be > 0"):
        TrainConfig(finetune_lr_scale=0)
    c = net.add_task("a", 3, fork_layers=1, fork_finetune=True).config
    assert TaskConfig.from_dict(c.to_dict()) == c


def test_registry_and_bundle_round_trip(tmp_path):
    from registry_helpers import grow, new_registry

    reg, net = new_registry(tmp_path / "r.db")
    grow(reg, net, "shared", 1)
    report = grow(reg, net, "ft", 2, memory=2, fork_layers=2, fork_finetune=True)
    assert {c.name: c.status for c in report.tasks} == {"shared": "equal", "ft": "new"}
    loaded = reg.load()
    assert loaded.tasks["ft"].config.fork_finetune and loaded.tasks["ft"].blocks is not None
    x = images(loaded.backbone, n=2)
    with torch.no_grad():
        assert torch.equal(loaded(x)["ft"], net(x)["ft"])
    assert reg.verify().ok


def test_full_fine_tuning_trains_its_backbone_copy_at_the_scaled_rate_and_its_head_at_the_full_one():
    net = MemoryViT(make_backbone("tiny"))
    t = net.add_task("f", 3, regime="full")
    opt = build_optimizer(net, "f", lr=0.3)
    copy = {id(p) for p in t.backbone.parameters()}
    assert [g["lr"] for g in opt.param_groups] == [0.3, pytest.approx(0.009)]
    assert {id(p) for p in opt.param_groups[1]["params"]} == copy
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in t.head.parameters()}
