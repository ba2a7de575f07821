"""Core guarantees: stock outputs untouched, old tasks bit-exact as tasks are added, fast path == oracle."""
import copy

import pytest
import timm
import torch

from continual_mem import ORIGINAL, MemoryViT, TaskError, build_optimizer, train_step
from continual_mem.reference import reference_forward
from helpers import images, make_backbone, perturb


@pytest.mark.parametrize("kind", ["tiny", "dinov2", "b32", "qknorm"])
def test_original_head_equals_stock_timm(kind):
    bb = make_backbone(kind)
    stock = copy.deepcopy(bb)
    x = images(bb)
    model = MemoryViT(bb)
    model.add_task("a", 4, memory=3)
    model.add_task("b", 5, regime="head+cls", mode="extension")
    with torch.no_grad():
        expected = stock(x)
    assert torch.equal(model(x)[ORIGINAL], expected)


GROWTH = [  # tasks 2..5: mixed modes, memory sizes and layer choices
    dict(name="t2", num_classes=3, regime="masked-memory", mode="extension", memory=2, layers="last:2"),
    dict(name="t3", num_classes=6, regime="head"),
    dict(name="t4", num_classes=2, regime="head+cls", mode="concatenation", task_tokens=2),
    dict(name="t5", num_classes=5, regime="masked-memory", mode="extension", memory=10, layers="first:1"),
]


@pytest.mark.parametrize("kind", ["tiny", "dinov2"])
def test_adding_tasks_keeps_every_older_task_bit_exact(kind):
    bb = make_backbone(kind)
    model = MemoryViT(bb)
    x = images(bb, n=4)
    perturb(model.add_task("t1", 4, memory=5, layers="all"), seed=1)
    with torch.no_grad():
        before = model(x)
    for i, spec in enumerate(GROWTH):
        perturb(model.add_task(**spec), seed=10 + i)
        with torch.no_grad():
            after = model(x)
        for name, logits in before.items():
            assert torch.equal(after[name], logits), f"{name} changed when {spec['name']} was added"
        before = after
    assert set(before) == {ORIGINAL, "t1", "t2", "t3", "t4", "t5"}


def test_task_outputs_do_not_depend_on_which_tasks_are_requested(model):
    x = images(model.backbone)
    for i, spec in enumerate(GROWTH):
        perturb(model.add_task(**spec), seed=i)
    with torch.no_grad():
        everything = model(x)
        for name in model.task_names:
            assert torch.equal(model(x, tasks=[name], original=False)[name], everything[name])


def test_adding_a_task_changes_nothing_but_its_own_output(model):
    """The test above must be able to fail: a task whose memory the new task could perturb would show it."""
    x = images(model.backbone)
    perturb(model.add_task("a", 3), seed=0)
    perturb(model.add_task("b", 3, mode="extension"), seed=1)
    with torch.no_grad():
        before = model(x)
        model.tasks["a"].memory.mul_(2.0)  # change an older task: its extension reader must move too
        after = model(x)
    assert not torch.equal(before["a"], after["a"])
    assert not torch.equal(before["b"], after["b"])
    assert torch.equal(before[ORIGINAL], after[ORIGINAL])


FAST_VS_REFERENCE = [
    [dict(name="a", num_classes=3, memory=4)],
    [dict(name="a", num_classes=3, memory=1, layers="last:1"),
     dict(name="b", num_classes=4, mode="extension", memory=3, layers="first:2"),
     dict(name="c", num_classes=2, regime="head+cls", mode="extension", task_tokens=3),
     dict(name="d", num_classes=5, regime="masked-memory", memory=2, layers=[0, 2])],
    [dict(name="h", num_classes=3, regime="head"),
     dict(name="m", num_classes=3, regime="memory", memory=2, layers="last:2"),
     dict(name="e", num_classes=3, mode="extension", memory=20),
     dict(name="i", num_classes=3, regime="input-memory", input_memory=3),
     dict(name="y", num_classes=3, regime="hybrid", input_memory=2, memory=2, layers="first:1"),
     dict(name="f", num_classes=3, regime="full")],
    [dict(name="m", num_classes=3, memory=2),  # late fork: private branches beside masked and extension tasks
     dict(name="e", num_classes=2, mode="extension", memory=1),
     dict(name="f1", num_classes=4, memory=3, fork_layers=1),
     dict(name="f2", num_classes=3, regime="head+cls", fork_layers=2, task_tokens=2),
     dict(name="fall", num_classes=3, memory=2, layers="last:2", fork_layers=3)],
]


@pytest.mark.parametrize("kind", ["tiny", "dinov2", "qknorm"])
@pytest.mark.parametrize("specs", FAST_VS_REFERENCE, ids=["one", "mixed-modes", "all-regimes", "late-fork"])
def test_fast_path_matches_masked_reference(kind, specs):
    bb = make_backbone(kind)
    model = MemoryViT(bb)
    for i, spec in enumerate(specs):
        perturb(model.add_task(**spec), seed=i)
    x = images(bb, n=2)
    with torch.no_grad():
        fast = model(x)
    ref = reference_forward(model, x)
    assert fast.keys() == ref.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-4, atol=1e-5, msg=f"task {name}")


def test_reference_detects_a_wrong_policy(model, monkeypatch):
    """Oracle sanity: with patches allowed to see task tokens, the reference disagrees with the fast path."""
    import continual_mem.reference as reference

    perturb(model.add_task("a", 3), seed=0)
    x = images(model.backbone)
    with torch.no_grad():
        fast = model(x)
    monkeypatch.setattr(reference, "build_attention_mask",
                        lambda layout, *_: torch.ones(len(layout), len(layout), dtype=torch.bool))
    ref = reference_forward(model, x)
    assert not torch.allclose(fast[ORIGINAL], ref[ORIGINAL], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec, break_fast_path", [
    (dict(regime="memory", memory=2), "memory ignored"),
    (dict(regime="hybrid", input_memory=2, memory=2), "memory ignored"),
    (dict(regime="mem-bottleneck", input_memory=2), "no bottleneck"),
    (dict(regime="adapters"), "adapters off"),
], ids=["memory", "hybrid", "mem-bottleneck", "adapters"])
def test_the_oracle_catches_a_wrong_own_pass(spec, break_fast_path, monkeypatch):
    """Own-pass regimes are checked against sequences the oracle builds itself: a fast path that drops the
    memory, the MemBottleneck mask or the adapters disagrees with it (while the oracle called ``separate_pass``,
    it agreed with whatever that did)."""
    import continual_mem.regimes.memory_transformer as memory_transformer
    from continual_mem.task import TaskModule

    model = MemoryViT(make_backbone("dinov2"))
    perturb(model.add_task("t", 3, **spec), seed=1)
    x = images(model.backbone, n=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["t"], reference_forward(model, x)["t"], rtol=1e-4, atol=1e-5)
    if break_fast_path == "memory ignored":
        monkeypatch.setattr(TaskModule, "memory_at", lambda self, layer: None)
    elif break_fast_path == "no bottleneck":
        monkeypatch.setattr(memory_transformer, "bottleneck_mask",
                            lambda n_seq, n_mem, device=None: torch.ones(n_seq + n_mem, n_seq + n_mem,
                                                                         dtype=torch.bool, device=device))
    else:
        monkeypatch.setattr(TaskModule, "adapters_at", lambda self, layer: None)
    with torch.no_grad():
        fast = model(x)["t"]
    assert not torch.allclose(fast, reference_forward(model, x)["t"], rtol=1e-4, atol=1e-5)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(before, module):
    for k, v in module.state_dict().items():
        assert torch.equal(before[k], v), k


def test_masked_training_backbone_gets_no_gradient_and_old_tasks_stay(model):
    x, y = images(model.backbone, n=4), torch.tensor([0, 1, 2, 0])
    old = model.add_task("old", 3)
    perturb(old)
    old_state, bb_state = _snapshot(old), _snapshot(model.backbone)
    with torch.no_grad():
        old_logits = model(x)["old"]
    new = model.add_task("new", 3, mode="extension")
    opt = build_optimizer(model, "new", lr=0.5)
    new_state = _snapshot(new)
    grads = {}
    hooks = [p.register_hook(lambda g, n=n: grads.__setitem__(n, g)) for n, p in model.backbone.named_parameters()
             if p.requires_grad]
    assert not hooks, "backbone parameters must not require grad"
    for _ in range(3):
        train_step(model, "new", x, y, opt)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is None for p in old.parameters())
    _assert_same(bb_state, model.backbone)
    _assert_same(old_state, old)
    assert any(not torch.equal(new_state[k], v) for k, v in new.state_dict().items())
    assert not torch.equal(new_state["memory"], new.memory.detach())  # memory really trained
    with torch.no_grad():
        assert torch.equal(model(x)["old"], old_logits)


def test_masked_training_runs_the_backbone_without_autograd(model, monkeypatch):
    """The shared backbone pass happens with grad disabled even while a task trains."""
    seen = []
    monkeypatch.setattr(model.backbone.blocks[0], "forward",
                        (lambda f: lambda *a, **k: (seen.append(torch.is_grad_enabled()), f(*a, **k))[1])(
                            model.backbone.blocks[0].forward))
    model.add_task("t", 3)
    opt = build_optimizer(model, "t")
    train_step(model, "t", images(model.backbone), torch.tensor([0, 1, 2]), opt)
    assert seen == [False]


@pytest.mark.parametrize(
    "regime,kwargs,expected",
    [
        ("head", {}, {"head.weight", "head.bias"}),
        ("head+cls", {}, {"tokens", "head.weight", "head.bias"}),
        ("masked-memory", {"memory": 2}, {"tokens", "memory", "head.weight", "head.bias"}),
        ("memory", {"memory": 2}, {"tokens", "memory", "head.weight", "head.bias"}),
        ("input-memory", {}, {"tokens", "input_memory", "head.weight", "head.bias"}),
        ("hybrid", {"memory": 2}, {"tokens", "memory", "input_memory", "head.weight", "head.bias"}),
    ],
)
def test_each_regime_trains_only_its_own_parameters(model, regime, kwargs, expected):
    x, y = images(model.backbone, n=4), torch.tensor([0, 1, 2, 0])
    other = model.add_task("other", 3)
    perturb(other)
    task = model.add_task("t", 3, regime=regime, **kwargs)
    opt = build_optimizer(model, "t", lr=0.5)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in other.parameters())
    bb_state, other_state, task_state = _snapshot(model.backbone), _snapshot(other), _snapshot(task)
    for _ in range(2):
        train_step(model, "t", x, y, opt)
    _assert_same(bb_state, model.backbone)
    _assert_same(other_state, other)
    changed = {k for k, v in task.state_dict().items() if not torch.equal(task_state[k], v)}
    assert changed == expected


def test_full_regime_trains_a_copy_not_the_shared_backbone(model):
    x, y = images(model.backbone, n=4), torch.tensor([0, 1, 2, 0])
    bb_state = _snapshot(model.backbone)
    task = model.add_task("f", 3, regime="full")
    opt = build_optimizer(model, "f", lr=0.5)
    train_step(model, "f", x, y, opt)
    _assert_same(bb_state, model.backbone)
    assert not torch.equal(bb_state["blocks.0.attn.qkv.weight"], task.backbone.blocks[0].attn.qkv.weight)
    assert model.separate_pass_tasks == ["f"]


def test_memory_kv_cache_follows_training(model):
    """Inference caches memory K/V; an optimizer step must invalidate it."""
    x, y = images(model.backbone, n=4), torch.tensor([0, 1, 2, 0])
    model.add_task("t", 3)
    with torch.no_grad():
        first = model(x)["t"]
    opt = build_optimizer(model, "t", lr=0.5)
    train_step(model, "t", x, y, opt)
    model.eval()
    with torch.no_grad():
        cached = model(x)["t"]
        model.kv_cache.clear()
        fresh = model(x)["t"]
    assert not torch.equal(first, cached)
    assert torch.equal(cached, fresh)


@pytest.mark.parametrize("mode", ["concatenation", "extension"])  # grouped, and per-task
def test_memory_kv_is_computed_once_across_forwards_and_redone_for_a_new_parameter(model, mode):
    x = images(model.backbone, n=2)
    model.add_task("base", 3, memory=2)
    task = model.add_task("t", 3, memory=2, mode=mode)
    with torch.no_grad():
        first = model(x)
        entries = {k: v[1] for k, v in model.kv_cache.items()}
        again = model(x)
    assert entries and all(model.kv_cache[k][1] is v for k, v in entries.items())  # reused, not recomputed
    assert all(torch.equal(first[k], again[k]) for k in first)
    # a replaced parameter is a new stamp, even at the same version counter: its K/V is computed again
    outs = []
    for shift in (1.0, 2.0):
        task.memory = torch.nn.Parameter(task.memory.detach() + shift)  # version 0 both times
        with torch.no_grad():
            outs.append(model(x))
    assert not torch.equal(outs[0]["t"], first["t"]) and not torch.equal(outs[1]["t"], outs[0]["t"])
    assert torch.equal(outs[1]["base"], first["base"])


def test_task_token_starts_as_the_original_class_token(model):
    """A fresh task token is the backbone's CLS as it enters block 0 (position embedding included)."""
    t = model.add_task("t", 3, regime="head+cls")
    with torch.no_grad():
        x0 = model.embed(images(model.backbone))
    assert torch.equal(t.tokens[0, 0], x0[0, 0])
    assert torch.equal(x0[0, 0], x0[1, 0])  # image-independent


def test_errors(model):
    model.add_task("a", 3)
    model.add_task("b", 3, mode="extension")
    with pytest.raises(TaskError, match="the model already has a task named"):
        model.add_task("a", 3)
    with pytest.raises(TaskError, match="attend to it"):
        model.remove_task("a")
    with pytest.raises(TaskError, match="unknown tasks"):
        model(images(model.backbone), tasks=["zzz"])
    model.remove_task("b")
    model.remove_task("a")
    assert model.task_names == []


def test_unsupported_backbones_are_refused():
    from continual_mem import BackboneError

    with pytest.raises(BackboneError, match="VisionTransformer"):
        MemoryViT(torch.nn.Linear(2, 2))
    bb = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, class_token=False,
                           global_pool="avg")
    with pytest.raises(BackboneError, match="class token"):
        MemoryViT(bb)
