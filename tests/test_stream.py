"""Avalanche integration: masked tasks show exactly zero forgetting under Avalanche's own metric; Naive forgets."""
import pytest
import torch

pytest.importorskip("avalanche", reason="needs the avalanche extra: pip install -e '.[avalanche]'")

from continual_mem import MemoryViT  # noqa: E402
from helpers import bright_regions, make_backbone  # noqa: E402
from scenarios.compare import CompareConfig, heatmap, markdown, run_strategy  # noqa: E402
from scenarios.datasets import ImageSet, TaskData  # noqa: E402
from scenarios.stream import AvalancheMemoryViT, task_stream  # noqa: E402
from test_train import quadrant_data  # noqa: E402


def quadrants(n: int, seed: int) -> ImageSet:
    """Class = which quadrant is bright: a different cue from the first task's overall brightness."""
    return bright_regions(n, seed, [(slice(r * 8, r * 8 + 8), slice(q * 8, q * 8 + 8))
                                    for r, q in (divmod(c, 2) for c in range(4))], 16)


@pytest.fixture(scope="module")
def stream():
    bb = make_backbone("tiny")
    t1 = TaskData("bright", tuple("0123"), quadrant_data(160, 0), quadrant_data(64, 1), "none")
    t2 = TaskData("quadrants", tuple("0123"), quadrants(160, 2), quadrants(64, 3), "none")
    return bb, task_stream([t1, t2], backbone=bb)


@pytest.mark.slow
def test_masked_memory_forgets_exactly_nothing_while_naive_forgets(stream):
    bb, st = stream
    # same budget (8 epochs of 160 images); full fine-tuning at a rate that moves the backbone
    cfg = CompareConfig(epochs=8, batch_size=32, lr=0.005, baseline_lr=0.3, memory=2)
    ours = run_strategy("masked-memory", st, bb, cfg)
    assert ours.forgetting_per_task["bright"] == 0.0 and ours.forgetting == 0.0  # Avalanche's own metric
    assert ours.accuracy_matrix[1][0] == ours.accuracy_matrix[0][0]
    assert ours.accuracy_matrix[0][0] > 0.5  # it did learn the first task (chance: 0.25)
    naive = run_strategy("naive", st, bb, cfg)
    assert naive.accuracy_matrix[0][0] > 0.4
    assert naive.forgetting_per_task["bright"] > 0.1
    assert naive.trainable_params_per_task[0] > 100 * ours.trainable_params_per_task[0]
    table = markdown([ours, naive, run_strategy("l2p", st, bb, cfg)], st.names)
    assert "| masked-memory |" in table and "not run" in table


def test_wrapper_adds_one_task_per_label_and_trains_only_it(stream):
    bb, st = stream
    model = AvalancheMemoryViT(MemoryViT(bb), memory=2, task_names=st.names)
    model.train()
    for exp in st.benchmark.train_stream:
        model.adaptation(exp)
    assert model.model.task_names == ["bright", "quadrants"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.tasks.quadrants.") for n in trainable)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        both = model(x, torch.tensor([0, 1, 0]))
        assert both.shape == (3, 4)
        assert torch.equal(both[0], model(x, 0)[0]) and torch.equal(both[1], model(x, 1)[1])
        assert set(model(x, None)) == {0, 1}


def test_heatmap_is_written(tmp_path, stream):
    from scenarios.compare import StrategyResult

    r = StrategyResult("x", accuracy_matrix=[[0.5, 0.1], [0.5, 0.9]])
    heatmap([r], ["a", "b"], tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000


@pytest.mark.parametrize("strategy", ["lwf", "ewc", "head", "memory"])
def test_other_strategies_run(stream, strategy):
    bb, st = stream
    r = run_strategy(strategy, st, bb, CompareConfig(epochs=1, batch_size=64, lr=0.005, baseline_lr=0.01, memory=2))
    assert len(r.accuracy_matrix) == 2 and all(0.0 <= a <= 1.0 for row in r.accuracy_matrix for a in row)
    if strategy in ("head", "memory"):  # frozen earlier tasks: Avalanche measures no forgetting at all
        assert r.forgetting == 0.0


def test_paper_recipe_plugin_warms_up_decays_restarts_and_clips(stream):
    """Inside Avalanche's own loop: every experience restarts warm-up + cosine from the strategy's lr, and the
    gradients reaching the optimizer step are clipped."""
    from avalanche.core import SupervisedPlugin
    from avalanche.training import Naive

    from scenarios.compare import evaluator
    from scenarios.stream import PaperRecipePlugin

    bb, st = stream

    class Spy(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.lrs, self.norms = [], []

        def before_update(self, strategy, *args, **kwargs):
            self.lrs.append(strategy.optimizer.param_groups[0]["lr"])
            grads = [p.grad for g in strategy.optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    model = AvalancheMemoryViT(MemoryViT(bb), memory=2, task_names=st.names)
    spy = Spy()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=2, device="cpu",
                     plugins=[PaperRecipePlugin(warmup_fraction=0.2, max_grad_norm=0.01), spy], evaluator=evaluator())
    for exp in st.benchmark.train_stream:
        strategy.train(exp)
    per_exp = 2 * 5  # 2 epochs of 160 images in batches of 32
    assert len(spy.lrs) == 2 * per_exp
    first, second = spy.lrs[:per_exp], spy.lrs[per_exp:]
    assert first == second  # restarted per experience
    assert first[0] == pytest.approx(0.25) and first[1] == pytest.approx(0.5)  # 2 warm-up steps to the peak
    assert first[2] == first[1] and all(a > b for a, b in zip(first[2:], first[3:])) and first[-1] > 0  # cosine
    assert max(spy.norms) <= 0.01 * (1 + 1e-4)
    with pytest.raises(ValueError, match="warmup_fraction"):
        PaperRecipePlugin(warmup_fraction=1.5)


def test_image_folders_join_a_stream_through_prepared_copies(tmp_path):
    """A JPEG folder is an experience like any decoded set: prepared once, samples preprocessed as in eval."""
    from scenarios.synthetic import make_image_folder

    make_image_folder(tmp_path / "photos", classes=3, per_class=8, size=(40, 30))
    bb = make_backbone("tiny")
    digits = TaskData("bright", tuple("0123"), quadrant_data(40, 0), quadrant_data(16, 1), "none")
    st = task_stream([digits, f"imagefolder:{tmp_path / 'photos'}"], backbone=bb, cache_dir=str(tmp_path / "c"))
    exp = st.benchmark.train_stream[1]
    x, y, t = exp.dataset[0]
    assert x.shape == (3, 32, 32) and t == 1 and 0 <= y < 3
    assert len(exp.dataset) + len(st.benchmark.test_stream[1].dataset) == 24
    assert len(list((tmp_path / "c").glob("*/meta.json"))) == 2
