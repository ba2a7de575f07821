"""Regimes as plug-ins: one module declares a regime, and config, parameters, forward, accounting, training,
bundles and the oracle all follow it; nothing outside ``continual_mem/regimes`` tests regime names."""
import re
from pathlib import Path

import pytest
import torch

from continual_mem import MemoryViT, TaskConfig
from continual_mem.accounting import backbone_flops, task_cost
from continual_mem.flops import own_sequence_flops
from continual_mem.own_ops import own_logits, own_sequence
from continual_mem.reference import reference_forward
from continual_mem.reference_ops import own_sequence_reference
from continual_mem.regimes import RegimeSpec, get_regime, regime_names, register, unregister
from continual_mem.state import export_task_bytes, import_task_bytes
from continual_mem.train import build_optimizer, train_step

from helpers import images, make_backbone, perturb

ROOT = Path(__file__).resolve().parent.parent


def _cls_own_pass(model, task, x):
    """The plug-in's fast path: the task's class token with full attention over the patches, a pass of its own."""
    bb = model.backbone
    h = own_sequence(task, model.embed(x))
    for blk in bb.blocks:
        h = blk(h)
    return own_logits(bb, task, h)


PLUG_IN = RegimeSpec("cls-own", "own", "a class token with full attention (own pass; a test's plug-in)",
                     lambda model, task: (own_sequence_flops(model, task), 0), class_tokens=True,
                     own_pass=_cls_own_pass, reference=own_sequence_reference)


@pytest.fixture
def plug_in():
    register(PLUG_IN)
    yield PLUG_IN
    unregister(PLUG_IN.name)


def test_a_regime_declared_in_one_place_works_everywhere(plug_in):
    assert "cls-own" in regime_names() and get_regime("cls-own") is plug_in
    with pytest.raises(ValueError, match="has no per-layer memory"):
        TaskConfig(name="t", num_classes=3, regime="cls-own", memory=2, layers=(0,))
    model = MemoryViT(make_backbone("dinov2"))
    old = model.add_task("old", 3, memory=2)
    perturb(old)
    x = images(model.backbone, n=2)
    with torch.no_grad():
        before = model(x)
    task = model.add_task("p", 4, regime="cls-own")  # add_task's defaults follow the spec: no memory asked for
    assert task.tokens is not None and task.memory is None and task.input_memory is None and task.adapters is None
    assert not task.config.preserving and model.separate_pass_tasks == ["p"]
    perturb(task, seed=3)
    with torch.no_grad():
        after = model(x)
        ref = reference_forward(model, x)
    assert all(torch.equal(before[k], after[k]) for k in before)  # an own pass leaves every other output alone
    torch.testing.assert_close(after["p"], ref["p"], rtol=1e-4, atol=1e-5)
    cost = task_cost(model, "p")
    assert cost.regime == "cls-own" and not cost.shared_pass and cost.flops > 0.9 * backbone_flops(model)
    opt = build_optimizer(model, "p", lr=0.1)
    start = task.tokens.detach().clone()
    train_step(model, "p", x, torch.tensor([0, 1]), opt)
    assert not torch.equal(start, task.tokens) and torch.equal(before["old"], model(x)["old"])
    copy = MemoryViT(model.backbone)
    imported = import_task_bytes(copy, export_task_bytes(model, "p"))
    assert imported.config == task.config
    with torch.no_grad():
        assert torch.equal(copy(x, tasks=["p"])["p"], model(x, tasks=["p"])["p"])


def test_the_oracle_of_a_plug_in_is_its_own(plug_in):
    """The fast path and the oracle are two pieces of code: a plug-in whose fast pass skips a block, checked
    against the same oracle, disagrees with it."""
    def skips_the_last_block(model, task, x):
        bb = model.backbone
        h = own_sequence(task, model.embed(x))
        for blk in bb.blocks[:-1]:
            h = blk(h)
        return own_logits(bb, task, h)

    broken = RegimeSpec("cls-own-broken", "own", "a wrong fast path", PLUG_IN.flops, class_tokens=True,
                        own_pass=skips_the_last_block, reference=own_sequence_reference)
    register(broken)
    try:
        model = MemoryViT(make_backbone("dinov2"))
        perturb(model.add_task("good", 3, regime="cls-own"), seed=1)
        perturb(model.add_task("bad", 3, regime="cls-own-broken"), seed=1)
        x = images(model.backbone, n=2)
        with torch.no_grad():
            fast, ref = model(x), reference_forward(model, x)
        torch.testing.assert_close(fast["good"], ref["good"], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(fast["bad"], ref["bad"], rtol=1e-4, atol=1e-5)
    finally:
        unregister(broken.name)


def test_registering_checks_the_record():
    with pytest.raises(ValueError, match="registered twice"):
        register(RegimeSpec("memory", "own", "a second memory", lambda m, t: (0, 0), class_tokens=True,
                            own_pass=_cls_own_pass, reference=own_sequence_reference))
    flops, own, ref = (lambda m, t: (0, 0)), _cls_own_pass, own_sequence_reference
    refused = [
        (dict(path="own", class_tokens=True), "needs own_pass"),
        (dict(path="token"), "needs class_tokens"),
        (dict(path="side", side_pass=own, reference=ref), "a side regime needs modules"),
        (dict(path="own", class_tokens=True, own_pass=own), "need a reference"),
        (dict(path="sideways"), "^regime 'x': path must be one of head, token, side, own, got 'sideways'$"),
        (dict(path="token", class_tokens=True, own_pass=own),
         "own_pass, a side regime side_pass, and no other path takes either$"),
        (dict(path="token", class_tokens=True, reference=ref),
         "; head and token regimes are checked by the masked shared sequence$"),
    ]
    for kwargs, message in refused:
        with pytest.raises(ValueError, match=message):
            RegimeSpec("x", summary="?", flops=flops, **kwargs)
    for part in ("class_tokens", "layer_memory", "input_memory", "adapters"):
        with pytest.raises(ValueError, match="^regime 'x': the head path owns a head and nothing else$"):
            RegimeSpec("x", "head", "a head with more", lambda m, t: (0, 0), **{part: True})
    # the rules' other side: records that must be accepted
    RegimeSpec("x", "own", "adapters alone, no tokens", lambda m, t: (0, 0), adapters=True, own_pass=_cls_own_pass,
               reference=own_sequence_reference)
    RegimeSpec("x", "token", "tokens", lambda m, t: (0, 0), class_tokens=True)
    RegimeSpec("x", "head", "a head", lambda m, t: (0, 0))
    with pytest.raises(ValueError, match="unknown regime 'lora'; choose one of head, head\\+cls, masked-memory"):
        get_regime("lora")


def test_unregister_forgets_a_regime_and_ignores_unknown_names():
    register(PLUG_IN)
    unregister("cls-own")
    assert "cls-own" not in regime_names()
    with pytest.raises(ValueError, match="unknown regime 'cls-own'"):
        get_regime("cls-own")
    unregister("never-registered")


@pytest.mark.parametrize("name", [n for n in regime_names() if n in {"head", "head+cls", "masked-memory", "memory",
                                                                      "full", "input-memory", "hybrid", "adapters",
                                                                      "memory+adapters", "mem-ctrl",
                                                                      "mem-bottleneck", "ladder"}])
def test_every_built_in_regime_builds_what_its_record_says(name):
    spec = get_regime(name)
    model = MemoryViT(make_backbone("dinov2"))
    task = model.add_task("t", 3, regime=name)
    assert (task.tokens is not None) == spec.class_tokens
    assert (task.memory is not None) == spec.layer_memory
    assert (task.input_memory is not None) == spec.input_memory
    assert (task.adapters is not None) == spec.adapters
    assert (task.controllers is not None) == spec.controllers
    assert (task.backbone is not None) == spec.backbone_copy
    assert (task.side is not None) == (spec.modules is not None)
    assert task.config.preserving == (spec.path != "own") == (name in {"head", "head+cls", "masked-memory", "ladder"})


def test_only_the_regime_modules_name_regimes():
    """Adding a regime touches one module: no other module of the library compares a regime's name."""
    pattern = re.compile(r"regime\"?\]?\s*(==|!=|in\s*\(|not in\s*\()|regime\s+in\s+[A-Z_]+REGIMES")
    offenders = []
    for folder in ("continual_mem", "scenarios", "serving", "registry", "cli"):
        for path in (ROOT / folder).rglob("*.py"):
            if "regimes" in path.parts:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
