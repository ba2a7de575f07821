"""Class statistics and task-agnostic scoring (continual_mem.class_stats): the sums against a plain reference, the
stored bytes, the scorers against textbook formulas, and the guarantee that adding a task changes no old score."""
import math

import numpy as np
import pytest
import torch

from continual_mem.class_stats import ClassStats, StatsError, TaskAgnostic, collect, combine


def blobs(seed: int, classes: int, n: int = 60, d: int = 6, spread: float = 3.0):
    """Anisotropic Gaussian classes: features (classes * n, d) and labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * spread
    mix = torch.randn(d, d, generator=g)
    h = torch.cat([centres[c] + torch.randn(n, d, generator=g) @ mix for c in range(classes)])
    y = torch.arange(classes).repeat_interleave(n)
    return h, y


def test_collect_matches_a_per_class_reference():
    h, y = blobs(0, 3)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    h, y = h[perm], y[perm]
    stats = collect("t", [(h[:50], y[:50]), (h[50:], y[50:])], 3)
    x, lab = h.double().numpy(), y.numpy()
    means = np.stack([x[lab == c].mean(0) for c in range(3)])
    scatter = sum((x[lab == c] - means[c]).T @ (x[lab == c] - means[c]) for c in range(3))
    assert stats.counts.tolist() == [60, 60, 60]
    np.testing.assert_allclose(stats.means.numpy(), means, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(stats.scatter.numpy(), scatter, rtol=1e-5, atol=1e-3)
    assert stats.means.dtype == stats.scatter.dtype == torch.float32


def test_collect_refuses_a_class_without_images_and_bad_labels():
    h, y = blobs(0, 3)
    with pytest.raises(StatsError, match=r"classes \[3\] have no training image"):
        collect("t", [(h, y)], 4)
    with pytest.raises(StatsError, match=r"labels must be in \[0, 2\)"):
        collect("t", [(h, y)], 2)
    with pytest.raises(StatsError, match="no images"):
        collect("t", [], 2)


def test_bytes_round_trip_exactly_and_corruption_is_one_line():
    h, y = blobs(2, 4)
    stats = collect("digits", [(h, y)], 4)
    data = stats.to_bytes()
    back = ClassStats.from_bytes(data)
    assert back.task == "digits" and back.to_bytes() == data and back.sha256() == stats.sha256()
    assert all(torch.equal(getattr(back, k), getattr(stats, k)) for k in ("means", "counts", "scatter"))
    with pytest.raises(StatsError) as exc:
        ClassStats.from_bytes(data[:40], source="blob")
    assert "blob" in str(exc.value) and "\n" not in str(exc.value)


def test_gaussian_scores_are_the_log_density_up_to_a_shared_constant():
    h, y = blobs(3, 3, n=200)
    stats = collect("t", [(h, y)], 3)
    s = 0.2
    agn = TaskAgnostic([stats], method="gaussian", shrinkage=s)
    n, d = len(y), h.shape[1]
    cov = stats.scatter.double() / (n - 3)
    cov = (1 - s) * cov + s * cov.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64), covariance_matrix=cov)
    x = h[:7].double()
    ref = torch.stack([dist.log_prob(x - stats.means[c].double()) for c in range(3)], 1)
    got = agn.scores(h[:7]).double()
    np.testing.assert_allclose(got.numpy(), (ref + 0.5 * d * math.log(2 * math.pi)).numpy(), rtol=1e-5, atol=1e-3)


def test_prototype_scores_are_cosines():
    h, y = blobs(4, 3)
    stats = collect("t", [(h, y)], 3)
    got = TaskAgnostic([stats], method="prototype").scores(h[:5])
    ref = torch.nn.functional.cosine_similarity(h[:5, None].double(), stats.means[None].double(), dim=-1)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["prototype", "gaussian"])
def test_adding_a_task_changes_no_old_score(method):
    """The guarantee: old columns keep their bits; an image whose winner is old keeps its answer unless the new
    task scores higher."""
    (h1, y1), (h2, y2), (h3, y3) = blobs(5, 2), blobs(6, 3), blobs(7, 2, spread=1.0)
    old = [collect("a", [(h1, y1)], 2), collect("b", [(h2, y2)], 3)]
    new = collect("c", [(h3, y3)], 2)
    x = torch.cat([h1[::10], h2[::10], h3[::10]])
    before = TaskAgnostic(old, method=method).scores(x)
    agn = TaskAgnostic([*old, new], method=method)
    after = agn.scores(x)
    assert torch.equal(after[:, :5], before)
    old_task, old_cls = combine(TaskAgnostic(old, method=method), before, mode="stats")
    task, cls = combine(agn, after, mode="stats")
    keeps = after[:, 5:].max(1).values < before.max(1).values
    assert keeps.any() and (~keeps).any()
    assert torch.equal(task[keeps], old_task[keeps]) and torch.equal(cls[keeps], old_cls[keeps])
    assert (task[~keeps] == 2).all()


def test_gaussian_beats_prototypes_on_anisotropic_classes():
    """What the statistics are for: with elongated classes, the covariance separates what cosines cannot."""
    h, y = blobs(8, 4, n=300, spread=1.5)
    stats = [collect("a", [(h[y < 2], y[y < 2])], 2), collect("b", [(h[y >= 2], y[y >= 2] - 2)], 2)]

    def accuracy(method: str) -> float:
        agn = TaskAgnostic(stats, method=method)
        task, cls = combine(agn, agn.scores(h), mode="stats")
        return float(((task * 2 + cls) == y).float().mean())

    assert accuracy("gaussian") > accuracy("prototype") + 0.1


def test_combine_head_takes_the_task_from_the_statistics_and_the_class_from_its_head():
    (h1, y1), (h2, y2) = blobs(9, 2), blobs(10, 3)
    agn = TaskAgnostic([collect("a", [(h1, y1)], 2), collect("b", [(h2, y2)], 3)])
    scores = agn.scores(torch.cat([h1[:4], h2[:4]]))
    heads = {"a": torch.tensor([[0.0, 1.0]] * 8), "b": torch.tensor([[0.0, 0.0, 5.0]] * 8)}
    task, cls = combine(agn, scores, heads, mode="head")
    assert task.tolist() == [0] * 4 + [1] * 4
    assert cls.tolist() == [1] * 4 + [2] * 4
    with pytest.raises(ValueError, match="needs every task's logits"):
        combine(agn, scores, {"a": heads["a"]}, mode="head")


def test_bad_arguments_are_value_errors():
    h, y = blobs(0, 2)
    stats = collect("a", [(h, y)], 2)
    with pytest.raises(ValueError, match="method"):
        TaskAgnostic([stats], method="knn")
    with pytest.raises(ValueError, match="shrinkage"):
        TaskAgnostic([stats], shrinkage=0.0)
    with pytest.raises(StatsError, match="at least one"):
        TaskAgnostic([])
    other = collect("b", [(torch.cat([h, h], 1), y)], 2)
    with pytest.raises(StatsError, match="feature sizes"):
        TaskAgnostic([stats, other])


def test_oas_shrinkage_is_scikit_learns():
    from sklearn.covariance import empirical_covariance, oas

    from continual_mem.class_stats import oas_shrinkage

    for n in (15, 60, 400):
        x = blobs(11, 1, n=n, d=8)[0].double().numpy()
        assert math.isclose(oas_shrinkage(torch.from_numpy(empirical_covariance(x)), n), oas(x)[1], rel_tol=1e-9)


def test_oas_shrinks_a_task_with_few_images_more():
    few, many = blobs(12, 2, n=6, d=8), blobs(12, 2, n=500, d=8)
    small, large = (collect("t", [b], 2) for b in (few, many))
    assert TaskAgnostic([small]).scores(few[0]).isfinite().all()  # 10 dof in 8 dims: invertible only when shrunk
    from continual_mem.class_stats import oas_shrinkage

    def s(st):
        n = int(st.counts.sum()) - 2
        return oas_shrinkage(st.scatter.double() / n, n)

    assert s(small) > 3 * s(large)
