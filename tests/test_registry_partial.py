"""Loading part of a model: `add-task` reads only what the new task reads (the backbone, and for an extension task
the tasks it sees), so its cost does not grow with the task count; and what it trains and stores is the same, bit
for bit, as from the whole model."""
import pytest
import torch

from continual_mem.state import export_task_bytes, read_task_bytes
from registry import RegistryError
from registry_helpers import flip_param_byte, grow, new_registry
from scenarios.recipes import train_on_dataset
from scenarios.task_recipe import TaskRecipe


@pytest.fixture
def reg(tmp_path):
    reg, net = new_registry(tmp_path / "r.db")
    grow(reg, net, "a", 1)
    grow(reg, net, "b", 2, memory=2)
    grow(reg, net, "ext", 3, mode="extension")  # sees a and b
    grow(reg, net, "c", 4, regime="head")
    return reg


def test_a_partial_load_holds_the_named_tasks_and_what_they_read(reg):
    assert reg.load(tasks=[]).task_names == []
    assert reg.load(tasks=["c", "b"]).task_names == ["b", "c"]  # the model's order
    assert reg.load(tasks=["ext"]).task_names == ["a", "b", "ext"]
    whole = reg.load()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        full, part = whole(x), reg.load(tasks=["ext", "c"])(x)
    assert set(part) == {"original", "a", "b", "ext", "c"} and all(torch.equal(part[k], full[k]) for k in part)
    with pytest.raises(RegistryError, match="^model 'default' has no task 'zzz'; see `continual-mem tasks`$"):
        reg.load(tasks=["a", "zzz"])


def test_a_partial_load_reads_no_other_task(reg):
    flip_param_byte(reg, "b")  # a corrupt task the partial load never touches
    assert reg.load(tasks=["a", "c"]).task_names == ["a", "c"]
    for tasks in (None, ["ext"]):
        with pytest.raises(RegistryError, match="task 'b' is corrupt"):
            reg.load(tasks=tasks)


def test_a_task_trained_beside_the_backbone_alone_is_the_one_trained_beside_every_task(reg):
    recipe = TaskRecipe(steps=3, batch_size=16, lr=0.05, max_test=40, max_heldout=20, memory=2, fork_layers=0)
    stored = []
    for tasks in (None, []):
        net = reg.load(tasks=tasks)
        metrics = train_on_dataset(net, "digits", "new", recipe, device="cpu")
        # (the bundle's bytes are compared through what they hold: safetensors orders header metadata by hash)
        config, tensors, meta = read_task_bytes(export_task_bytes(net, "new"), source="new")
        stored.append((config, tensors, meta, metrics["test_accuracy"], metrics["heldout_accuracy"]))
    (c1, t1, m1, *acc1), (c2, t2, m2, *acc2) = stored
    assert c1 == c2 and m1 == m2 and acc1 == acc2
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)


def test_verify_checks_the_named_tasks_or_those_since_a_version(reg):
    statuses = lambda report: {c.name: c.status for c in report.tasks}  # noqa: E731
    assert statuses(reg.verify()) == dict.fromkeys(["a", "b", "ext", "c"], "equal")
    assert statuses(reg.verify(tasks=["c"])) == {"c": "equal"}
    assert statuses(reg.verify(tasks=["ext"])) == dict.fromkeys(["a", "b", "ext"], "equal")  # and what it reads
    version = reg.model_version()
    assert statuses(reg.verify(since=version)) == {}  # nothing added since
    net = reg.load(tasks=[])
    grow(reg, net, "d", 5)
    assert statuses(reg.verify(since=version)) == {"d": "equal"}
    flip_param_byte(reg, "b")
    assert statuses(reg.verify(since=version)) == {"d": "equal"}  # b is not checked: added before
    report = reg.verify(tasks=["ext"])
    assert not report.ok and statuses(report) == {"a": "equal", "b": "corrupt", "ext": "blocked"}
    assert reg.verification_history()[-1]["results"] == {"a": "equal", "b": "corrupt", "ext": "blocked"}
    with pytest.raises(RegistryError, match="^since must be a model version >= 0"):
        reg.verify(since=-1)
    with pytest.raises(RegistryError, match="has no task 'zzz'"):
        reg.verify(tasks=["zzz"])


def test_the_registry_benchmark_builds_its_registries_from_its_own_options(tmp_path):
    # benchmarks/registry_scale.py measures add-task against K with serve_load's builder; the two must agree on
    # options (a missing one broke the benchmark for three sessions without a test noticing)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import registry_scale
    from registry import Registry

    for extra, fork, path_kind in (([], False, "token"), (["--fork-layers", "1"], True, "token"),
                                   (["--head-tasks"], False, "head")):
        path = tmp_path / f"r{len(extra)}{path_kind}.db"
        args = registry_scale.parser().parse_args(["--tasks", "2", "--img-size", "16", *extra])
        registry_scale.build_registry(path, args, 2)
        net = Registry(path).load()
        assert net.task_names == ["task0", "task1"]
        assert all((net.tasks[n].config.fork_layers > 0) == fork for n in net.task_names)
        assert all(net.tasks[n].config.spec.path == path_kind for n in net.task_names)
