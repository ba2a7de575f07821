"""ONNX export of the shared pass: parity with PyTorch, stable old outputs after re-export, refusals."""
import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="needs onnx and onnxruntime: pip install -e '.[export]'")

from continual_mem import MemoryViT  # noqa: E402
from continual_mem.onnx_export import export_onnx, run_onnx  # noqa: E402
from helpers import images, make_backbone, perturb  # noqa: E402


@pytest.fixture
def net():
    m = MemoryViT(make_backbone("dinov2"))
    perturb(m.add_task("a", 3), seed=1)
    perturb(m.add_task("b", 4, memory=2, mode="extension"), seed=2)
    perturb(m.add_task("c", 5, fork_layers=1), seed=3)
    return m.eval()


def test_parity_sidecar_and_dynamic_batch(net, tmp_path):
    side = export_onnx(net, tmp_path / "m.onnx", extra_metadata={"model_version": 7})
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta == side and meta["outputs"] == ["a", "b", "c"] and meta["model_version"] == 7
    assert meta["preprocess"]["size"] == 42 and len(meta["tasks"][1]["classes"]) == 4
    for n in (1, 5):
        x = images(net.backbone, n=n, seed=n)
        ours = run_onnx(tmp_path / "m.onnx", x)
        with torch.no_grad():
            ref = net(x, original=False)
        for t in ("a", "b", "c"):
            torch.testing.assert_close(ours[t], ref[t], rtol=1e-4, atol=1e-4)
            assert torch.equal(ours[t].argmax(-1), ref[t].argmax(-1))


def test_re_export_after_adding_a_task_keeps_old_outputs_bit_identical(net, tmp_path):
    x = images(net.backbone, n=4, seed=9)
    export_onnx(net, tmp_path / "v1.onnx")
    before = run_onnx(tmp_path / "v1.onnx", x)
    perturb(net.add_task("d", 6, memory=3), seed=4)  # a new group
    perturb(net.add_task("e", 3), seed=5)  # the next slot of a's group
    export_onnx(net, tmp_path / "v2.onnx")
    after = run_onnx(tmp_path / "v2.onnx", x)
    assert list(after) == ["a", "b", "c", "d", "e"]
    for t in ("a", "b", "c"):
        assert torch.equal(after[t], before[t]), t


def test_refusals(net, tmp_path):
    net.add_task("own", 3, regime="memory", memory=2)
    with pytest.raises(ValueError, match="'own' \\(memory\\) needs its own pass.*--tasks"):
        export_onnx(net, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="unknown task 'zz'"):
        export_onnx(net, tmp_path / "m.onnx", tasks=["a", "zz"])
    assert not (tmp_path / "m.onnx").exists()
    export_onnx(net, tmp_path / "m.onnx", tasks=["a"], dynamic_batch=False, batch_size=2)
    assert list(run_onnx(tmp_path / "m.onnx", images(net.backbone, n=2))) == ["a"]


def test_same_top1_on_a_real_dataset(net, tmp_path):
    """scikit-learn's digits test split through eval's preprocessing: onnxruntime and PyTorch agree on every
    top-1 answer of every task."""
    from scenarios.datasets import load
    from scenarios.pipeline import DeviceImages, Preprocess

    data = load("digits")
    x = torch.cat([b for b, _ in DeviceImages(data.test, Preprocess.for_backbone(net.backbone, "none")).eval_batches(128)])
    export_onnx(net, tmp_path / "m.onnx")
    ours = run_onnx(tmp_path / "m.onnx", x)
    with torch.no_grad():
        ref = net(x, original=False)
    assert len(x) == 359
    for t in ("a", "b", "c"):
        assert torch.equal(ours[t].argmax(-1), ref[t].argmax(-1)), t


def _grouped() -> MemoryViT:
    m = MemoryViT(make_backbone("dinov2"), group_size=2)
    for i, (name, classes, kw) in enumerate([("p", 3, {}), ("q", 20, {}), ("r", 4, dict(memory=2)), ("s", 5, {})]):
        perturb(m.add_task(name, classes, **kw), seed=i + 1)  # two group shapes, two head widths (16, 32)
    return m.eval()


def test_a_routed_graph_answers_each_image_with_its_own_task(tmp_path):
    net = _grouped()
    side = export_onnx(net, tmp_path / "r.onnx", routed=True)
    assert side["inputs"] == ["images", "task"] and side["outputs"] == ["logits"] and side["routed"]
    names = [t["name"] for t in side["tasks"]]
    x = images(net.backbone, n=6, seed=4)
    task = torch.tensor([0, 1, 2, 3, 1, 0])
    got = run_onnx(tmp_path / "r.onnx", x, task)["logits"]
    assert got.shape == (6, 32)
    ref = net.forward_routed(x, [[names[i]] for i in task.tolist()])
    for b, i in enumerate(task.tolist()):
        classes = len(side["tasks"][i]["classes"])
        torch.testing.assert_close(got[b, :classes], ref[b][names[i]], rtol=1e-4, atol=1e-4)
        assert torch.equal(got[b, classes:], torch.zeros(32 - classes)) or classes > 16  # beyond: the width's pad
    alone = run_onnx(tmp_path / "r.onnx", x[1:2], task[1:2])["logits"]
    assert torch.equal(alone[0], got[1])  # a row's answer does not depend on its neighbours


def test_a_routed_graph_re_exported_after_an_addition_keeps_old_answers(tmp_path):
    net = _grouped()
    x, task = images(net.backbone, n=4, seed=2), torch.tensor([3, 2, 1, 0])
    export_onnx(net, tmp_path / "v1.onnx", routed=True)
    before = run_onnx(tmp_path / "v1.onnx", x, task)["logits"]
    perturb(net.add_task("wide", 40), seed=9)  # a wider head (64) and the next slot of p's group
    export_onnx(net, tmp_path / "v2.onnx", routed=True)
    after = run_onnx(tmp_path / "v2.onnx", x, task)["logits"]
    assert after.shape == (4, 64) and torch.equal(after[:, :32], before)


def test_a_routed_graph_refuses_tasks_outside_groups(net, tmp_path):
    with pytest.raises(ValueError, match="task 'b' is not a grouped task .* leave it out with --tasks"):
        export_onnx(net, tmp_path / "r.onnx", routed=True)
    assert not (tmp_path / "r.onnx").exists()
