"""Routed fine-tuned late forks run batched (each row with its own task's weights) and paged by use: they agree with
the per-task path to float tolerance, and a row's answer never depends on the other rows, the other tasks, the
store's capacity or where its task was paged from."""
import random

import pytest
import torch

from helpers import TRITON_DEVICES, images, make_backbone, perturb, rows_match_eager, triton_child

from continual_mem import MemoryViT, TaskError, fork_batch, paging

FORKS = [  # (name, spec): families by fork, tokens, memory layers, selection/pooling and head width
    ("a", dict(num_classes=3, memory=2, fork_layers=2)),
    ("b", dict(num_classes=5, memory=2, fork_layers=2)),  # a's family: same padded head width
    ("c", dict(num_classes=4, memory=2, fork_layers=1, fork_select=4)),
    ("d", dict(num_classes=3, memory=3, fork_layers=2, fork_pool=3, layers="last:1")),
    ("e", dict(num_classes=20, memory=2, fork_layers=2)),  # wider head: a family of its own
    ("g", dict(num_classes=3, memory=2, fork_layers=2, task_tokens=2)),
    ("h", dict(num_classes=4, memory=2, fork_layers=2)),  # a's family too
]


def _model(capacity=None) -> MemoryViT:
    torch.manual_seed(0)
    model = MemoryViT(make_backbone("dinov2"), group_size=2)
    perturb(model.add_task("m", 3, memory=2), seed=1)  # a grouped task beside them
    for i, (name, spec) in enumerate(FORKS):
        perturb(model.add_task(name, fork_finetune=True, **spec), seed=i + 2)
    model.resident_tasks = capacity
    return model.eval()


@pytest.fixture(scope="module")
def net():
    return _model()


def _routes(rng, names, batch):
    return [rng.sample(names, rng.randint(0, 3)) for _ in range(batch)]


def test_batched_forks_agree_with_the_per_task_path(net):
    x = images(net.backbone, n=5, seed=3)
    rng = random.Random(0)
    routes = [[n for n, _ in FORKS[b::2]] for b in range(5)]
    routes += _routes(rng, net.task_names, 3)
    x = torch.cat([x, x[:3]])
    got = net.forward_routed(x, routes)
    with torch.no_grad():
        for b, route in enumerate(routes):
            alone = net(x[b:b + 1], tasks=route, original=False) if route else {}
            for name in route:
                torch.testing.assert_close(got[b][name], alone[name][0], rtol=1e-4, atol=1e-5)
    assert all(fork_batch.family(net.tasks[n]) is not None for n, _ in FORKS)


def _same_bits_everywhere(nets: dict, pool: torch.Tensor, names: list[str], rng: random.Random, *,
                          batch: int) -> dict[tuple[int, str], torch.Tensor]:
    """Six random batches through every model of ``nets``: each (image, task) answer, asserted bit-equal wherever
    it came up."""
    seen: dict[tuple[int, str], torch.Tensor] = {}
    for step in range(6):
        picks = [rng.randrange(len(pool)) for _ in range(batch)]
        routes = _routes(rng, names, batch)
        for key, model in nets.items():
            for b, row in enumerate(model.forward_routed(pool[picks], routes)):
                for name, logits in row.items():
                    first = seen.setdefault((picks[b], name), logits)
                    assert torch.equal(first, logits), (step, key, picks[b], name)
    return seen


def test_a_row_s_answer_depends_on_nothing_but_its_image_and_task():
    """Random compositions, and stores of every capacity (tasks paged in, evicted, paged back into other
    slots, a batch asking more than a store holds): the same image and task give the same bits."""
    nets = {cap: _model(cap) for cap in (None, 1, 2)}
    pool = images(nets[None].backbone, n=6, seed=7)
    names = nets[None].task_names
    seen = _same_bits_everywhere(nets, pool, names, random.Random(5), batch=4)
    assert len(seen) > 12
    store = fork_batch.store(nets[1], nets[1].tasks["a"], torch.device("cpu"))
    assert store.slots == 1 and store.page_ins > 2  # paged in, out and in again


def _graph_matches_eager(graph, model, pool, rng, *, batch: int, names: list[str], trials: int = 5) -> int:
    """Random routes (at most one fork of a family per row) through ``graph`` and the eager routed pass: each fork's
    answer bit-equal, the grouped ones to float tolerance (on the CPU the eager heads are not gathered)."""
    checked = 0
    for _ in range(trials):
        picks = [rng.randrange(len(pool)) for _ in range(batch)]
        routes = []
        for _ in range(batch):
            route, fams = [], set()
            for name in rng.sample(names, rng.randint(0, 3)):
                fam = fork_batch.family(model.tasks[name])
                if fam is None or fam not in fams:
                    route.append(name)
                    fams.add(fam)
            routes.append(route)
        checked += rows_match_eager(graph, model, pool[picks], routes)
    return checked


@pytest.mark.parametrize("capacity", [None, 3])
def test_a_routed_graph_holds_batched_forks(capacity):
    """The graph's pass (run uncaptured here) gives each row its fork's answer as the eager routed pass does,
    paging the forks a call asks into their slots; more forks of a family than its slots, or two in one row, go
    to the eager pass."""
    from continual_mem.routed_graph import RoutedGraph

    model = _model(capacity)
    pool = images(model.backbone, n=6, seed=7)
    graph = RoutedGraph(model, pool[:4], capture=False)
    assert set(graph.families) == {fork_batch.family(model.tasks[n]) for n, _ in FORKS}
    assert _graph_matches_eager(graph, model, pool, random.Random(3), batch=4, names=model.task_names) > 8
    assert graph.layout([["a", "b"], [], [], []]) is None  # two of one family in a row
    if capacity is not None:
        assert graph.layout([["a"], ["b"], ["h"], ["m"]]) is not None
        assert graph.layout([["a"], ["b"], ["h"], ["m", "c"]]) is not None  # c: another family's store
        with_four = _model(capacity)
        perturb(with_four.add_task("i", 3, memory=2, fork_layers=2, fork_finetune=True), seed=20)
        four = RoutedGraph(with_four, pool[:4], capture=False)
        assert four.layout([["a"], ["b"], ["h"], ["i"]]) is None  # a's family: four forks, three slots


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run `pytest -m gpu` on a GPU host)")
@pytest.mark.parametrize("capacity, offload", [(None, False), (3, True)])
def test_a_captured_routed_graph_replays_the_eager_fork_pass(capacity, offload):
    """As the server runs it (float32 weights, bf16 autocast): the captured graph's fork answers are the eager
    routed pass's bits at that batch size, resident or paged from pinned host memory between replays."""
    from continual_mem.routed_graph import RoutedGraph

    model = _model(capacity).to("cuda")
    if offload:
        fork_batch.offload(model)
    pool = images(model.backbone, n=6, seed=7).to("cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        graph = RoutedGraph(model, pool[:4], autocast_dtype=torch.bfloat16)
        assert graph.graph is not None
        checked = _graph_matches_eager(graph, model, pool, random.Random(4), batch=4, names=model.task_names,
                                       trials=8)
    assert checked > 12


def test_a_model_of_forks_alone_is_routable():
    from continual_mem.routed_graph import RoutedGraph

    torch.manual_seed(0)
    model = MemoryViT(make_backbone("dinov2"))
    model.add_task("a", 3, memory=2, fork_layers=2, fork_finetune=True)
    assert RoutedGraph.routable(model.eval())
    plain = MemoryViT(make_backbone("dinov2"))
    plain.add_task("p", 3, memory=2, fork_layers=2)  # a plain fork: per-task tiles, not in a graph
    assert not RoutedGraph.routable(plain)
    with pytest.raises(ValueError, match="no grouped task, batched fork or head task"):
        RoutedGraph(plain, images(plain.backbone, n=2), capture=False)


def test_offloaded_tasks_give_the_same_bits_and_only_run_routed():
    model = _model()
    x = images(model.backbone, n=3, seed=2)
    routes = [["a", "m"], ["b", "c"], ["d", "e", "g"]]
    before = model.forward_routed(x, routes)
    moved = fork_batch.offload(model)
    task = model.tasks["a"]
    assert paging.paged(task) and moved >= sum(p.numel() * p.element_size() for p in task.parameters())
    after = model.forward_routed(x, routes)
    assert all(torch.equal(v, after[b][k]) for b, row in enumerate(before) for k, v in row.items())
    with pytest.raises(TaskError, match=r"tasks \['a'\] are paged to host memory: they run in routed passes"):
        model(x, tasks=["a", "m"])
    assert set(model(x, tasks=["m"])) == {"original", "m"}
    assert fork_batch.offload(model, ["a"]) == 0  # already paged


def test_a_task_changed_in_place_is_paged_in_again():
    model = _model(capacity=4)
    fork_batch.offload(model, ["a"])
    x = images(model.backbone, n=2, seed=4)
    before = model.forward_routed(x, [["a"], ["b"]])
    with torch.no_grad():
        model.tasks["a"].head.bias.add_(1.0)  # a view of its host pack
        model.tasks["b"].blocks[0].mlp.fc2.bias.add_(0.5)  # a resident task
    after = model.forward_routed(x, [["a"], ["b"]])
    torch.testing.assert_close(after[0]["a"], before[0]["a"] + 1.0, rtol=1e-4, atol=1e-5)
    assert not torch.equal(after[1]["b"], before[1]["b"])
    with torch.no_grad():
        torch.testing.assert_close(after[1]["b"], model(x[1:], tasks=["b"])["b"][0], rtol=1e-4, atol=1e-5)


def test_a_model_cast_after_a_routed_pass_routes_in_its_new_dtype():
    """The slot store follows the model's dtype (a store kept from before the cast would run the old copies)."""
    model = _model()
    x = images(model.backbone, n=3, seed=5)
    routes = [["a"], ["b"], ["h"]]
    model.forward_routed(x, routes)
    model.to(torch.float64)
    got = model.forward_routed(x.double(), routes)
    assert all(row[name].dtype == torch.float64 for row, r in zip(got, routes) for name in r)
    with torch.no_grad():
        for b, r in enumerate(routes):
            torch.testing.assert_close(got[b][r[0]], model(x[b:b + 1].double(), tasks=r)[r[0]][0], rtol=1e-9,
                                       atol=1e-10)


def test_which_tasks_batch_together():
    model = _model()
    fam = {n: fork_batch.family(model.tasks[n]) for n, _ in FORKS}
    assert fam["a"] == fam["b"]
    assert len({fam[n] for n in "acdeg"}) == 5
    plain = model.add_task("plain", 3, memory=2, fork_layers=2)
    adapted = model.add_task("adapted", 3, memory=2, fork_layers=2, fork_finetune=True, adapter_dim=4)
    assert fork_batch.family(plain) is None and fork_batch.family(adapted) is None
    assert fork_batch.family(model.tasks["m"]) is None
    with pytest.raises(ValueError, match="task 'plain' is not a fine-tuned late fork that routed passes batch"):
        fork_batch.offload(model, ["plain"])
    qk = MemoryViT(make_backbone("qknorm"))
    assert fork_batch.family(qk.add_task("q", 3, memory=2, fork_layers=1, fork_finetune=True)) is None


def test_the_store_pages_least_recently_used_first():
    model = _model()
    t = {n: model.tasks[n] for n in "abh"}
    store = paging.SlotStore(fork_batch.layout(t["a"]), fork_batch.sources, device=torch.device("cpu"),
                             dtype=torch.float32, capacity=2)
    first = store.ensure([t["a"], t["b"]])
    assert sorted(first.values()) == [1, 2] and store.page_ins == 2
    assert store.ensure([t["a"]]) == {"a": first["a"]} and store.page_ins == 2  # resident: no copy; a is newest
    assert store.ensure([t["h"]]) == {"h": first["b"]} and list(store.resident) == ["a", "h"]  # b was oldest
    store.ensure([t["a"]])
    assert store.ensure([t["h"], t["b"]]) == {"h": first["b"], "b": first["a"]}  # h is oldest but asked for
    assert list(store.resident) == ["h", "b"] and store.page_ins == 4
    with torch.no_grad():
        t["h"].head.bias.add_(1.0)
    assert store.ensure([t["h"]]) == {"h": first["b"]} and store.page_ins == 5  # changed: copied into its slot
    assert list(store.resident) == ["b", "h"]  # nothing else evicted
    with torch.no_grad():
        t["b"].head.bias.add_(1.0)
    assert store.ensure([t["b"], t["a"]]) == {"b": first["a"], "a": first["b"]}  # b (oldest, changed) stays put
    views = store.views()
    assert torch.equal(views["head.bias"][first["a"]][:5], t["b"].head.bias)
    assert torch.equal(store.flat[0], torch.zeros_like(store.flat[0]))  # the empty slot
    with pytest.raises(ValueError, match="3 tasks asked at once but the store holds 2; ask in chunks"):
        store.ensure([t["a"], t["b"], t["h"]])
    with pytest.raises(ValueError, match="a slot store needs capacity >= 1, got 0"):
        paging.SlotStore(store.layout, fork_batch.sources, device=torch.device("cpu"), dtype=torch.float32,
                         capacity=0)
    grows = paging.SlotStore(store.layout, fork_batch.sources, device=torch.device("cpu"), dtype=torch.float32)
    assert sorted(grows.ensure([t["a"], t["b"], t["h"]]).values()) == [1, 2, 3] and grows.slots >= 3


def test_chunk_policy():
    assert paging.chunks(["a", "b", "c"], None) == [["a", "b", "c"]]
    assert paging.chunks(["a", "b", "c"], 3) == [["a", "b", "c"]]
    assert paging.chunks(["a", "b", "c"], 2) == [["a", "b"], ["c"]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run `pytest -m gpu` on a GPU host)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "autocast"])
def test_on_cuda_forks_batch_page_asynchronously_and_never_depend_on_the_neighbours(dtype):
    """Resident, paged through one or two slots (copies on their own stream) and offloaded to pinned host memory:
    the same image and task give the same bits, and agree with the per-task path to float tolerance. "autocast":
    float32 weights under bf16 autocast, as the server runs."""
    amp = dtype == "autocast"
    dtype = torch.float32 if amp else dtype
    nets = {}
    for cap, offload in ((None, False), (1, False), (2, True)):
        model = _model(cap).to("cuda", dtype)
        if offload:
            fork_batch.offload(model)
            assert model.tasks["a"].tokens.is_pinned()
        nets[(cap, offload)] = model
    ref = _model().to("cuda", dtype)
    pool = images(ref.backbone, n=8, seed=7).to("cuda", dtype)
    names = ref.task_names
    tol = dict(rtol=5e-2, atol=5e-2) if dtype == torch.bfloat16 or amp else dict(rtol=1e-3, atol=1e-4)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        seen = _same_bits_everywhere(nets, pool, names, random.Random(9), batch=8)
        for (i, name), logits in seen.items():
            torch.testing.assert_close(logits.float(), ref(pool[i:i + 1], tasks=[name])[name][0].float(), **tol)
    assert len(seen) > 20


CHILD = r"""
import json, sys, torch
dev = torch.device(sys.argv[1])
from continual_mem import MemoryViT
from helpers import images, make_backbone, perturb, routed_trials
torch.manual_seed(0)
net = MemoryViT(make_backbone("dinov2"), group_size=2)
for i, c in enumerate((3, 5, 4)):  # one family, its layers' weights read in place by the row kernel
    perturb(net.add_task(f"f{i}", c, memory=2, fork_layers=2, fork_finetune=True), seed=i + 1)
net.to(dev).eval()
pool = images(net.backbone, n=4, seed=3).to(dev)
def alone(picks, b, name):  # the per-task path on that image alone
    with torch.no_grad():
        return net(pool[picks[b]:picks[b] + 1], tasks=[name], original=False)[name][0]


report = routed_trials(net, pool, alone, most=2)
# the kernel alone, against float64; float32 weights under autocast as the server runs them (bf16 on the GPU;
# the interpreter's bf16 is unreliable, so float16 there)
from continual_mem.kernels import row_linear_triton
x, w, b = (t.to(dev) for t in (torch.randn(3, 10, 48), torch.randn(5, 64, 48), torch.randn(5, 64)))
idx = torch.tensor([1, 4, 2], device=dev)
ref = torch.baddbmm(b[idx].double().unsqueeze(1), x.double(), w[idx].double().transpose(1, 2))
report["fp32"] = float((row_linear_triton(x, w, b, idx).double() - ref).abs().max())
for name in ["float16"] + (["bfloat16"] if dev.type == "cuda" else []):
    with torch.autocast(dev.type, dtype=getattr(torch, name)):
        y = row_linear_triton(x, w, b, idx)
    report[name] = [str(y.dtype), float((y.double() - ref).abs().max() / ref.abs().max())]
print("REPORT" + json.dumps(report))
"""


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_the_row_kernel_reads_each_slot_in_place_agrees_and_follows_autocast(device):
    report = triton_child(CHILD, device)
    assert report["same"] and report["seen"] >= 5 and report["worst"] < 1e-4, report
    assert report["fp32"] < 1e-4, report
    for name in ("float16", "bfloat16"):
        if name in report:
            assert report[name][0] == f"torch.{name}" and report[name][1] < 2e-2, report



def test_a_row_asking_more_than_a_graph_row_holds_splits_into_rows_of_its_image():
    """Two forks of a family in one row (a request naming several fine-tuned forks) become rows of the same image,
    one fork each, so the pass stays in the graph; each part's answers are the eager routed pass's for that part
    alone at the same batch size."""
    from continual_mem.routed_graph import RoutedGraph
    from test_routed import _four_grouped_tasks

    model = _model()
    pool = images(model.backbone, n=3, seed=5)
    graph = RoutedGraph(model, pool, capture=False)
    routes = [["a", "b", "m", "c", "h"], [], ["e", "b"]]
    parts, origin = graph.split(routes)
    assert parts == [["a", "m", "c"], ["b"], ["h"], [], ["e", "b"]] and origin == [0, 0, 0, 1, 2]
    assert graph.split([["a"], ["nope"]]) is None  # neither grouped nor a batched fork: the eager pass
    assert graph.split([["a"], ["e", "b"]]) == ([["a"], ["e", "b"]], [0, 1])  # what a row holds stays one row
    assert graph.split(routes, most=5) is not None and graph.split(routes, most=4) is None  # past max_batch
    assert graph.split([[], []], most=1) is None
    x = pool[torch.tensor(origin)]
    assert rows_match_eager(RoutedGraph(model, x, capture=False), model, x, parts) == 6  # each fork asked
    four = _four_grouped_tasks()
    one = images(four.backbone, n=1, seed=6)
    parts, origin = RoutedGraph(four, one, capture=False).split([["a0", "a1", "b0", "a2"]])
    assert (parts, origin) == ([["a0", "a1", "b0"], ["a2"]], [0, 0])  # groups of two: a2 in a row of its own
    rows_match_eager(RoutedGraph(four, one[[0, 0]], capture=False), four, one[[0, 0]], parts)
