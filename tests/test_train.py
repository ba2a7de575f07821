"""Training loop: learns, schedules, resumes exactly, sweeps learning rates; device-side data pipeline."""
import math

import pytest
import torch

from continual_mem import MemoryViT
from continual_mem.train import TrainConfig, evaluate, fit, lr_at, lr_sweep
from helpers import make_backbone
from scenarios.datasets import ImageSet
from scenarios.pipeline import DeviceImages, Preprocess

PRE = Preprocess(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=0.875, augment="none")


def quadrant_data(n: int, seed: int) -> ImageSet:
    """Class c = brightness level c of a noisy 16x16 grayscale image: learnable in a few dozen steps even
    through a random tiny ViT (whose features vary little from image to image)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    imgs = torch.randint(0, 40, (n, 1, 16, 16), generator=g) + (labels * 60).view(-1, 1, 1, 1)
    return ImageSet(imgs.clamp(0, 255).to(torch.uint8), labels)


@pytest.fixture
def setup():
    model = MemoryViT(make_backbone("tiny"))
    model.add_task("quad", 4, memory=2)
    return model, DeviceImages(quadrant_data(256, 0), PRE), DeviceImages(quadrant_data(64, 1), PRE)


def test_fit_learns_and_keeps_the_best_state(setup):
    model, train, val = setup
    before = evaluate(model, val, ["quad"])["quad"]
    result = fit(model, "quad", train, val, TrainConfig(steps=40, batch_size=32, lr=0.05, eval_every=10, amp="off"),
                 progress=False)
    after = evaluate(model, val, ["quad"])["quad"]
    assert result.best_val_accuracy == after == max(h["val_accuracy"] for h in result.history)
    assert after >= 0.9 and after > before + 0.3
    assert [h["step"] for h in result.history] == [10, 20, 30, 40]
    assert not any(p.requires_grad for p in model.parameters())


def test_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(55, cfg) == pytest.approx(0.5)
    assert lr_at(99, cfg) < 0.001
    assert TrainConfig(steps=100).warmup_steps == 5


class Interrupt(RuntimeError):
    pass


class Flaky:
    """A batch source that dies at a given step (a killed job)."""

    def __init__(self, inner, die_at):
        self.inner, self.die_at = inner, die_at

    def train_batch(self, step, batch_size, seed):
        if step == self.die_at:
            raise Interrupt()
        return self.inner.train_batch(step, batch_size, seed)

    def eval_batches(self, batch_size):
        return self.inner.eval_batches(batch_size)


def test_resume_from_checkpoint_is_exact(tmp_path):
    def fresh():
        torch.manual_seed(0)
        m = MemoryViT(make_backbone("tiny"))
        m.add_task("quad", 4, memory=2)
        return m

    train, val = DeviceImages(quadrant_data(128, 0), PRE), DeviceImages(quadrant_data(32, 1), PRE)
    base = dict(steps=20, batch_size=16, lr=0.05, eval_every=5, amp="off")
    straight = fresh()
    fit(straight, "quad", train, val, TrainConfig(**base), progress=False)
    broken = fresh()
    cfg = TrainConfig(**base, checkpoint_every=10, checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(Interrupt):
        fit(broken, "quad", Flaky(train, die_at=13), val, cfg, progress=False)
    assert (tmp_path / "ckpt" / "checkpoint.safetensors").is_file()
    resumed_model = fresh()  # a new process would start from scratch; the checkpoint brings it to step 10
    result = fit(resumed_model, "quad", train, val, cfg, progress=False)
    assert result.steps == 20
    for k, v in straight.tasks["quad"].state_dict().items():
        assert torch.equal(v, resumed_model.tasks["quad"].state_dict()[k]), k


def test_lr_sweep_keeps_the_best_run(setup):
    model, train, val = setup
    best, runs = lr_sweep(model, "quad", train, val, TrainConfig(steps=40, batch_size=32, eval_every=10, amp="off"),
                          [1e-4, 0.05])
    assert [r.lr for r in runs] == [1e-4, 0.05]
    assert best.lr == 0.05 and best.best_val_accuracy > runs[0].best_val_accuracy
    assert evaluate(model, val, ["quad"])["quad"] == best.best_val_accuracy


@pytest.mark.parametrize("augment", ["none", "flip", "inception"])
def test_device_batches_are_deterministic_and_normalised(augment):
    pre = Preprocess(img_size=24, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875, augment=augment)
    src = DeviceImages(quadrant_data(40, 3), pre)
    x1, y1 = src.train_batch(7, 8, seed=1)
    x2, y2 = src.train_batch(7, 8, seed=1)
    x3, _ = src.train_batch(8, 8, seed=1)
    assert x1.shape == (8, 3, 24, 24) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert -1.01 <= float(x1.min()) and float(x1.max()) <= 1.01
    ev = list(src.eval_batches(16))
    assert [len(y) for _, y in ev] == [16, 16, 8]


def test_epochs_cover_every_example_once():
    src = DeviceImages(quadrant_data(40, 3), PRE)
    src.batch = lambda idx, train, g=None, part=None: (idx, idx)  # look at indices only
    seen = torch.cat([src.train_batch(s, 10, seed=0)[1] for s in range(4)])
    assert sorted(seen.tolist()) == list(range(40))


@pytest.mark.parametrize("kwargs,msg", [(dict(steps=0), "steps"), (dict(lr=0), "lr"), (dict(amp="fp8"), "amp"),
                                        (dict(checkpoint_every=5), "checkpoint_dir"),
                                        (dict(steps=10, warmup_steps=11), "warmup")])
def test_config_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kwargs)


def test_math_sanity():
    assert math.isclose(lr_at(0, TrainConfig(steps=1, lr=0.3, warmup_steps=0)), 0.3)


def test_cuda_graph_needs_a_gpu(setup):
    model, train, val = setup
    with pytest.raises(ValueError, match="cuda_graph needs one CUDA device"):
        fit(model, "quad", train, val, TrainConfig(steps=2, batch_size=8, cuda_graph=True), progress=False)


def test_clipping_is_per_group_so_a_backbone_copy_does_not_shrink_the_head_step():
    # full fine-tuning's first step moves its head exactly as head-only's does: the backbone copy's far larger
    # gradient has its own clipping budget (one global norm shrank the head's step several times over)
    from continual_mem.train import build_optimizer, train_step

    bb = make_backbone()
    x, y = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2])
    heads = {}
    for regime in ("head", "full"):
        model = MemoryViT(bb)
        task = model.add_task("t", 3, regime=regime)
        with torch.no_grad():
            task.head.weight.copy_(torch.linspace(-1, 1, task.head.weight.numel()).view_as(task.head.weight))
        opt = build_optimizer(model, "t", lr=0.5)
        assert len(opt.param_groups) == (2 if regime == "full" else 1)
        before = task.head.weight.detach().clone()
        train_step(model.train(), "t", x, y, opt, max_grad_norm=0.01)
        heads[regime] = task.head.weight.detach() - before
    assert heads["head"].abs().sum() > 0
    torch.testing.assert_close(heads["full"], heads["head"])


def test_probe_phase_trains_new_parameters_first_then_the_copies_on_their_own_schedule(monkeypatch):
    # LP-FT: during the probe only the head's group has a rate; the backbone copy starts after it, warms up and
    # decays to zero by the last step
    from continual_mem import train as train_mod
    from continual_mem.train import group_lr

    cfg = TrainConfig(steps=200, lr=0.2, probe_fraction=0.5, finetune_lr_scale=0.1)
    copies = [0.1 * group_lr(s, cfg, pretrained=True) for s in range(200)]
    assert copies[:100] == [0.0] * 100 and all(r > 0 for r in copies[100:])
    assert max(copies) == pytest.approx(0.02) and copies[100] < copies[102] < copies[104] and copies[-1] < 1e-3
    assert [group_lr(s, cfg, pretrained=False) for s in range(200)] == [lr_at(s, cfg) for s in range(200)]
    # the kind decides: copies wait for the probe to end
    assert group_lr(3, cfg, pretrained=True) == 0.0
    plain = TrainConfig(steps=40, lr=0.2, finetune_lr_scale=0.1)
    assert 0.1 * group_lr(3, plain, pretrained=True) == pytest.approx(0.1 * lr_at(3, plain))

    seen = []
    step = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", lambda model, task, x, y, opt, **kw: (
        seen.append([g["lr"] for g in opt.param_groups]), step(model, task, x, y, opt, **kw))[1])
    model = MemoryViT(make_backbone("tiny"))
    model.add_task("t", 4, regime="full")
    fit(model, "t", DeviceImages(quadrant_data(16, 0), PRE), None,
        TrainConfig(steps=4, batch_size=4, lr=0.1, probe_fraction=0.5), progress=False)
    assert [s[1] for s in seen[:2]] == [0.0, 0.0] and seen[2][1] > 0 and all(s[0] > 0 for s in seen)


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_probe_fraction_is_validated(fraction):
    with pytest.raises(ValueError, match="probe_fraction"):
        TrainConfig(probe_fraction=fraction)


def test_layer_decay_follows_timm_and_forks_share_the_full_copys_rates():
    # timm's layer-wise decay for the full copy (patch embedding least, final norm most); a fine-tuned fork's
    # copy of block i trains at exactly the rate the full copy gives block i
    from continual_mem.train import build_optimizer

    model = MemoryViT(make_backbone("tiny"))
    full = model.add_task("full", 3, regime="full")
    fork = model.add_task("fork", 3, memory=2, fork_layers=2, fork_finetune=True)
    rates = {}
    for name in ("full", "fork"):
        opt = build_optimizer(model, name, lr=1.0, finetune_lr_scale=0.1, layer_decay=0.5)
        rates[name] = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
        assert {g["kind"] for g in opt.param_groups} == {"new", "pretrained"}
    d = model.depth
    assert rates["full"][id(full.backbone.patch_embed.proj.weight)] == pytest.approx(0.1 * 0.5 ** (d + 1))
    assert rates["full"][id(full.backbone.norm.weight)] == pytest.approx(0.1 * 0.5)  # timm: with the last block
    assert rates["full"][id(full.head.weight)] == 1.0
    for j, block in enumerate(fork.blocks):
        i = d - len(fork.blocks) + j
        assert rates["fork"][id(block.mlp.fc1.weight)] == pytest.approx(0.1 * 0.5 ** (d - i))
        assert rates["fork"][id(block.mlp.fc1.weight)] == rates["full"][id(full.backbone.blocks[i].mlp.fc1.weight)]
    with pytest.raises(ValueError, match="layer_decay"):
        TrainConfig(layer_decay=0.0)


def test_full_fine_tuning_gets_layer_decay_by_default(monkeypatch):
    from continual_mem import train as train_mod
    from continual_mem.train import default_layer_decay

    assert default_layer_decay("full") == 0.75 and default_layer_decay("masked-memory") is None
    seen = []
    build = train_mod.build_optimizer
    monkeypatch.setattr(train_mod, "build_optimizer", lambda *a, **kw: (seen.append(kw["layer_decay"]), build(*a, **kw))[1])
    model = MemoryViT(make_backbone("tiny"))
    model.add_task("f", 4, regime="full")
    model.add_task("k", 4, memory=2, fork_layers=1, fork_finetune=True)
    src = DeviceImages(quadrant_data(8, 0), PRE)
    for name, decay in (("f", None), ("k", None), ("f", 1.0)):
        fit(model, name, src, None, TrainConfig(steps=1, batch_size=4, lr=0.1, layer_decay=decay), progress=False)
    assert seen == [0.75, None, 1.0]


class _SpySource:
    """Random batches that record whether deterministic algorithms were on when fit asked for them."""

    def __init__(self, seen: list) -> None:
        self.seen = seen

    def train_batch(self, step: int, batch_size: int, seed: int):
        self.seen.append(torch.are_deterministic_algorithms_enabled())
        g = torch.Generator().manual_seed(seed * 1000 + step)
        return torch.randn(batch_size, 3, 42, 42, generator=g), torch.randint(0, 3, (batch_size,), generator=g)

    def eval_batches(self, batch_size: int):
        yield self.train_batch(0, batch_size, 99)


def test_deterministic_training_turns_deterministic_algorithms_on_and_restores_them():
    seen: list = []
    weights = []
    for deterministic in (True, True, False):
        torch.manual_seed(0)
        model = MemoryViT(make_backbone("dinov2"))
        model.add_task("t", 3, memory=2)
        fit(model, "t", _SpySource(seen), None, TrainConfig(steps=3, batch_size=4, lr=0.1, deterministic=deterministic),
            progress=False)
        weights.append(model.tasks["t"].state_dict())
        assert not torch.are_deterministic_algorithms_enabled()  # restored after fit
    assert seen == [True] * 6 + [False] * 3
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
