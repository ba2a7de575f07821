"""Routed passes: each image computes only the tasks it asks for. On the CPU a grouped task's or a head's routed
answer equals the all-task pass of the same batch bit for bit, and a per-task unit's (late fork, own pass) equals
the all-task pass of its tile (one row by default), whatever the batch's composition; adding a task changes none;
bad routes get one clear error."""
import random

import pytest
import torch

from helpers import TRITON_DEVICES, images, make_backbone, perturb, rows_match_eager, triton_child

from continual_mem import MemoryViT, TaskError
from continual_mem import routed
from continual_mem.routed import RoutedGroup, assign_slots, tiles
from continual_mem.row_linear import head_width

SPECS = [  # two group shapes (one spilling into a second group), a head, a late fork (fine-tuned), an own pass
    dict(name="a0", num_classes=3, memory=2), dict(name="a1", num_classes=4, memory=2),
    dict(name="b0", num_classes=5, memory=3, layers="last:2"), dict(name="a2", num_classes=6, memory=2),
    dict(name="h", num_classes=3, regime="head"),
    dict(name="f", num_classes=4, memory=2, fork_layers=2),
    dict(name="ff", num_classes=5, memory=2, fork_layers=2, fork_finetune=True),  # batched (test_fork_batch.py)
    dict(name="own", num_classes=3, regime="memory", memory=2, layers="last:2"),
    dict(name="a3", num_classes=7, memory=2, task_tokens=1),
    dict(name="lad", num_classes=3, regime="ladder"),  # a side network: reads every block's input and the features
]


PER_TASK = ["f", "own", "lad"]  # gathered rows, one tile of 1: the bits of a batch of one
BATCHED = ["ff"]  # every row with its own weights: the per-task path's answer to float tolerance


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = MemoryViT(make_backbone("tiny"), group_size=2)
    for i, spec in enumerate(SPECS):
        perturb(model.add_task(**spec), seed=i + 1)
    return model.eval()


def _random_routes(rng: random.Random, names: list[str], batch: int) -> list[list[str]]:
    return [rng.sample(names, rng.randint(0, 5)) for _ in range(batch)]


@pytest.mark.parametrize("seed", range(4))
def test_routed_answers_equal_the_all_task_pass_whatever_the_composition(net, seed):
    rng = random.Random(seed)
    pool = images(net.backbone, n=10, seed=5)
    batch = rng.choice([1, 3, 6])
    picks = [rng.randrange(len(pool)) for _ in range(batch)]  # repeats allowed: equal rows, equal answers
    x = pool[picks]
    routes = _random_routes(rng, net.task_names, batch)
    with torch.no_grad():
        full = net(x)
        alone = [net(x[b:b + 1], tasks=PER_TASK) for b in range(batch)]
    got = net.forward_routed(x, routes, original=True)
    for b, route in enumerate(routes):
        assert list(got[b]) == ["original", *route]
        for name in ("original", *route):
            want = alone[b][name][0] if name in PER_TASK else full[name][b]
            if name in BATCHED:
                torch.testing.assert_close(got[b][name], want, rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(got[b][name], want), (seed, b, name)


def test_a_row_s_answer_does_not_depend_on_its_neighbours(net):
    """The same image and task, beside other rows asking other tasks (same batch size): the same bits."""
    pool = images(net.backbone, n=6, seed=7)
    rng = random.Random(3)
    seen: dict[tuple[int, str], torch.Tensor] = {}
    for _ in range(5):
        picks = rng.sample(range(len(pool)), 4)
        routes = _random_routes(rng, net.task_names, 4)
        for b, row in enumerate(net.forward_routed(pool[picks], routes)):
            for name, logits in row.items():
                first = seen.setdefault((picks[b], name), logits)
                assert torch.equal(first, logits), (picks[b], name)
    assert len(seen) > 10


def _four_grouped_tasks() -> MemoryViT:
    torch.manual_seed(0)
    model = MemoryViT(make_backbone("tiny"), group_size=2)
    for i, spec in enumerate(SPECS[:4]):
        perturb(model.add_task(**spec), seed=i + 1)
    return model


def test_adding_a_task_changes_no_routed_answer():
    model = _four_grouped_tasks()
    x = images(model.backbone, n=3)
    routes = [["a0"], ["b0", "a1"], ["a2"]]
    before = model.forward_routed(x, routes)
    perturb(model.add_task("new", 3, memory=2), seed=11)  # fills a2's group: the slot beside it
    after = model.forward_routed(x, [r + ["new"] for r in routes])
    for b, row in enumerate(before):
        assert all(torch.equal(logits, after[b][name]) for name, logits in row.items())


def test_extension_tasks_route_with_what_they_read():
    torch.manual_seed(0)
    model = MemoryViT(make_backbone("tiny"), group_size=2)
    for i, name in enumerate(("p", "q")):
        perturb(model.add_task(name, 3, memory=2), seed=i + 1)
    perturb(model.add_task("ext", 4, memory=2, mode="extension"), seed=5)
    x = images(model.backbone, n=3)
    with torch.no_grad():
        full = model(x)
    got = model.forward_routed(x, [["ext"], ["q"], []])
    assert torch.equal(got[0]["ext"], full["ext"][0]) and torch.equal(got[1]["q"], full["q"][1]) and got[2] == {}


def test_a_tile_of_several_rows_computes_as_a_batch_of_that_size(net):
    x = images(net.backbone, n=5, seed=2)
    routes = [["f", "own"], ["own"], ["f"], ["f", "own"], ["f"]]
    got = net.forward_routed(x, routes, tile=2)
    with torch.no_grad():  # "f": rows 0 2 | 3 4; "own": rows 0 1 | 3 3 (the last tile padded with its last row)
        f = [net(x[[0, 2]], tasks=["f"])["f"], net(x[[3, 4]], tasks=["f"])["f"]]
        own = [net(x[[0, 1]], tasks=["own"])["own"], net(x[[3, 3]], tasks=["own"])["own"]]
    assert torch.equal(torch.stack([got[b]["f"] for b in (0, 2, 3, 4)]), torch.cat(f))
    assert torch.equal(torch.stack([got[b]["own"] for b in (0, 1, 3)]), torch.cat(own)[:3])


def test_bad_routes_get_one_clear_error(net):
    x = images(net.backbone, n=2)
    with pytest.raises(TaskError, match=r"unknown tasks \['nope'\]; known tasks"):
        net.forward_routed(x, [["a0"], ["nope"]])
    with pytest.raises(ValueError, match="routes has 1 rows but the batch has 2 images; give one task list per image"):
        net.forward_routed(x, [["a0"]])
    with pytest.raises(ValueError, match="tile must be >= 1, got 0"):
        net.forward_routed(x, [["a0"], []], tile=0)


def test_slot_assignment_follows_the_model_s_order_not_the_names():
    groups = assign_slots([["a", "b"]], {"a": "A", "b": "A"}, capacity=2, order=["b", "a"])
    assert groups == [RoutedGroup("A", (("b", "a"),))]


def test_slot_assignment_policy():
    shape_of = {"a": "A", "b": "A", "c": "A", "d": "D"}
    groups = assign_slots([["c", "a"], ["b", "a", "c", "d"], []], shape_of, capacity=2, order=["a", "b", "c", "d"])
    assert groups == [
        RoutedGroup("A", (("a", "c"), ("a", "b"), (None, None))),  # each row's own tasks, in the model's order
        RoutedGroup("A", ((None, None), ("c", None), (None, None))),  # the second row's third: the next group
        RoutedGroup("D", ((None, None), ("d", None), (None, None))),
    ]
    assert assign_slots([["x"], []], shape_of, capacity=2, order=["x"]) == []  # not a grouped task


def test_tile_policy():
    assert tiles([4, 7, 9], 2) == [[4, 7], [9, 9]]
    assert tiles([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5, 5]]  # the last tile padded, not another
    assert tiles([4, 7], 2) == [[4, 7]] and tiles([], 3) == [] and tiles([5], 1) == [[5]]


def test_the_gather_tables_follow_changed_and_removed_tasks():
    model = _four_grouped_tasks()
    x = images(model.backbone, n=2)
    routes = [["a0", "a2"], ["a1"]]

    def check():
        with torch.no_grad():
            full = model(x)
        got = model.forward_routed(x, routes)
        assert all(torch.equal(got[b][n], full[n][b]) for b in range(2) for n in routes[b])
        return got

    first = check()
    routed_keys = [k for k in model.kv_cache if k.kind == "routed"]
    assert len(routed_keys) == 1  # the one shape's tables
    perturb(model.tasks["a0"], seed=20)  # in place: as a training step writes it
    assert not torch.equal(check()[0]["a0"], first[0]["a0"])
    model.remove_task("a1")  # a2 moves into a1's slot
    routes = [["a0", "a2"], ["a2"]]
    check()
    model.add_task("a4", 3, memory=2)  # the shape's tables get a new key: the old entry must not stay behind
    check()
    assert [k.names for k in model.kv_cache if k.kind == "routed"] == [("a0", "a2", "a4")]


def test_gathered_heads_agree_and_keep_each_row_s_bits(net, monkeypatch):
    """The CUDA head path (one batched product per slot and width, a linear-head task's too), run on the CPU: it
    agrees with the all-task pass to float tolerance, and a row's bits do not depend on its neighbours or on a
    wider task added (a grouped one or a linear head)."""
    monkeypatch.setattr(routed, "gathered_heads", lambda device: True)
    pool = images(net.backbone, n=6, seed=8)
    rng = random.Random(4)
    grouped = ["a0", "a1", "a2", "a3", "b0", "h"]
    seen: dict[tuple[int, str], torch.Tensor] = {}
    for _ in range(4):
        picks = rng.sample(range(len(pool)), 3)
        routes = [rng.sample(grouped, rng.randint(1, 3)) for _ in range(3)]
        with torch.no_grad():
            full = net(pool[picks])
        for b, row in enumerate(net.forward_routed(pool[picks], routes)):
            for name, logits in row.items():
                torch.testing.assert_close(logits, full[name][b], rtol=1e-5, atol=1e-5)
                assert torch.equal(seen.setdefault((picks[b], name), logits), logits)
    assert any(name == "h" for _, name in seen)
    wide = net.add_task("wide", 40, memory=2)  # another width (64): its own table and product
    wide_head = net.add_task("wide_h", 40, regime="head")
    try:
        perturb(wide, seed=30)
        perturb(wide_head, seed=31)
        for (i, name), logits in seen.items():
            again = net.forward_routed(pool[[i, 0, 1]], [[name], ["wide", "h"], ["a0", "wide_h"]])[0][name]
            assert torch.equal(again, logits)
    finally:
        net.remove_task("wide_h")
        net.remove_task("wide")


def test_head_width_policy():
    assert [head_width(c) for c in (1, 16, 17, 100, 128, 129, 397)] == [16, 16, 32, 128, 128, 256, 512]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run `pytest -m gpu` on a GPU host)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_routed_answers_agree_and_never_depend_on_the_neighbours(dtype):
    torch.manual_seed(0)
    model = MemoryViT(make_backbone("tiny"), group_size=2)
    for i, spec in enumerate(SPECS):
        perturb(model.add_task(**spec), seed=i + 1)
    model = model.to("cuda", dtype).eval()
    pool = images(model.backbone, n=8, seed=5).to("cuda", dtype)
    rng = random.Random(1)
    seen: dict[tuple[int, str], torch.Tensor] = {}
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for trial in range(6):
        picks = [rng.randrange(len(pool)) for _ in range(4)]
        routes = _random_routes(rng, model.task_names, 4)
        with torch.no_grad():
            full = model(pool[picks])
        for b, row in enumerate(model.forward_routed(pool[picks], routes)):
            for name, logits in row.items():
                torch.testing.assert_close(logits.float(), full[name][b].float(), rtol=tol, atol=tol)
                assert torch.equal(seen.setdefault((picks[b], name), logits), logits), (trial, name)
        if trial == 2:  # a task added halfway (a wider head, a new group): no routed answer changes
            perturb(model.cpu().add_task("late", 40, memory=2), seed=40)
            model.to("cuda", dtype)
    assert len(seen) > 15


CHILD = r"""
import json, sys, torch
dev = torch.device(sys.argv[1])
from continual_mem import MemoryViT
from helpers import images, make_backbone, perturb, routed_trials
torch.manual_seed(0)
net = MemoryViT(make_backbone("tiny"), group_size=2)
for i, spec in enumerate([dict(memory=2), dict(memory=2), dict(memory=3, layers="last:2"), dict(memory=2)]):
    perturb(net.add_task(f"t{i}", 3 + i, **spec), seed=i + 1)
net.to(dev).eval()
pool = images(net.backbone, n=4, seed=3).to(dev)


passes = {}


def full(picks, b, name):  # the all-task pass of the same batch (once per batch)
    if tuple(picks) not in passes:
        with torch.no_grad():
            passes[tuple(picks)] = net(pool[picks])
    return passes[tuple(picks)][name][b]


print("REPORT" + json.dumps(routed_trials(net, pool, full)))
"""


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_routed_groups_on_the_fused_kernel_with_one_memory_set_per_row(device):
    report = triton_child(CHILD, device)
    assert report["same"] and report["seen"] >= 6 and report["worst"] < 1e-4, report


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run `pytest -m gpu` on a GPU host)")
def test_a_routed_graph_replays_the_eager_routed_pass():
    from continual_mem.routed_graph import RoutedGraph

    torch.manual_seed(0)
    model = MemoryViT(make_backbone("tiny"), group_size=2)
    for i, spec in enumerate(SPECS):
        perturb(model.add_task(**spec), seed=i + 1)
    model = model.to("cuda", torch.bfloat16).eval()
    pool = images(model.backbone, n=8, seed=5).to("cuda", torch.bfloat16)
    graph = RoutedGraph(model, pool[:4])
    grouped = ["a0", "a1", "a2", "a3", "b0"]
    rng = random.Random(2)
    for _ in range(4):
        picks = rng.sample(range(8), 4)
        routes = [rng.sample(grouped, rng.randint(0, 2)) + ["h"] * rng.randint(0, 1) for _ in range(4)]
        layout = graph.layout(routes)
        out = graph(pool[picks], layout).clone()
        eager = model.forward_routed(pool[picks], routes)
        for b, row in enumerate(layout.rows):
            assert [name for name, _, _ in row] == routes[b]
            for name, lo, hi in row:
                assert torch.equal(out[b, lo:hi], eager[b][name]), (b, name)
    assert graph.layout([["f"], []]) is None  # a late fork: not in the graph, the eager pass serves it
    assert graph.layout([["a0", "a1", "a2"], []]) is None  # three of one shape: more than a group holds
    model.cpu()
    perturb(model.add_task("late", 3, memory=2), seed=9)
    model.cuda()
    with pytest.raises(RuntimeError, match="changed since capture"):
        graph(pool[:4], graph.layout([[], [], [], []]))


def test_a_routed_graph_gathers_head_tasks_with_the_eager_pass_s_bits(net, monkeypatch):
    """Linear-head tasks are in the graph, gathered (one product per (slot, width) over every row, as the eager
    routed pass runs them on CUDA): each answer is the eager pass's bit for bit beside grouped tasks and forks, a
    row asks up to HEAD_SLOTS of them without a split, and a backbone with one head (the served baseline) or with
    forty of two widths replays a graph too."""
    from continual_mem.head_table import HEAD_SLOTS
    from continual_mem.routed_graph import RoutedGraph

    monkeypatch.setattr(routed, "gathered_heads", lambda device: True)  # the eager pass's CUDA head path
    pool = images(net.backbone, n=4, seed=11)
    graph = RoutedGraph(net, pool, capture=False)
    assert list(graph.heads) == ["h"] and graph.head_keys == [(s, 16) for s in range(HEAD_SLOTS)]
    routes = [["h", "a0"], ["ff", "h"], [], ["b0", "h", "a1"]]
    assert graph.split(routes) == (routes, [0, 1, 2, 3])
    assert rows_match_eager(graph, net, pool, routes) == 4  # three heads and a fork, bit for bit
    assert graph.layout([["f"], [], [], []]) is None and graph.split([["f"]]) is None  # a plain fork: eager
    assert graph.layout([["a0", "a1", "a2"], [], [], []]) is None  # three of one shape: more than a group holds
    assert graph.layout([["a1", "a2", "b0"], ["a0", "a1", "b0"], [], []]) is not None  # two of a shape: one group
    torch.manual_seed(0)
    single = MemoryViT(make_backbone("tiny"), group_size=1)  # groups of one slot: one task of a shape per row
    for name in ("s0", "s1"):
        single.add_task(name, 3, memory=2)
    lone = RoutedGraph(single.eval(), pool[:2], capture=False)
    assert lone.layout([["s0"], ["s1"]]) is not None and lone.layout([["s0", "s1"], []]) is None
    torch.manual_seed(0)
    one = MemoryViT(make_backbone("tiny"))
    perturb(one.add_task("only", 5, regime="head"), seed=3)
    one.eval()
    assert RoutedGraph.routable(one)
    x = images(one.backbone, n=3, seed=12)
    graph = RoutedGraph(one, x, capture=False)
    out = graph(x, graph.layout([["only"]] * 3))
    with torch.no_grad():
        torch.testing.assert_close(out[:, :5], one(x)["only"], rtol=1e-5, atol=1e-5)
    assert rows_match_eager(graph, one, x, [["only"]] * 3) == 3
    for i in range(40):  # two widths (16 and 64): a product per slot and width, whatever the task count
        perturb(one.add_task(f"more{i}", 40 if i % 3 else 5, regime="head"), seed=40 + i)
    graph = RoutedGraph(one.eval(), x, capture=False)
    assert len(graph.heads) == 41 and graph.head_keys == [(s, w) for s in range(HEAD_SLOTS) for w in (16, 64)]
    rng = random.Random(5)
    for _ in range(3):
        routes = [rng.sample(one.task_names, rng.randint(0, HEAD_SLOTS)) for _ in range(3)]
        assert rows_match_eager(graph, one, x, routes) == sum(map(len, routes))
    heads = ["more3", "more1", "only", "more2", "more4"]  # one more than a row's slots: two rows
    assert graph.layout([heads, [], []]) is None
    assert graph.split([heads, []]) == ([heads[:HEAD_SLOTS], heads[HEAD_SLOTS:], []], [0, 0, 1])
    one.remove_task("more0")  # the graph refuses; a new one holds the rest
    with pytest.raises(RuntimeError, match="changed since capture"):
        graph(x, graph.layout([["only"]] * 3))
    assert len(RoutedGraph(one, x, capture=False).heads) == 40


def test_a_routed_graph_refuses_another_input_or_layout_with_the_reason(net):
    from continual_mem.routed_graph import RoutedGraph

    pool = images(net.backbone, n=4, seed=13)
    graph = RoutedGraph(net, pool, capture=False)
    layout = graph.layout([["h"], [], [], []])
    shape = tuple(pool.shape)
    with pytest.raises(ValueError, match=rf"captured for input \({shape[0]}, .* torch.float32, got \(3, "):
        graph(pool[:3], layout)
    with pytest.raises(ValueError, match=r"torch.float32, got .* torch.float64"):  # same shape, another dtype
        graph(pool.double(), layout)
    with pytest.raises(ValueError, match="layout has 2 rows but the batch has 4 images"):
        graph(pool, graph.layout([["h"], []]))


def test_a_graph_s_model_stamp_sees_every_change():
    from continual_mem.graphs import ModelStamp

    model = _four_grouped_tasks()
    stamp = ModelStamp(model)
    assert not stamp.changed()
    with torch.no_grad():
        model.tasks["a2"].memory.add_(0)  # an in-place write, as a training step makes
    assert stamp.changed()
    stamp = ModelStamp(model)
    task = model.remove_task("a1")
    assert stamp.changed()
    model.attach(task)  # the same object back, at the end: another order
    assert stamp.changed()
    stamp = ModelStamp(model)
    model.invalidate_cache()
    assert stamp.changed()


def test_a_pass_of_own_pass_tasks_alone_runs_no_backbone_pass_of_its_own(net):
    """Only an own-pass task asked, no original head: the shared pass computes nothing, the tiles still run."""
    x = images(net.backbone, n=2, seed=6)
    got = net.forward_routed(x, [["own"], ["own"]])
    with torch.no_grad():
        alone = [net(x[b:b + 1], tasks=["own"], original=False)["own"][0] for b in range(2)]
    assert all(torch.equal(got[b]["own"], alone[b]) for b in range(2))


def test_a_task_that_overflows_changes_no_other_tasks_answers():
    """A task whose memory holds a non-finite value (an overflowed update, a corrupt file) answers NaN for itself
    only: the tasks sharing its group, its batch and its pass keep their bits (the fused kernel's own check is in
    tests/test_kernels.py)."""
    torch.manual_seed(0)
    model = MemoryViT(make_backbone("tiny"), group_size=2)
    for i, name in enumerate(["a", "b", "c"]):
        perturb(model.add_task(name, num_classes=3, memory=2), seed=i + 1)
    model.eval()
    x = images(model.backbone, n=3, seed=5)
    routes = [["a"], ["a", "b"], ["b", "c"]]
    with torch.no_grad():
        full, got = model(x), model.forward_routed(x, routes)
        model.tasks["b"].memory[0, 0, 0] = float("inf")  # in place: the version counter moves, caches follow
        full_after, got_after = model(x), model.forward_routed(x, routes)
    assert torch.equal(full_after["a"], full["a"]) and torch.equal(full_after["c"], full["c"])
    assert not torch.isfinite(full_after["b"]).all()
    for b, route in enumerate(routes):
        for name in route:
            assert torch.equal(got_after[b][name], got[b][name]) != (name == "b")
