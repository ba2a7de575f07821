"""The evaluation protocol's policy (held-out share, grids, divergence, learning-rate choice)."""
import math

import pytest

from scenarios.protocol import choose_lr, diverged, final_runs, heldout_fraction, log_grid, parse_grid


def test_heldout_share_has_a_floor_in_images():
    assert heldout_fraction(100_000) == 0.05
    assert heldout_fraction(5_000) == pytest.approx(0.1)  # 500 images, not 250
    assert heldout_fraction(1_400) == 0.2  # capped: 280 images, not 70
    with pytest.raises(ValueError):
        heldout_fraction(1)


def test_grids():
    assert log_grid(0.01, 1.0, 5) == (0.01, 0.032, 0.1, 0.32, 1.0)
    assert parse_grid("0.001:0.1:3") == (0.001, 0.01, 0.1)
    assert parse_grid("0.03,0.1") == (0.03, 0.1)
    with pytest.raises(ValueError, match="LO:HI:N"):
        parse_grid("1:2")
    with pytest.raises(ValueError, match="> 0"):
        parse_grid("0,0.1")


def run(lr, seed, acc, loss=0.5):
    return {"lr": lr, "seed": seed, "heldout_accuracy": acc, "final_loss": loss}


def test_divergence():
    assert diverged(run(0.3, 0, 0.11), num_classes=10)  # chance
    assert diverged(run(0.3, 0, 0.9, loss=math.nan), num_classes=10)
    assert not diverged(run(0.3, 0, 0.5), num_classes=10)


def test_choice_averages_seeds_and_never_picks_a_rate_that_diverged():
    sweep = [run(0.1, 0, 0.80), run(0.1, 1, 0.80),
             run(0.3, 0, 0.95), run(0.3, 1, 0.10),  # best single run, but one seed diverged
             run(0.03, 0, 0.79), run(0.03, 1, 0.83)]
    assert choose_lr(sweep, num_classes=10) == 0.03  # mean 0.81 beats 0.80; 0.3 is out
    assert choose_lr(sweep, num_classes=10, exclude=[0.03]) == 0.1
    tie = [run(0.1, 0, 0.8), run(0.01, 0, 0.8)]
    assert choose_lr(tie, num_classes=10) == 0.01
    assert choose_lr([run(0.3, 0, 0.1), run(1.0, 0, 0.05)], num_classes=10) == 0.3  # all diverged: best mean


def test_heldout_share_boundaries_and_bad_arguments():
    assert heldout_fraction(2, min_images=0) == 0.05  # two images can be split
    assert heldout_fraction(10_000, min_images=500) == 0.05  # the floor lands exactly on the base share
    assert heldout_fraction(500, min_images=50, base=0.1, cap=0.1) == 0.1
    for kw in (dict(base=0.0), dict(base=-0.1), dict(base=0.3, cap=0.2), dict(cap=1.0)):
        with pytest.raises(ValueError, match=r"need 0 < base <= cap < 1"):
            heldout_fraction(1000, **kw)
    with pytest.raises(ValueError, match="at least 2 training images, got 1"):
        heldout_fraction(1)


def test_log_grid_edges_and_bad_arguments():
    assert log_grid(0.0123, 0.5, 1) == (0.012,)  # one rate: lo, two significant digits
    assert log_grid(0.01, 0.1, 2) == (0.01, 0.1)
    assert log_grid(0.1, 0.1, 3) == (0.1, 0.1, 0.1)
    for args in ((0.0, 1.0, 3), (-1.0, 1.0, 2), (1.0, 0.1, 3), (0.01, 1.0, 0)):
        with pytest.raises(ValueError, match=r"need 0 < lo <= hi and n >= 1"):
            log_grid(*args)


def test_divergence_boundaries():
    assert diverged(run(0.3, 0, 0.25), num_classes=4, margin=0.0)  # exactly chance: did not learn
    assert not diverged(run(0.3, 0, 0.15), num_classes=10)  # above chance + 2 points (0.12), below twice chance
    assert diverged(run(0.3, 0, 0.9, loss=math.inf), num_classes=10)
    assert not diverged({"heldout_accuracy": 0.9}, num_classes=10)  # no loss recorded: accuracy decides


def test_no_rate_left_is_named():
    with pytest.raises(ValueError, match="^no learning rate left to choose from$"):
        choose_lr([run(0.1, 0, 0.8)], num_classes=10, exclude=[0.1])


def test_final_runs_move_to_the_next_rate_when_a_final_seed_diverges():
    sweep = [run(0.1, 0, 0.80), run(0.3, 0, 0.90), run(0.03, 0, 0.70)]
    finals = {(0, 0.3): run(0.3, 0, 0.9), (2, 0.3): run(0.3, 2, 0.05),  # seed 2 diverges at the best rate
              (0, 0.1): run(0.1, 0, 0.8), (2, 0.1): run(0.1, 2, 0.79)}
    asked = []

    def get_run(seed, lr):
        asked.append((seed, lr))
        return finals[(seed, lr)]

    lr, got, tried = final_runs(sweep, [0, 2], 10, get_run)
    assert (lr, tried) == (0.1, [0.3]) and got == {0: finals[(0, 0.1)], 2: finals[(2, 0.1)]}
    assert asked == [(0, 0.3), (2, 0.3), (0, 0.1), (2, 0.1)]
    # every rate diverges somewhere: the last one tried is reported, not an endless search
    bad = {(s, r): run(r, s, 0.01) for s in (0, 2) for r in (0.1, 0.3, 0.03)}
    lr, got, tried = final_runs(sweep, [0, 2], 10, lambda s, r: bad[(s, r)])
    assert lr == 0.03 and tried == [0.3, 0.1] and all(diverged(r, 10) for r in got.values())
    # no divergence: the sweep's choice, nothing rejected
    good = {(s, r): run(r, s, 0.9) for s in (0, 2) for r in (0.1, 0.3, 0.03)}
    assert final_runs(sweep, [0, 2], 10, lambda s, r: good[(s, r)])[::2] == (0.3, [])


def test_a_rate_with_a_diverged_seed_loses_even_with_the_best_mean():
    sweep = [run(0.3, 0, 0.99), run(0.3, 1, 0.12),  # mean 0.555, but seed 1 is at chance + 2 points
             run(0.1, 0, 0.50), run(0.1, 1, 0.50)]
    assert choose_lr(sweep, num_classes=10) == 0.1
