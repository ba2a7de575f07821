import torch

from scenarios.splits import stratified_split


def test_split_is_deterministic_disjoint_complete_and_stratified():
    labels = torch.arange(1000) % 7
    labels[::13] = 3  # uneven class sizes
    keep, held = stratified_split(labels, holdout=0.05, seed=123)
    keep2, held2 = stratified_split(labels, holdout=0.05, seed=123)
    assert torch.equal(keep, keep2) and torch.equal(held, held2)
    assert set(keep.tolist()).isdisjoint(held.tolist())
    assert sorted(keep.tolist() + held.tolist()) == list(range(1000))
    for c in range(7):
        n = int((labels == c).sum())
        assert int((labels[held] == c).sum()) == round(0.05 * n)
    other = stratified_split(labels, holdout=0.05, seed=124)[1]
    assert not torch.equal(held, other)


def test_split_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    stratified_split(torch.arange(50) % 5, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_classes_keep_one_example_each_side():
    keep, held = stratified_split(torch.tensor([0, 0, 1, 1, 2]), holdout=0.05)
    assert held.tolist() == sorted(held.tolist()) and len(held) == 2 and len(keep) == 3
