"""CUDA-only behaviour: the CUDA-graph training step. These tests need a GPU; on a CPU-only machine they are
reported as skipped with the reason (run them with `pytest -m gpu` on a GPU host)."""
import copy

import pytest
import torch

from continual_mem import MemoryViT
from continual_mem.graphs import GraphedForward, GraphedTrainStep
from continual_mem.train import TrainConfig, build_optimizer, clip_grad_norm_per_group, fit, lr_at
from helpers import make_backbone, perturb
from scenarios.datasets import ImageSet
from scenarios.pipeline import DeviceImages, Preprocess

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU host)")]

REGIMES = [("masked-memory", {"memory": 3}), ("head+cls", {}), ("head", {}), ("memory", {"memory": 2}),
           ("masked-memory", {"memory": 2, "fork_layers": 2}),
           # two optimizer groups (the copied blocks at lr x finetune_lr_scale), each with its own lr tensor
           ("masked-memory", {"memory": 2, "fork_layers": 2, "fork_finetune": True}), ("full", {}), ("ladder", {})]


def _model() -> MemoryViT:
    m = MemoryViT(make_backbone("dinov2"))
    m.add_task("old", 5, memory=2)
    perturb(m.tasks["old"])
    return m.cuda()


@pytest.mark.parametrize("regime,kwargs", REGIMES)
def test_graphed_step_equals_eager_steps(regime, kwargs):
    """Six scheduled SGD steps replayed from the graph land where six eager steps do (fp32), and building the
    graph (its warm-up) trains nothing."""
    torch.manual_seed(0)
    base = _model()
    base.add_task("new", 7, regime=regime, **kwargs)
    base.cuda().train()
    eager, graphed = base, copy.deepcopy(base)
    cfg = TrainConfig(steps=6, lr=0.05, warmup_steps=2)
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(8, 3, 42, 42, device="cuda", generator=g),
                torch.randint(0, 7, (8,), device="cuda", generator=g)) for _ in range(6)]
    opt_e = build_optimizer(eager, "new", lr=cfg.lr)
    opt_g = build_optimizer(graphed, "new", lr=cfg.lr, cuda_graph=True)
    before = {k: v.clone() for k, v in graphed.tasks["new"].state_dict().items()}
    step = GraphedTrainStep(graphed, "new", opt_g, *batches[0], autocast_dtype=None)
    for k, v in graphed.tasks["new"].state_dict().items():
        assert torch.equal(v, before[k]), f"capture changed {k}"
    for i, (x, y) in enumerate(batches):
        for group in opt_e.param_groups:
            group["lr"] = lr_at(i, cfg) * group["lr_scale"]
        loss = torch.nn.functional.cross_entropy(eager(x, tasks=["new"], original=False)["new"], y)
        opt_e.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_per_group(opt_e, 1.0)
        opt_e.step()
        loss_g = step(x, y, lr_at(i, cfg))
        torch.testing.assert_close(loss_g, loss.detach(), atol=1e-5, rtol=1e-5)
    moved = 0.0
    for k, v in eager.tasks["new"].state_dict().items():
        torch.testing.assert_close(graphed.tasks["new"].state_dict()[k], v, atol=1e-5, rtol=1e-4)
        moved += float((v - before[k]).abs().sum())
    assert moved > 0
    # the graph wrote behind autograd's version counters: inference must see the new memory, not a stale cache
    graphed.eval()
    x = batches[0][0]
    with torch.no_grad():
        ref = eager.eval()(x, tasks=["new"])["new"]
        torch.testing.assert_close(graphed(x, tasks=["new"])["new"], ref, atol=1e-4, rtol=1e-4)


def test_graph_training_preserves_old_tasks_and_stale_graphs_refuse():
    model = _model().eval()
    x = torch.randn(4, 3, 42, 42, device="cuda")
    with torch.no_grad():
        before = model(x)
    forward = GraphedForward(model, x)
    model.add_task("new", 3, memory=2)
    model.cuda().train()
    opt = build_optimizer(model, "new", lr=0.1, cuda_graph=True)
    step = GraphedTrainStep(model, "new", opt, x, torch.zeros(4, dtype=torch.long, device="cuda"))
    for i in range(3):
        step(x, torch.full((4,), i % 3, device="cuda"), 0.1)
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after["original"], before["original"]) and torch.equal(after["old"], before["old"])
    with pytest.raises(RuntimeError, match="changed since capture"):
        forward(x)


@pytest.mark.parametrize("regime", ["masked-memory", "full"])
def test_fit_with_cuda_graph_matches_eager_fit(regime):
    # full: several rate groups (layer decay), a probe phase whose copies sit at rate 0, momentum reset after it
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (96,), generator=g)
    imgs = (torch.randint(0, 40, (96, 1, 16, 16), generator=g) + (labels * 60).view(-1, 1, 1, 1)).clamp(0, 255)
    data = ImageSet(imgs.to(torch.uint8), labels)
    pre = Preprocess(img_size=42, mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=0.875, augment="flip")
    runs = {}
    for graph in (False, True):
        torch.manual_seed(0)
        model = _model()
        model.add_task("new", 4, **({"memory": 2} if regime == "masked-memory" else {"regime": "full"}))
        model.cuda()
        src = DeviceImages(data, pre, "cuda")
        extra = {} if regime == "masked-memory" else {"probe_fraction": 0.25, "layer_decay": 0.5}
        result = fit(model, "new", src, src, TrainConfig(steps=12, batch_size=16, lr=0.05, eval_every=4, amp="off",
                                                         cuda_graph=graph, **extra), progress=False)
        runs[graph] = (result, model.tasks["new"].state_dict())
    assert runs[True][0].best_step == runs[False][0].best_step
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, atol=1e-4, rtol=1e-4)


def test_cuda_graph_config_errors():
    model = _model()
    model.add_task("new", 3, memory=2)
    opt = build_optimizer(model, "new", lr=0.1)  # float lr: not replayable at a new lr
    x = torch.zeros(2, 3, 42, 42, device="cuda")
    with pytest.raises(ValueError, match="lr as a CUDA tensor"):
        GraphedTrainStep(model, "new", opt, x, torch.zeros(2, dtype=torch.long, device="cuda"))
    opt = build_optimizer(model, "new", lr=0.1, cuda_graph=True)
    step = GraphedTrainStep(model, "new", opt, x, torch.zeros(2, dtype=torch.long, device="cuda"))
    with pytest.raises(ValueError, match="same shape"):
        step(torch.zeros(3, 3, 42, 42, device="cuda"), torch.zeros(3, dtype=torch.long, device="cuda"), 0.1)


@pytest.mark.parametrize("regime,kwargs", [("masked-memory", {"memory": 3}),
                                           ("masked-memory", {"memory": 2, "fork_layers": 2, "fork_finetune": True}),
                                           ("memory", {"memory": 2}), ("full", {}), ("ladder", {})])
def test_deterministic_trainings_give_equal_task_tensors(regime, kwargs):
    """``TrainConfig(deterministic=True)``: the same seed and data twice (bf16 autocast, SDPA and Triton backward,
    batch 64) give bit-identical task tensors."""
    from continual_mem.step import deterministic_algorithms

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(64, 3, 42, 42, device="cuda", generator=g)
    y = torch.randint(0, 7, (64,), device="cuda", generator=g)

    class Source:
        def train_batch(self, step, batch_size, seed):
            idx = torch.randperm(64, generator=torch.Generator().manual_seed(seed + step))[:batch_size].cuda()
            return x[idx], y[idx]

        def eval_batches(self, batch_size):
            yield x, y

    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _model()
        model.add_task("new", 7, regime=regime, **kwargs)
        model.cuda()
        fit(model, "new", Source(), Source(), TrainConfig(steps=8, batch_size=64, lr=0.05, eval_every=4,
                                                          deterministic=True), progress=False)
        states.append({k: v.clone() for k, v in model.tasks["new"].state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), "deterministic runs differ"
    with deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
