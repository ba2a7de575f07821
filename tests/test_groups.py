"""Fixed-capacity task groups: filling slots, overflowing into a new group, moving a task to another slot and
re-packing after a removal leave every task's logits bit-exact."""
import pytest
import torch

from continual_mem import ORIGINAL, MemoryViT, export_task_bytes, import_task_bytes
from continual_mem.reference import reference_forward
from helpers import images, make_backbone, perturb


def _model(group_size: int, kind: str = "tiny") -> MemoryViT:
    return MemoryViT(make_backbone(kind), group_size=group_size)


@pytest.mark.parametrize("kind", ["tiny", "dinov2"])
def test_filling_and_overflowing_groups_keeps_old_outputs(kind):
    model = _model(3, kind)
    x = images(model.backbone, n=4)
    before: dict = {}
    for i in range(7):  # 3 + 3 + 1 slots: two full groups and a third
        perturb(model.add_task(f"t{i}", 4, memory=4), seed=i)
        with torch.no_grad():
            after = model(x)
        for name, logits in before.items():
            assert torch.equal(after[name], logits), f"{name} changed when t{i} was added"
        before = after
    plan = model.plan()
    assert [u.kind for u in plan] == ["group"] * 3
    assert plan[2].names == ("t6", None, None)
    ref = reference_forward(model, x)
    for name in model.task_names:
        torch.testing.assert_close(before[name], ref[name], rtol=1e-4, atol=1e-5)


def test_tasks_of_different_shapes_get_their_own_groups(model):
    model.add_task("a", 3, memory=4)
    model.add_task("b", 3, memory=2)
    model.add_task("c", 3, memory=4)
    model.add_task("d", 3, mode="extension")
    model.add_task("e", 3, regime="head")
    kinds = [(u.kind, tuple(n for n in u.names if n)) for u in model.plan()]
    assert kinds == [("group", ("a", "c")), ("group", ("b",)), ("task", ("d",)), ("task", ("e",))]


def test_a_task_gives_the_same_bits_in_any_slot():
    x = images(make_backbone("tiny"), n=3)
    alone = _model(4)
    perturb(alone.add_task("x", 5, memory=3), seed=1)
    bundle = export_task_bytes(alone, "x")
    crowded = _model(4)
    for i in range(3):
        perturb(crowded.add_task(f"o{i}", 5, memory=3), seed=10 + i)
    import_task_bytes(crowded, bundle)  # lands in slot 3 instead of slot 0, next to trained neighbours
    assert crowded.plan()[0].names == ("o0", "o1", "o2", "x")
    with torch.no_grad():
        assert torch.equal(crowded(x)["x"], alone(x)["x"])


def test_removal_repacks_without_changing_bits():
    model = _model(2)
    x = images(model.backbone, n=3)
    for i in range(3):
        perturb(model.add_task(f"t{i}", 3, memory=2), seed=i)
    with torch.no_grad():
        before = model(x)
    assert any(k.kind == "group" and k.reads("t0") for k in model.kv_cache)  # inference cached the group's K/V
    model.remove_task("t0")  # t2 moves from group 2 slot 0 to group 1 slot 1
    assert not any(k.reads("t0") for k in model.kv_cache)
    assert [u.names for u in model.plan()] == [("t1", "t2")]
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after["t1"], before["t1"]) and torch.equal(after["t2"], before["t2"])
    assert torch.equal(after[ORIGINAL], before[ORIGINAL])


def test_group_size_one_matches_grouped_execution_closely():
    x = images(make_backbone("tiny"), n=2)
    a, b = _model(1), _model(8)
    for i in range(3):
        perturb(a.add_task(f"t{i}", 3, memory=2), seed=i)
        import_task_bytes(b, export_task_bytes(a, f"t{i}"))
    assert [len(u.names) for u in a.plan()] == [1, 1, 1] and [len(u.names) for u in b.plan()] == [8]
    with torch.no_grad():
        oa, ob = a(x), b(x)
    for name in oa:
        torch.testing.assert_close(oa[name], ob[name], rtol=1e-4, atol=1e-5)


def test_training_a_task_in_a_group_touches_only_that_task():
    from continual_mem import build_optimizer, train_step

    model = _model(4)
    x, y = images(model.backbone, n=4), torch.tensor([0, 1, 2, 0])
    for i in range(3):
        perturb(model.add_task(f"t{i}", 3, memory=2), seed=i)
    frozen = {n: {k: v.clone() for k, v in model.tasks[n].state_dict().items()} for n in ("t0", "t2")}
    with torch.no_grad():
        before = model(x)
    opt = build_optimizer(model, "t1", lr=0.5)
    training_view = model(x, tasks=["t1"], original=False)["t1"]  # grad on: per-task path, same function
    torch.testing.assert_close(training_view.detach(), before["t1"], rtol=1e-4, atol=1e-5)
    assert training_view.requires_grad
    for _ in range(2):
        train_step(model, "t1", x, y, opt)
    model.eval()
    with torch.no_grad():
        after = model(x)
    for n, state in frozen.items():
        assert all(torch.equal(v, model.tasks[n].state_dict()[k]) for k, v in state.items())
        assert torch.equal(after[n], before[n])
    assert not torch.equal(after["t1"], before["t1"])


def test_group_size_is_validated(tiny):
    with pytest.raises(ValueError, match="group_size"):
        MemoryViT(tiny, group_size=0)


def test_tasks_named_like_cache_kinds_are_ordinary_tasks():
    # cache keys are typed: tasks named "group", "stack" or "task" neither collide with the kinds nor break removal
    model = _model(2)
    x = images(model.backbone, n=2)
    perturb(model.add_task("stack", 3, memory=2), seed=0)
    perturb(model.add_task("group", 3, memory=2, mode="extension"), seed=1)  # per-task path: keyed by its name
    perturb(model.add_task("other", 3, regime="head"), seed=2)
    perturb(model.add_task("task", 3, memory=2), seed=3)
    with torch.no_grad():
        before = model(x)
    model.remove_task("other")
    model.remove_task("task")
    assert not any(k.reads("other") or k.reads("task") for k in model.kv_cache)
    with torch.no_grad():
        after = model(x)
    for name in ("group", "stack", ORIGINAL):
        assert torch.equal(after[name], before[name])


def test_cache_keys_say_which_tasks_they_hold():
    from continual_mem.cache_keys import KVKey

    assert KVKey.task("a", 3) == KVKey("task", ("a",), 3) and KVKey.task("a", 3) != KVKey.task("a", 2)
    group = KVKey.group(["a", None, "b"], 1)
    assert group == KVKey("group", ("a", None, "b"), 1) and hash(group) == hash(KVKey.group(("a", None, "b"), 1))
    stack = KVKey.stack([["a", None], ["b", "c"]], 0)
    assert stack == KVKey("stack", (("a", None), ("b", "c")), 0)
    assert [k.reads("a") for k in (KVKey.task("a", 0), group, stack)] == [True, True, True]
    assert [k.reads("c") for k in (KVKey.task("a", 0), group, stack)] == [False, False, True]
    assert not stack.reads("d") and not KVKey.task("ab", 0).reads("a")
