"""Late fork (``fork_layers=k``): a private full-attention branch for the last k blocks, still preserving."""
import pytest
import torch

from continual_mem import ORIGINAL, MemoryViT, TaskError, build_optimizer, train_step
from continual_mem.accounting import task_cost
from continual_mem.masking import TokenSpec, build_attention_mask
from continual_mem.reference import reference_forward
from helpers import images, make_backbone, perturb


def test_reference_with_a_leaking_fork_disagrees(model, monkeypatch):
    """Oracle sanity: if a forked task's tokens kept reading the shared backbone, the reference would differ."""
    import continual_mem.reference as reference

    perturb(model.add_task("f", 3, fork_layers=2), seed=0)
    x = images(model.backbone)
    with torch.no_grad():
        fast = model(x)["f"]
    monkeypatch.setattr(reference, "build_attention_mask",
                        lambda layout, modes, forked: build_attention_mask(layout, modes, frozenset()))
    assert not torch.allclose(fast, reference_forward(model, x)["f"], rtol=1e-4, atol=1e-5)


def test_adding_tasks_around_forked_tasks_keeps_every_output_bit_exact():
    bb = make_backbone("dinov2")
    model = MemoryViT(bb, group_size=2)
    x = images(bb, n=3)
    seen: dict[str, torch.Tensor] = {}
    specs = [dict(name="a", num_classes=3, fork_layers=1), dict(name="b", num_classes=3),
             dict(name="c", num_classes=5, fork_layers=2, memory=4), dict(name="d", num_classes=3, fork_layers=1),
             dict(name="e", num_classes=3, regime="head"), dict(name="g", num_classes=2, memory=1, fork_layers=3)]
    for i, spec in enumerate(specs):
        perturb(model.add_task(**spec), seed=i)
        with torch.no_grad():
            out = model(x)
        for name, value in seen.items():
            assert torch.equal(out[name], value), f"{name} changed when {spec['name']} was added"
        seen = dict(out)
    with torch.no_grad():  # alone or with everyone: the same bits
        assert torch.equal(model(x, tasks=["c"], original=False)["c"], seen["c"])


def test_full_fork_is_the_memory_regime_and_zero_fork_is_masked_memory():
    bb = make_backbone("tiny")
    model = MemoryViT(bb)
    fork = model.add_task("fork", 3, memory=2, fork_layers=len(bb.blocks))
    mem = model.add_task("mem", 3, regime="memory", memory=2)
    perturb(fork, seed=3)
    mem.load_state_dict(fork.state_dict())
    zero = model.add_task("zero", 3, memory=2, fork_layers=0)
    masked = model.add_task("masked", 3, memory=2)
    perturb(zero, seed=4)
    masked.load_state_dict(zero.state_dict())
    x = images(bb)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out["fork"], out["mem"], rtol=1e-5, atol=1e-6)
    assert torch.equal(out["zero"], out["masked"])


def test_fork_training_moves_only_its_own_parameters_and_the_backbone_runs_without_autograd(model):
    old = model.add_task("old", 3)
    perturb(old, seed=1)
    model.add_task("f", 3, fork_layers=2)
    x, y = images(model.backbone, n=4), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        before = model(x)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    f_before = {k: v.clone() for k, v in model.tasks["f"].state_dict().items()}
    opt = build_optimizer(model, "f", lr=0.5)
    for _ in range(2):
        train_step(model, "f", x, y, opt)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.items())
    moved = [k for k, v in model.tasks["f"].state_dict().items() if not torch.equal(v, f_before[k])]
    assert {"tokens", "memory", "head.weight"} <= set(moved)
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after[ORIGINAL], before[ORIGINAL]) and torch.equal(after["old"], before["old"])


def test_fork_cost_grows_with_k():
    bb = make_backbone("b32")
    model = MemoryViT(bb)
    costs = []
    for k in (0, 1, 2, 4):
        model.add_task(f"k{k}", 3, regime="head+cls", fork_layers=k)
        costs.append(task_cost(model, f"k{k}").flops)
    assert costs == sorted(costs) and len(set(costs)) == 4
    from continual_mem.accounting import backbone_flops
    step = (costs[2] - costs[1]) / backbone_flops(model)  # one more private block ~ 1/depth of the backbone
    assert 0.5 / model.depth < step < 1.5 / model.depth


def test_fork_errors(model):
    with pytest.raises(ValueError, match="token regime"):
        model.add_task("h", 3, regime="head", fork_layers=1)
    with pytest.raises(ValueError, match="concatenation mode"):
        model.add_task("x", 3, mode="extension", fork_layers=1)
    with pytest.raises(ValueError, match=">= 0"):
        model.add_task("n", 3, fork_layers=-1)
    with pytest.raises(TaskError, match="backbone has 4 blocks"):
        model.add_task("big", 3, fork_layers=5)
    model.add_task("f", 3, fork_layers=1)
    with pytest.raises(TaskError, match="late-fork"):
        model.add_task("ext", 3, mode="extension")
    assert model.task_names == ["f"]


def test_mask_policy_for_private_branches():
    layout = [TokenSpec("backbone")] * 2 + [TokenSpec("task", 0), TokenSpec("task", 1)] + [TokenSpec("private", 0)] * 2
    mask = build_attention_mask(layout + [TokenSpec("memory", 0)], ["concatenation"] * 2, frozenset({0}))
    # backbone rows: backbone only
    assert mask[0].tolist() == [True, True, False, False, False, False, False]
    # forked task 0: own token, private patches, own memory; not the shared backbone
    assert mask[2].tolist() == [False, False, True, False, True, True, True]
    assert mask[4].tolist() == mask[2].tolist()
    # task 1 (not forked) never sees task 0's private patches
    assert mask[3].tolist() == [True, True, False, True, False, False, False]
    with pytest.raises(ValueError, match="concatenation"):
        build_attention_mask(layout, ["extension", "concatenation"], frozenset({0}))
    # an extension task reading task 0 sees its tokens and memory, never its private patches
    ext = build_attention_mask(layout + [TokenSpec("memory", 0)], ["concatenation", "extension"], frozenset({0}))
    assert ext[3].tolist() == [True, True, True, True, False, False, True]


def test_unmasked_concatenation_of_one_task_is_its_own_pass_and_others_disturb_it():
    from continual_mem.reference import unmasked_concatenation

    bb = make_backbone("tiny")
    model = MemoryViT(bb)
    for i, name in enumerate("abc"):
        perturb(model.add_task(name, 3, regime="memory", memory=2), seed=i)
    x = images(bb)
    with torch.no_grad():
        alone = model(x, tasks=["a"], original=False)["a"]
    torch.testing.assert_close(unmasked_concatenation(model, x, ["a"])["a"], alone, rtol=1e-5, atol=1e-6)
    together = unmasked_concatenation(model, x, ["a", "b", "c"])
    assert not torch.allclose(together["a"], alone, rtol=1e-3, atol=1e-4)
    model.add_task("m", 3)
    with pytest.raises(ValueError, match="regime 'memory'"):
        unmasked_concatenation(model, x, ["a", "m"])


# ------------------------------------------------------------------ pooled fork (fork_pool)
@pytest.mark.parametrize("kind,pool", [("tiny", 2), ("tiny", 4), ("tiny", (1, 2)), ("dinov2", 3), ("dinov2", (3, 1))])
def test_pooled_fork_matches_the_reference_and_preserves_everything(kind, pool):
    bb = make_backbone(kind)
    model = MemoryViT(bb)
    perturb(model.add_task("m", 3, memory=2), seed=0)
    x = images(bb, n=2)
    with torch.no_grad():
        before = model(x)
    perturb(model.add_task("p", 4, memory=3, fork_layers=2, fork_pool=pool), seed=1)
    perturb(model.add_task("q", 3, regime="head+cls", fork_layers=1, fork_pool=pool, task_tokens=2), seed=2)
    with torch.no_grad():
        fast = model(x)
    ref = reference_forward(model, x)
    for name in fast:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-4, atol=1e-5, msg=f"task {name}")
    assert torch.equal(fast[ORIGINAL], before[ORIGINAL]) and torch.equal(fast["m"], before["m"])
    with torch.no_grad():
        assert torch.equal(model(x, tasks=["p"], original=False)["p"], fast["p"])


def test_private_stream_pools_the_patch_grid_and_keeps_registers():
    bb = make_backbone("dinov2")  # 3x3 grid, CLS + 2 registers
    model = MemoryViT(bb)
    t = model.add_task("p", 3, fork_layers=1, fork_pool=3)
    hidden = torch.randn(2, 1 + 2 + 9, 48)
    out = model.private_stream(t, hidden)
    assert out.shape == (2, 2 + 1, 48)
    assert torch.equal(out[:, :2], hidden[:, 1:3])  # registers untouched, original CLS dropped
    torch.testing.assert_close(out[:, 2], hidden[:, 3:].mean(dim=1))
    tiny = MemoryViT(make_backbone("tiny"))  # 4x4 grid: token (r, c) of the pooled grid averages a 2x2 block
    t2 = tiny.add_task("p", 3, fork_layers=1, fork_pool=2)
    h = torch.randn(1, 1 + 16, 48)
    grid = h[:, 1:].reshape(1, 4, 4, 48)
    torch.testing.assert_close(tiny.private_stream(t2, h)[:, 3], grid[:, 2:4, 2:4].mean(dim=(1, 2)))
    t3 = tiny.add_task("r", 3, fork_layers=1, fork_pool=(1, 2))  # rows kept, column pairs averaged: 4x2 tokens
    out3 = tiny.private_stream(t3, h)
    assert out3.shape == (1, 8, 48)
    torch.testing.assert_close(out3[:, 5], grid[:, 2, 2:4].mean(dim=1))


def test_reference_with_an_unpooled_private_stream_disagrees(monkeypatch):
    """Oracle sanity: the reference really runs the pooled branch (an unpooled one gives other outputs)."""
    import continual_mem.reference as reference

    model = MemoryViT(make_backbone("tiny"))
    perturb(model.add_task("p", 3, fork_layers=2, fork_pool=2), seed=0)
    x = images(model.backbone)
    with torch.no_grad():
        fast = model(x)["p"]
    torch.testing.assert_close(fast, reference_forward(model, x)["p"], rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(reference, "_private", lambda bb, task, hidden, fork: hidden[:, 1:])
    assert not torch.allclose(fast, reference_forward(model, x)["p"], rtol=1e-4, atol=1e-5)


def test_the_oracle_catches_a_wrong_private_stream_in_the_fast_path(monkeypatch):
    """The oracle computes the fork's pooled stream itself: a fast path whose pooling is wrong disagrees with it
    (while the oracle called the fast path's ``private_stream``, it could not)."""
    model = MemoryViT(make_backbone("tiny"))
    perturb(model.add_task("p", 3, fork_layers=2, fork_pool=(1, 2)), seed=0)
    x = images(model.backbone)
    from continual_mem import branches

    good = branches.private_stream
    # pooled, but a patch off: the neighbours averaged are not the ones the config names
    monkeypatch.setattr(branches, "private_stream",
                        lambda model, task, hidden: good(model, task, hidden.roll(1, dims=1)))
    with torch.no_grad():
        fast = model(x)["p"]
    assert not torch.allclose(fast, reference_forward(model, x)["p"], rtol=1e-4, atol=1e-5)


def test_pooled_fork_cost_and_errors(model):
    model.add_task("k2", 3, fork_layers=2)
    model.add_task("k2p2", 3, fork_layers=2, fork_pool=2)
    model.add_task("k0", 3)
    full, pooled, masked = (task_cost(model, n).flops for n in ("k2", "k2p2", "k0"))
    assert masked < pooled < full
    with pytest.raises(ValueError, match="needs fork_layers"):
        model.add_task("x", 3, fork_pool=2)
    with pytest.raises(ValueError, match="fork_pool must be >= 1"):
        model.add_task("y", 3, fork_layers=1, fork_pool=0)
    with pytest.raises(TaskError, match="fork_pool 3x3 does not divide the 4x4 patch grid"):
        model.add_task("z", 3, fork_layers=1, fork_pool=3)
    with pytest.raises(ValueError, match="int or \\(rows, cols\\)"):
        model.add_task("w", 3, fork_layers=1, fork_pool=(2, 2, 2))
    model.add_task("k2p21", 3, fork_layers=2, fork_pool=(2, 1))  # half the tokens: between the two
    assert pooled < task_cost(model, "k2p21").flops < full
    assert model.tasks["k2p21"].config.fork_pool == (2, 1) and model.tasks["k2p2"].config.fork_pool == (2, 2)
    assert model.task_names == ["k2", "k2p2", "k0", "k2p21"]
