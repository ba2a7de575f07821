"""The attention policy against the paper's Table 1, cell by cell."""
import pytest
import torch

from continual_mem.masking import TokenSpec, build_attention_mask, visible_tasks

B, T, M = "backbone", "task", "memory"


def layout(*cells):
    return [TokenSpec(k, t) for k, t in cells]


# rows = queries, columns = keys: [CLS/patches, task0 token, task0 memory, task1 token, task1 memory]
LAYOUT = layout((B, -1), (B, -1), (T, 0), (M, 0), (T, 1), (M, 1))

CONCATENATION = [
    # pch pch t0 m0 t1 m1
    [1, 1, 0, 0, 0, 0],  # CLS / patch
    [1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0],  # task 0 token: backbone, itself, its memory
    [0, 0, 0, 1, 0, 0],  # memory 0 is never a query (sees only itself, output dropped)
    [1, 1, 0, 0, 1, 1],  # task 1 token: backbone, itself, its memory, NOT task 0
    [0, 0, 0, 0, 0, 1],
]
EXTENSION = [
    [1, 1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0],  # task 0 never sees the newer task 1
    [0, 0, 0, 1, 0, 0],
    [1, 1, 1, 1, 1, 1],  # task 1 (extension) also sees task 0's token and memory
    [0, 0, 0, 0, 0, 1],
]


def test_concatenation_table():
    mask = build_attention_mask(LAYOUT, ["concatenation", "concatenation"])
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[bool(c) for c in row] for row in CONCATENATION]


def test_extension_table():
    mask = build_attention_mask(LAYOUT, ["concatenation", "extension"])
    assert mask.tolist() == [[bool(c) for c in row] for row in EXTENSION]


def test_three_task_extension_layout():
    lay = layout((B, -1), (T, 0), (M, 0), (T, 1), (M, 1), (T, 2), (M, 2))
    modes = ["extension", "concatenation", "extension"]
    mask = build_attention_mask(lay, modes)
    expected = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],  # task 0: nothing earlier to see
        [0, 0, 1, 0, 0, 0, 0],
        [1, 0, 0, 1, 1, 0, 0],  # task 1 (concatenation): only itself
        [0, 0, 0, 0, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],  # task 2 (extension): tasks 0 and 1 and itself
        [0, 0, 0, 0, 0, 0, 1],
    ]
    assert mask.tolist() == [[bool(c) for c in row] for row in expected]
    # no token ever attends to a newer task's token or memory
    for q, tq in enumerate(lay):
        for k, tk in enumerate(lay):
            if tq.kind == "task" and tk.kind != "backbone" and tk.task > tq.task:
                assert not mask[q, k]


def test_every_row_can_attend_somewhere():
    lay = layout((B, -1), (T, 0), (M, 0), (M, 0), (T, 1))
    assert build_attention_mask(lay, ["concatenation", "extension"]).any(dim=1).all()


def test_visible_tasks():
    assert visible_tasks(0, ["extension"]) == (0,)
    assert visible_tasks(2, ["concatenation", "extension", "concatenation"]) == (2,)
    assert visible_tasks(2, ["concatenation", "extension", "extension"]) == (0, 1, 2)
    with pytest.raises(ValueError, match="out of range"):
        visible_tasks(3, ["concatenation"])


def test_unknown_task_in_layout_is_rejected():
    with pytest.raises(ValueError, match="outside"):
        build_attention_mask(layout((B, -1), (T, 3)), ["concatenation"])


P = "private"
# task 0 forked at this layer (its tokens and its private copy of the patches), task 1 not:
# [patch, t0 token, t0 private patch, t0 memory, t1 token, t1 memory]
FORK_LAYOUT = layout((B, -1), (T, 0), (P, 0), (M, 0), (T, 1), (M, 1))
FORKED = [
    # pch t0 p0 m0 t1 m1
    [1, 0, 0, 0, 0, 0],  # the shared patches never see a branch
    [0, 1, 1, 1, 0, 0],  # task 0's token, inside its branch: its tokens, private patches and memory only
    [0, 1, 1, 1, 0, 0],  # task 0's private patches: the same, never the shared patches
    [0, 0, 0, 1, 0, 0],  # memory: only itself
    [1, 0, 0, 0, 1, 1],  # task 1 (not forked) reads the shared patches, never task 0's private ones
    [0, 0, 0, 0, 0, 1],
]


def test_late_fork_table():
    got = build_attention_mask(FORK_LAYOUT, ["concatenation", "concatenation"], frozenset({0}))
    assert got.int().tolist() == FORKED
    # before the fork layer (not in forked) task 0's token reads the shared patches as any token task does
    before = build_attention_mask(FORK_LAYOUT, ["concatenation", "concatenation"]).int().tolist()
    assert before[1] == [1, 1, 0, 1, 0, 0] and before[4] == FORKED[4]


def test_a_forked_task_in_extension_mode_and_tasks_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"^task 0 is forked but in extension mode; a late fork needs concatenation "
                                         r"mode$"):
        build_attention_mask(FORK_LAYOUT[:4], ["extension"], frozenset({0}))
    with pytest.raises(ValueError, match=r"names a task outside 0\.\.0$"):
        build_attention_mask(layout((B, -1), (T, 1)), ["concatenation"])
    with pytest.raises(ValueError, match=r"^task index 1 out of range for 1 tasks$"):
        visible_tasks(1, ["concatenation"])
    with pytest.raises(ValueError, match=r"^unknown mode 'sideways'$"):
        visible_tasks(0, ["sideways"])
