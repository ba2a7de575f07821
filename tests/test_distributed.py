"""Data-parallel training: ranks split every global batch and the evaluation set without overlap, and a
2-process DDP job (gloo on the CPU, started through torchrun's launcher by ``add-task --devices 2``) trains the same
task as one process with the same global batch, and writes the registry exactly once."""
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from continual_mem.distributed import SINGLE, Shard
from registry import Registry
from scenarios.datasets import ImageSet
from scenarios.pipeline import DeviceImages, Preprocess, _GlobalBatches

runner = CliRunner()


def images(n: int) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 1, 20, 20), generator=g, dtype=torch.uint8), torch.arange(n) % 3)


@pytest.mark.parametrize("n,world", [(10, 2), (7, 3), (2, 4), (0, 2)])
def test_shard_bounds_partition(n, world):
    parts = [Shard(r, world).bounds(n) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    sizes = [hi - lo for lo, hi in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("rank,world", [(2, 2), (-1, 2), (0, 0)])
def test_shard_validation(rank, world):
    with pytest.raises(ValueError, match="rank < world"):
        Shard(rank, world)


@pytest.mark.parametrize("augment", ["none", "flip", "inception"])
def test_device_shards_rebuild_the_global_batch(augment):
    """Rank parts of a training batch are exactly the one-process batch split in two (augmentation included),
    and evaluation parts cover the set once."""
    src = DeviceImages(images(30), Preprocess(16, (0.5,) * 3, (0.5,) * 3, 0.875, augment))
    x, y = src.train_batch(3, 8, seed=5)
    parts = [src.train_batch(3, 8, seed=5, shard=Shard(r, 2)) for r in range(2)]
    assert [len(p[1]) for p in parts] == [4, 4]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), x)
    labels = [torch.cat([b[1] for b in src.eval_batches(4, shard=Shard(r, 3))]) for r in range(3)]
    assert torch.equal(torch.cat(labels), torch.cat([b[1] for b in src.eval_batches(4)]))


def test_loader_batches_split_each_global_batch():
    full = list(_GlobalBatches(23, 6, torch.Generator().manual_seed(1), SINGLE))
    parts = [list(_GlobalBatches(23, 6, torch.Generator().manual_seed(1), Shard(r, 2))) for r in range(2)]
    assert len(full) == 3 and all(len(b) == 6 for b in full)
    assert [a + b for a, b in zip(*parts)] == full


def cm(db: Path, *args: str):
    return runner.invoke(app, ["--registry", str(db), *args])


TRAIN = ["--steps", "20", "--batch-size", "32", "--lr", "0.1", "--max-test", "120", "--device", "cpu", "--json"]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_and_writes_once(tmp_path):
    db = tmp_path / "r.db"
    assert cm(db, "init", "--backbone", "vit_tiny_patch16_224", "--source", "none", "--image-size", "32").exit_code == 0
    one = cm(db, "add-task", "digits", "--name", "one", *TRAIN)
    assert one.exit_code == 0, one.output
    two = cm(db, "add-task", "digits", "--name", "two", "--devices", "2", *TRAIN)
    assert two.exit_code == 0, two.output
    m1, m2 = json.loads(one.output), json.loads(two.output)
    assert m2["processes"] == 2 and m2["verification"] == {"one": "equal", "two": "new"}
    # same global batches, same initial state: the same task up to the order of the gradient sums
    assert abs(m1["test_accuracy"] - m2["test_accuracy"]) <= 0.02
    net = Registry(db).load()
    a, b = net.tasks["one"].state_dict(), net.tasks["two"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-4, rtol=1e-3)
    assert m2["test_accuracy"] > 0.2, m2  # it learned (10 classes, chance 0.1): the comparison above is not of two untrained states
    adds = [e for e in Registry(db).events() if e["kind"] == "add" and e["task"] == "two"]
    assert len(adds) == 1  # rank 0 wrote, rank 1 did not


def test_devices_errors_leave_the_registry_unchanged(tmp_path):
    db = tmp_path / "r.db"
    assert cm(db, "init", "--backbone", "vit_tiny_patch16_224", "--source", "none", "--image-size", "32").exit_code == 0
    before = Registry(db).events()
    r = cm(db, "add-task", "digits", "--devices", "2", "--batch-size", "15", "--device", "cpu")
    assert r.exit_code == 2 and "divisible by --devices 2" in r.output and "Traceback" not in r.output
    r = cm(db, "add-task", "no-such-set", "--devices", "2", "--steps", "1", "--batch-size", "4", "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert "failed on rank" in r.output and "unknown dataset 'no-such-set'" in r.output
    assert "Traceback" not in r.output
    assert Registry(db).events() == before and Registry(db).task_names() == []


@pytest.mark.slow
def test_two_process_ddp_on_an_image_folder_decodes_each_ranks_part(tmp_path):
    """A JPEG folder: one process reading the prepared copy and two DDP ranks each decoding only its part of every
    global batch train the same task (the batches are the same bits on both paths)."""
    from scenarios.synthetic import make_image_folder

    make_image_folder(tmp_path / "photos", classes=3, per_class=16, size=(48, 40), portrait_every=5)
    db = tmp_path / "r.db"
    assert cm(db, "init", "--backbone", "vit_tiny_patch16_224", "--source", "none", "--image-size", "32").exit_code == 0
    folder = f"imagefolder:{tmp_path / 'photos'}"
    args = ["--steps", "6", "--batch-size", "8", "--lr", "0.1", "--device", "cpu", "--json"]
    one = cm(db, "add-task", folder, "--name", "one", "--pipeline", "prepared", *args)
    assert one.exit_code == 0, one.output
    two = cm(db, "add-task", folder, "--name", "two", "--pipeline", "decode", "--devices", "2", *args)
    assert two.exit_code == 0, two.output
    m1, m2 = json.loads(one.output), json.loads(two.output)
    assert m2["processes"] == 2 and m2["verification"] == {"one": "equal", "two": "new"}
    net = Registry(db).load()
    a, b = net.tasks["one"].state_dict(), net.tasks["two"].state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-4, rtol=1e-3)
