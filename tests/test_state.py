"""Export/import round trip, backbone fingerprint check, and model concatenation (merge)."""
import pytest
import torch

from continual_mem import MemoryViT, TaskStateError, build_optimizer, export_task, import_task, merge, train_step
from continual_mem.state import export_task_bytes, import_task_bytes
from helpers import images, make_backbone, perturb


def _train(model, name, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, *model.backbone.patch_embed.img_size, generator=g)
    y = torch.randint(0, model.tasks[name].config.num_classes, (4,), generator=g)
    opt = build_optimizer(model, name, lr=0.5)
    for _ in range(steps):
        train_step(model, name, x, y, opt)
    model.eval()


@pytest.mark.parametrize(
    "spec",
    [dict(regime="masked-memory", memory=3, layers="last:2"), dict(regime="head"), dict(regime="full"),
     dict(regime="hybrid", memory=2, input_memory=2), dict(regime="head+cls", task_tokens=2)],
    ids=lambda s: s["regime"],
)
def test_export_import_round_trip_is_exact(tmp_path, spec):
    bb = make_backbone("tiny")
    a = MemoryViT(bb)
    perturb(a.add_task("t", 4, class_names=list("wxyz"), **spec))
    x = images(bb)
    with torch.no_grad():
        expected = a(x)["t"]
    path = export_task(a, "t", tmp_path / "t.safetensors")
    b = MemoryViT(make_backbone("tiny"))  # same weights, different object
    task = import_task(b, path)
    assert task.config == a.tasks["t"].config
    for k, v in a.tasks["t"].state_dict().items():
        assert torch.equal(task.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(b(x)["t"], expected)


def test_import_onto_another_backbone_fails_clearly(tmp_path):
    a = MemoryViT(make_backbone("tiny", seed=0))
    a.add_task("t", 3)
    path = export_task(a, "t", tmp_path / "t.safetensors")
    other = MemoryViT(make_backbone("tiny", seed=1))
    with pytest.raises(TaskStateError, match="trained on backbone .* attach it to the backbone it was trained on"):
        import_task(other, path)
    assert other.task_names == []


def test_corrupt_truncated_and_duplicate_bundles_are_refused(tmp_path):
    a = MemoryViT(make_backbone("tiny"))
    a.add_task("t", 3)
    data = export_task_bytes(a, "t")
    with pytest.raises(TaskStateError, match="not a readable safetensors"):
        import_task_bytes(MemoryViT(make_backbone("tiny")), data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-3] ^= 0x01  # a bit of the last tensor's data
    with pytest.raises(TaskStateError, match="corrupted"):
        import_task_bytes(MemoryViT(make_backbone("tiny")), bytes(flipped))
    with pytest.raises(TaskStateError, match="the model already has a task named"):
        import_task_bytes(a, data)
    with pytest.raises(TaskStateError, match="does not exist"):
        import_task(a, tmp_path / "missing.safetensors")
    from safetensors.torch import save

    with pytest.raises(TaskStateError, match="not a continual-mem task"):
        import_task_bytes(a, save({"x": torch.zeros(1)}))
    assert a.task_names == ["t"]


def test_extension_task_needs_its_earlier_tasks(tmp_path):
    a = MemoryViT(make_backbone("tiny"))
    a.add_task("base", 3)
    a.add_task("ext", 3, mode="extension")
    data = export_task_bytes(a, "ext")
    with pytest.raises(ValueError, match="trained on top of tasks \\['base'\\]"):
        import_task_bytes(MemoryViT(make_backbone("tiny")), data)


def test_merging_independently_trained_tasks_is_exact():
    """Paper Fig. 3: two concatenation-mode tasks trained on separate copies, merged, each bit-exact."""
    x = images(make_backbone("tiny"), n=5, seed=7)
    m1 = MemoryViT(make_backbone("tiny"))
    m1.add_task("cars", 4, memory=5)
    _train(m1, "cars", seed=1)
    m2 = MemoryViT(make_backbone("tiny"))
    m2.add_task("birds", 3, memory=2, layers="last:2")
    m2.add_task("birds-head", 3, regime="head")
    _train(m2, "birds", seed=2)
    _train(m2, "birds-head", seed=3)
    with torch.no_grad():
        alone1, alone2 = m1(x), m2(x)
    assert merge(m1, m2) == ["birds", "birds-head"]
    with torch.no_grad():
        merged = m1(x)
    for name in ("cars", "original"):
        assert torch.equal(merged[name], alone1[name])
    for name in ("birds", "birds-head"):
        assert torch.equal(merged[name], alone2[name])


def test_merge_refuses_extension_tasks_and_name_clashes():
    m1, m2 = MemoryViT(make_backbone("tiny")), MemoryViT(make_backbone("tiny"))
    m1.add_task("a", 3)
    m2.add_task("a", 3)
    with pytest.raises(TaskStateError, match="both models have tasks named"):
        merge(m1, m2)
    m3 = MemoryViT(make_backbone("tiny"))
    m3.add_task("b", 3)
    m3.add_task("c", 3, mode="extension")
    with pytest.raises(TaskStateError, match="extension-mode"):
        merge(m1, m3)
    assert m1.task_names == ["a"]
    with pytest.raises(TaskStateError, match="different backbones"):
        merge(m1, MemoryViT(make_backbone("tiny", seed=3)))
