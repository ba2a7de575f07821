"""The evaluation protocol's policy (held-out share, grids, divergence, learning-rate choice)."""
import math

import pytest

from scenarios.protocol import choose_lr, diverged, heldout_fraction, log_grid, parse_grid


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
