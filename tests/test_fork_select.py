"""Late fork on selected patches (EViT-style): the branch keeps the patches the class token attends to most."""
import pytest
import torch

from continual_mem import MemoryViT
from continual_mem.accounting import task_cost
from continual_mem.backbone import split_qkv
from continual_mem.reference import reference_forward
from helpers import make_backbone, model_with_an_old_task, perturb


@pytest.mark.parametrize("kind", ["tiny", "dinov2"])
def test_selection_is_exact_preserving_and_matches_the_oracle(kind):
    net, x, before = model_with_an_old_task(kind)
    bb = net.backbone
    patches = bb.patch_embed.num_patches
    full = net.add_task("full", 4, memory=2, fork_layers=2)
    perturb(full, seed=1)
    every = net.add_task("every", 4, memory=2, fork_layers=2, fork_select=patches)
    every.load_state_dict(full.state_dict())
    half = net.add_task("halfp", 4, memory=2, fork_layers=2, fork_select=patches // 2)
    half.load_state_dict(full.state_dict())
    with torch.no_grad():
        out = net(x)
        ref = reference_forward(net, x)
    assert torch.equal(out["every"], out["full"])  # keeping every patch is the unpooled fork, bit for bit
    assert not torch.equal(out["halfp"], out["full"])
    torch.testing.assert_close(out["halfp"], ref["halfp"], rtol=1e-4, atol=1e-4)
    for name in ("original", "old"):
        assert torch.equal(out[name], before[name])
    assert task_cost(net, "halfp").flops < task_cost(net, "full").flops


def test_the_kept_patches_are_the_most_attended_in_grid_order():
    bb = make_backbone("tiny")
    net = MemoryViT(bb)
    net.add_task("t", 3, memory=1, fork_layers=1, fork_select=5)
    h = torch.randn(2, 1 + bb.patch_embed.num_patches, bb.embed_dim)
    with torch.no_grad():
        kept = net.private_stream(net.tasks["t"], h)
        blk = bb.blocks[-1]
        q, k, _ = split_qkv(blk.attn, blk.attn.qkv(blk.norm1(h)))
        score = ((q[:, :, :1] * blk.attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0, 1:].mean(1)
    for b in range(2):
        top = sorted(score[b].topk(5).indices.tolist())
        assert torch.equal(kept[b], h[b, 1:][top])


def test_errors():
    net = MemoryViT(make_backbone("tiny"))
    with pytest.raises(ValueError, match="needs fork_layers"):
        net.add_task("a", 3, fork_select=4)
    with pytest.raises(ValueError, match="fork_select or fork_pool, not both"):
        net.add_task("a", 3, fork_layers=1, fork_select=4, fork_pool=2)
    with pytest.raises(ValueError, match="more than the backbone's 16 patches"):
        net.add_task("a", 3, fork_layers=1, fork_select=17)


def test_task_names_that_are_module_attributes_are_refused_clearly():
    net = MemoryViT(make_backbone("tiny"))
    for name in ("half", "cuda", "train", "training"):
        with pytest.raises(ValueError, match=f"task name '{name}' is the name of a torch module attribute"):
            net.add_task(name, 3)
    net.add_task("half-task", 3)
