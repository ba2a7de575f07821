"""The typed forward plan: one function decides every path of a call, and the units run what it decided."""
import pytest
import torch

from continual_mem import MemoryViT
from continual_mem.forward_plan import GroupUnit, HeadUnit, OwnUnit, StackUnit, TokenUnit
from continual_mem.kernels import ENV

from helpers import images, make_backbone, perturb


@pytest.fixture
def model():
    net = MemoryViT(make_backbone("tiny"), group_size=2)
    net.add_task("h", 3, regime="head")
    net.add_task("a", 3, memory=2)
    net.add_task("b", 3, memory=2)
    net.add_task("c", 3, memory=2)  # a second group of the same shape
    net.add_task("e", 3, memory=2, mode="extension")  # reads a, b, c
    net.add_task("f", 3, memory=2, fork_layers=1)
    net.add_task("o", 3, regime="memory", memory=2)
    for t in net.tasks.values():
        perturb(t)
    return net


def test_units_follow_the_packing_and_the_regimes(model):
    with torch.no_grad():
        plan = model.forward_plan()
    assert plan.units == (HeadUnit("h"), GroupUnit(("a", "b")), GroupUnit(("c", None)), TokenUnit("e"),
                          TokenUnit("f"), OwnUnit("o"))
    assert plan.readers == {"a", "b", "c"} and plan.forks == {model.depth - 1}
    assert plan.shared and plan.head_features and plan.token_kv and not plan.reordered
    assert not (plan.paths.triton or plan.paths.fused_task or plan.paths.stacked or plan.paths.kv_in_place)  # CPU
    only_own = model.forward_plan(["o"], original=False)
    assert only_own.units == (OwnUnit("o"),) and not only_own.shared
    with torch.no_grad():  # an extension task brings the tasks it reads; only those units run
        assert model.forward_plan(["e"]).units == (GroupUnit(("a", "b")), GroupUnit(("c", None)), TokenUnit("e"))


def test_a_training_group_member_runs_alone_on_the_per_task_path(model):
    model.trainable_parameters("b")
    plan = model.forward_plan(["a", "b"])  # grad on and b trains: the requested members, no idle slot
    assert plan.units == (TokenUnit("a"), TokenUnit("b"))
    with torch.no_grad():
        assert model.forward_plan(["a", "b"]).units == (GroupUnit(("a", "b")),)


def test_groups_of_one_shape_stack_where_the_plan_says(model, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(ENV, "triton")
    with torch.no_grad():
        plan = model.forward_plan(device="cpu")
    assert plan.units[0] == StackUnit((("a", "b"), ("c", None))) and plan.reordered
    assert plan.paths.triton and plan.paths.fused_task and plan.paths.stacked and plan.paths.kv_in_place
    model.stack_groups = False
    with torch.no_grad():
        assert model.forward_plan().units[1:3] == (GroupUnit(("a", "b")), GroupUnit(("c", None)))


def test_the_plan_is_the_only_place_that_chooses_kernels(model, monkeypatch):
    """With the Triton interpreter asked for, a plan that says "PyTorch" runs no Triton kernel: the blocks do not
    decide on their own (before the plan, each block asked ``use_triton`` itself)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(ENV, "triton")
    monkeypatch.setattr("continual_mem.forward_plan.use_triton", lambda device, requested=None: False)
    monkeypatch.setattr("continual_mem.forward_plan.fused_task_attention", lambda device, **kw: False)

    def no_kernel(*args, **kwargs):
        raise AssertionError("a Triton kernel ran although the plan chose PyTorch")

    for name in ("group_attention_triton", "task_attention_triton"):
        monkeypatch.setattr(f"continual_mem.layers.{name}", no_kernel)
    x = images(model.backbone, n=2)
    with torch.no_grad():
        out = model(x)
    monkeypatch.setenv(ENV, "torch")
    with torch.no_grad():
        assert all(torch.equal(out[k], v) for k, v in model(x).items())


@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(ENV, "triton")


def test_kv_stays_in_place_only_when_every_reader_is_a_fused_kernel(interpreter):
    net = MemoryViT(make_backbone("tiny"), group_size=2)
    net.add_task("a", 3, memory=2)
    net.add_task("b", 3, memory=2)
    with torch.no_grad():
        assert net.forward_plan().paths.kv_in_place  # fused per-task path and groups
    net.task_block = torch.compile  # stands for a compiled per-task path (never called here)
    with torch.no_grad():
        plan = net.forward_plan()
        assert not plan.paths.fused_task and plan.paths.kv_in_place  # only groups read the K/V: in place
    net.trainable_parameters("b")
    assert not net.forward_plan().paths.kv_in_place  # b trains on the compiled per-task path: one contiguous copy
    net.add_task("e", 3, memory=2, mode="extension")
    with torch.no_grad():
        assert not net.forward_plan().paths.kv_in_place  # an extension task runs on the per-task path


def test_stacks_are_per_shape_and_planned_with_grad_on_too(interpreter):
    net = MemoryViT(make_backbone("tiny"), group_size=2)
    net.add_task("s", 3, memory=3)  # a group of one, first
    for name in ("a", "b", "c"):
        net.add_task(name, 3, memory=2)
    net.requires_grad_(False)
    plan = net.forward_plan()  # grad on, nothing trains
    assert set(plan.units) == {StackUnit((("s", None),)), StackUnit((("a", "b"), ("c", None)))}
    with torch.no_grad():
        assert net.forward_plan(["a"]).units == (StackUnit((("a", "b"),)),)


def test_a_training_group_keeps_the_units_before_it(model):
    model.trainable_parameters("b")
    assert model.forward_plan(["h", "a", "b"]).units == (HeadUnit("h"), TokenUnit("a"), TokenUnit("b"))
