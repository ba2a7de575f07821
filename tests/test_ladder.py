"""The ladder side network (LST): preserving by construction, checked like every preserving regime (oracle,
torch.equal preservation, training, bundles, registry, CLI)."""
import json

import pytest
import torch

from continual_mem import MemoryViT
from continual_mem.accounting import backbone_flops, task_cost
from continual_mem.forward_plan import SideUnit
from continual_mem.reference import reference_forward
from continual_mem.state import export_task_bytes, import_task_bytes
from continual_mem.train import build_optimizer, train_step

from helpers import images, make_backbone, perturb


@pytest.fixture
def model():
    net = MemoryViT(make_backbone("dinov2"))
    for name, kw in (("h", {"regime": "head"}), ("m", {"memory": 2}), ("e", {"memory": 2, "mode": "extension"}),
                     ("f", {"memory": 2, "fork_layers": 1})):
        perturb(net.add_task(name, 3, **kw), seed=len(net.tasks))
    return net


def test_adding_and_training_a_ladder_changes_no_other_output(model):
    x = images(model.backbone, n=3)
    with torch.no_grad():
        before = model(x)
    lad = model.add_task("lad", 4, regime="ladder")
    assert lad.config.preserving and lad.side is not None and lad.tokens is None and lad.memory is None
    with torch.no_grad():  # a new ladder starts as a head: its up-projection is zero
        assert torch.equal(model(x)["lad"], lad.head(model.backbone.forward_head(model.backbone.forward_features(x),
                                                                                  pre_logits=True)))
    opt = build_optimizer(model, "lad", lr=0.5)
    y = torch.tensor([0, 1, 2])
    for _ in range(3):
        train_step(model, "lad", x, y, opt)
    assert all(p.grad is None for p in model.backbone.parameters())
    with torch.no_grad():
        after = model(x)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert lad.side.up.weight.abs().sum() > 0  # it trained


def test_the_ladder_matches_its_oracle_and_does_not_depend_on_other_tasks(model):
    perturb(model.add_task("lad", 4, regime="ladder"), seed=7)
    x = images(model.backbone, n=3)
    with torch.no_grad():
        out, ref = model(x), reference_forward(model, x)
        alone = MemoryViT(model.backbone)
        alone.attach(model.tasks["lad"])
        solo = alone(x)["lad"]
    torch.testing.assert_close(out["lad"], ref["lad"], rtol=1e-4, atol=1e-5)
    for k in ("original", "h", "m", "e", "f"):
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-5)
    assert torch.equal(out["lad"], solo)
    assert model.forward_plan().units[-1] == SideUnit("lad")
    assert model.forward_plan().forks == set(range(model.depth))


def test_the_oracle_catches_a_ladder_fed_the_wrong_states(model):
    from dataclasses import replace

    from continual_mem.regimes import get_regime, register, unregister

    perturb(model.add_task("lad", 4, regime="ladder"), seed=7)
    x = images(model.backbone, n=2)

    def shifted(net, task, state):  # every tap one block late
        taps = [state.block_inputs[min(i + 1, net.depth - 1)] for i in range(net.depth)] + [state.features]
        return task.head(task.side(taps, state.pre_logits))

    good = get_regime("ladder")
    unregister("ladder")
    register(replace(good, side_pass=shifted))
    try:
        with torch.no_grad():
            assert not torch.allclose(model(x)["lad"], reference_forward(model, x)["lad"], rtol=1e-4, atol=1e-5)
    finally:
        unregister("ladder")
        register(good)


def test_a_ladder_costs_a_small_share_of_the_backbone(model):
    model.add_task("lad", 4, regime="ladder")
    cost = task_cost(model, "lad")
    assert cost.shared_pass and 0 < cost.flops < 0.25 * backbone_flops(model)


def test_ladder_bundles_round_trip(model):
    perturb(model.add_task("lad", 4, regime="ladder"), seed=3)
    other = MemoryViT(model.backbone)
    imported = import_task_bytes(other, export_task_bytes(model, "lad"))
    x = images(model.backbone, n=2)
    with torch.no_grad():
        assert torch.equal(other(x)["lad"], model(x)["lad"]) and imported.config == model.tasks["lad"].config


def test_add_task_ladder_through_the_cli_and_the_registry(tmp_path):
    from test_cli import FAST, TINY_INIT, cm, ok

    db = tmp_path / "r.db"
    ok(cm(db, *TINY_INIT))
    ok(cm(db, "add-task", "digits", "--name", "d", *FAST))
    data = json.loads(ok(cm(db, "add-task", "digits", "--name", "lad", "--regime", "ladder", *FAST, "--json")).stdout)
    assert data["verification"] == {"d": "equal", "lad": "new"}
    assert json.loads(ok(cm(db, "verify", "--json")).stdout)["ok"] is True
    assert "ladder" in ok(cm(db, "regimes")).stdout
