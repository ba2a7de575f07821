"""What `add-task DATASET` trains with no flags: the default fork follows the model, given values are kept, and a
short sweep on the held-out split picks the rate."""
import pytest

from scenarios import default_recipe
from scenarios.default_recipe import Fork, resolve_fork, short_steps

VIT_S = dict(depth=12, patches=256)


def fork(**kw):
    args = dict(**VIT_S, has_tokens=True, mode="concatenation", layers=None, select=None, finetune=None, pooled=False)
    return resolve_fork(**{**args, **kw})


def test_the_default_is_the_measured_fork_on_vit_s_at_224px():
    assert fork() == Fork(layers=8, select=96, finetune=True)
    assert fork(depth=4, patches=16) == Fork(layers=3, select=6, finetune=True)  # shares of the model's own size
    assert fork(depth=1, patches=1) == Fork(layers=1, select=1, finetune=True)


def test_no_default_fork_where_a_fork_cannot_run():
    assert fork(has_tokens=False) == Fork(0, 0, False)  # head, own-pass and side regimes
    assert fork(mode="extension") == Fork(0, 0, False)


def test_given_values_are_kept_and_a_given_fork_is_the_plain_one():
    assert fork(layers=0) == Fork(0, 0, False)
    assert fork(layers=3) == Fork(3, 0, False)  # as before the default fork existed
    assert fork(layers=3, select=64, finetune=True) == Fork(3, 64, True)
    assert fork(select=0) == Fork(8, 0, True)
    assert fork(finetune=False) == Fork(8, 96, False)
    assert fork(pooled=True) == Fork(8, 0, True)  # pooling and selection exclude each other


def test_short_runs_and_refusals():
    assert short_steps(1000) == 200 and short_steps(3) == 1 and short_steps(1) == 1
    assert default_recipe.SHORT_RATES == (0.05, 0.1, 0.2)
    with pytest.raises(ValueError, match=r"^steps must be >= 1, got 0$"):
        short_steps(0)
    with pytest.raises(ValueError, match=r"^need depth >= 1 and patches >= 1, got 0 and 4$"):
        fork(depth=0, patches=4)


def test_training_length_follows_the_data():
    steps = default_recipe.training_steps
    # 32 passes, within [2,000, 20,000]: the measured sets (6-8k images) get the 2,000 they were measured at
    assert steps(train_images=8_000, batch_size=128) == 2_000
    assert steps(train_images=500, batch_size=128) == 2_000
    assert steps(train_images=20_000, batch_size=128) == 5_000  # 32 × 20,000 / 128
    assert steps(train_images=20_001, batch_size=128) == 5_001  # rounded up
    assert steps(train_images=76_128, batch_size=128) == 19_032  # SUN397's train split
    assert steps(train_images=2_700_000, batch_size=128) == 20_000  # the paper's schedule at most
    assert steps(train_images=100, batch_size=10, epochs=2.5) == 25
    assert steps(train_images=3, batch_size=128, epochs=1) == 1
    assert steps(train_images=8_000, batch_size=128, steps=7) == 7  # given: kept
    for kw, message in [(dict(steps=5, epochs=1.0), "give steps or epochs, not both"),
                        (dict(train_images=0), "need train_images >= 1 and batch_size >= 1, got 0 and 128")]:
        with pytest.raises(ValueError, match=f"^{message}$"):
            steps(**{"train_images": 10, "batch_size": 128, **kw})
