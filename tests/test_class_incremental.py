"""Class-incremental streams (scenarios.class_incremental): our learner keeps every earlier task's outputs and
statistics bit-exact while new classes arrive, answers over all seen classes, and the prototype baseline trains
nothing."""
import pytest
import torch

pytest.importorskip("avalanche", reason="needs the avalanche extra: pip install -e '.[avalanche]'")

from helpers import bright_regions, make_backbone  # noqa: E402
from scenarios.class_incremental import AgnosticLearner, class_stream, run_learner, summary  # noqa: E402
from scenarios.compare import CompareConfig  # noqa: E402
from scenarios.datasets import ImageSet, TaskData  # noqa: E402


def bright_band(n: int, seed: int) -> ImageSet:
    """Six classes: which of six vertical bands is bright."""
    return bright_regions(n, seed, [(slice(None), slice(c * 4, c * 4 + 4)) for c in range(6)], 24)


@pytest.fixture(scope="module")
def setting():
    bb = make_backbone("tiny")
    data = TaskData("bands", tuple("abcdef"), bright_band(240, 0), bright_band(96, 1), "none")
    bm, _ = class_stream(data, experiences=3, seed=0, backbone=bb)
    return bb, bm


def test_the_stream_splits_disjoint_classes(setting):
    _, bm = setting
    seen = [set(e.classes_in_this_experience) for e in bm.train_stream]
    assert len(seen) == 3 and all(len(s) == 2 for s in seen) and set().union(*seen) == set(range(6))
    with pytest.raises(ValueError, match="--experiences must be between 1 and 6"):
        class_stream(TaskData("bands", tuple("abcdef"), bright_band(12, 0), bright_band(12, 1), "none"),
                     experiences=7, seed=0, backbone=make_backbone("tiny"))


def test_ours_keeps_old_tasks_and_statistics_bit_exact_and_answers_over_all_classes(setting, monkeypatch):
    bb, bm = setting
    kept = {}
    finish = AgnosticLearner.finish

    def spy(self, dataset, **kw):  # after each experience: every earlier task's outputs and statistics
        finish(self, dataset, **kw)
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        out = self.model(x, original=False)
        kept[len(self.stats)] = ({n: v.clone() for n, v in out.items()}, [s.to_bytes() for s in self.stats])

    monkeypatch.setattr(AgnosticLearner, "finish", spy)
    cfg = CompareConfig(epochs=3, batch_size=32, lr=0.05, memory=2)
    result = run_learner("ours", bm, bb, cfg, seed=0, num_classes=6, regime="masked-memory")
    assert len(result.accuracy_matrix) == 3 and all(len(r) == 3 for r in result.accuracy_matrix)
    for k in (1, 2):
        outs, stats = kept[k]
        later_outs, later_stats = kept[3]
        assert all(torch.equal(outs[n], later_outs[n]) for n in outs)  # torch.equal, never allclose
        assert later_stats[:k] == stats
    assert result.final_average_accuracy > 1 / 6 + 0.1  # over all six classes, the experience not given


def test_the_prototype_baseline_trains_nothing(setting):
    bb, bm = setting
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    result = run_learner("prototype", bm, bb, CompareConfig(epochs=1, batch_size=32), seed=0, num_classes=6)
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in before.items())
    assert 0.0 <= result.final_average_accuracy <= 1.0
    rows = summary([result])
    assert rows[0]["learner"] == "prototype" and rows[0]["seeds"] == [0]
    with pytest.raises(ValueError, match="unknown learner 'icarl'"):
        run_learner("icarl", bm, bb, CompareConfig(), seed=0, num_classes=6)
