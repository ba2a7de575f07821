"""Gathered heads (continual_mem.head_table): the tables of padded heads, the slots a row's linear-head tasks
take, the product, and the model's cached table of linear-head tasks (rebuilt on every change of its heads)."""
import pytest
import torch
import torch.nn.functional as F

from helpers import make_backbone, perturb

from continual_mem import MemoryViT
from continual_mem.head_table import (HeadTable, gathered_product, head_rows, head_slots, head_task_names,
                                      head_task_table, row_heads)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    net = MemoryViT(make_backbone("tiny"))
    perturb(net.add_task("h3", 3, regime="head"), seed=1)
    net.add_task("tok", 4, memory=2)  # a token task: not in the head table
    perturb(net.add_task("h40", 40, regime="head"), seed=2)
    perturb(net.add_task("h9", 9, regime="head"), seed=3)
    return net.eval()


def test_head_rows_pad_each_head_to_its_width_after_a_zero_row(model):
    tasks = [model.tasks[n] for n in ("h3", "h40", "h9")]
    table = head_rows(tasks, model.backbone.embed_dim)
    assert table.head_at == {"h3": (16, 1), "h40": (64, 1), "h9": (16, 2)}
    weights, biases = table.heads[16]
    assert weights.shape == (3, 16, model.backbone.embed_dim) and biases.shape == (3, 16)
    assert not weights[0].any() and not biases[0].any()
    assert torch.equal(weights[2, :9], model.tasks["h9"].head.weight) and not weights[2, 9:].any()
    assert torch.equal(biases[1, :3], model.tasks["h3"].head.bias) and not biases[1, 3:].any()


def test_a_gathered_product_is_each_row_s_own_head(model):
    table = head_rows([model.tasks[n] for n in ("h3", "h9")], model.backbone.embed_dim)
    feats = torch.randn(4, model.backbone.embed_dim, generator=torch.Generator().manual_seed(0))
    at = torch.tensor([1, 0, 2, 1])
    out = gathered_product(table.heads[16], feats, at)
    assert out.shape == (4, 16)
    h3, h9 = model.tasks["h3"].head, model.tasks["h9"].head
    torch.testing.assert_close(out[0, :3], F.linear(feats[0], h3.weight, h3.bias))
    torch.testing.assert_close(out[2, :9], F.linear(feats[2], h9.weight, h9.bias))
    assert not out[1].any() and not out[0, 3:].any()  # the zero head; padded columns stay zero
    other = gathered_product(table.heads[16], torch.cat([feats[:1], -feats[1:]]), torch.tensor([1, 2, 0, 2]))
    assert torch.equal(other[0], out[0])  # a row's bits: its features and its head, not its neighbours'


def test_head_slots_put_a_row_s_s_th_head_task_in_slot_s():
    table = HeadTable({16: (torch.zeros(3, 16, 2), torch.zeros(3, 16)), 64: (torch.zeros(2, 64, 2),
                       torch.zeros(2, 64))}, {"a": (16, 1), "b": (16, 2), "w": (64, 1)})
    routes = [["b", "x", "a"], [], ["w", "a"], ["x"]]
    assert row_heads(routes[0], table) == ["b", "a"]
    assert head_slots(routes, table, 2) == {(0, 16): [2, 0, 0, 0], (1, 16): [1, 0, 1, 0], (0, 64): [0, 0, 1, 0]}
    with pytest.raises(ValueError, match="3 linear-head tasks, more than 2; split it"):
        head_slots([["a", "b", "w"]], table, 2)


@torch.no_grad()  # as a pass runs (while a head trains, the table is rebuilt on every call)
def test_the_model_s_head_table_is_cached_and_rebuilt_on_every_change(model):
    assert head_task_names(model) == ["h3", "h40", "h9"]
    first = head_task_table(model, {})
    assert head_task_table(model, {}) is first  # cached across passes
    model.tasks["h9"].head.weight.add_(1.0)  # a head trains in place
    again = head_task_table(model, {})
    assert again is not first and torch.equal(again.heads[16][0][2, :9], model.tasks["h9"].head.weight)
    perturb(model.add_task("h5", 5, regime="head"), seed=4)
    added = head_task_table(model, {})
    assert added.head_at["h5"] == (16, 3) and len(model.kv_cache) == 1
    model.tasks["h5"].head.weight.add_(1.0)  # the added head trains: its parameters are watched too
    assert torch.equal(head_task_table(model, {}).heads[16][0][3, :5], model.tasks["h5"].head.weight)
    model.remove_task("h3")
    removed = head_task_table(model, {})
    assert removed.head_at == {"h40": (64, 1), "h9": (16, 1), "h5": (16, 2)}
    assert torch.equal(removed.heads[16][0][1, :9], model.tasks["h9"].head.weight)
    assert [k.names for k in model.kv_cache if k.kind == "heads"] == [("h40", "h9", "h5")]
    for name in list(head_task_names(model)):
        model.remove_task(name)
    assert head_task_table(model, {}) is None
