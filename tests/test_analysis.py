import pytest
import torch

from continual_mem import MemoryViT
from continual_mem.analysis import memory_attention, plot
from helpers import images, make_backbone, perturb


@pytest.mark.parametrize("spec", [dict(regime="masked-memory", memory=3, layers="last:2"),
                                  dict(regime="memory", memory=2), dict(regime="hybrid", memory=2, input_memory=2)])
def test_memory_attention_statistics(tmp_path, spec):
    model = MemoryViT(make_backbone("tiny"))
    model.add_task("other", 3)
    t = model.add_task("t", 3, mode="extension" if spec["regime"] == "masked-memory" else "concatenation", **spec)
    with torch.no_grad():  # make memory hard to ignore: large keys
        t.memory.mul_(50)
    x = images(model.backbone, n=2)
    r = memory_attention(model, "t", x)
    depth, heads = model.depth, model.backbone.blocks[0].attn.num_heads
    assert len(r["fraction_ge_half"]) == depth and len(r["fraction_ge_half"][0]) == heads
    assert all(0.0 <= v <= 1.0 for row in r["mean_memory_mass"] for v in row)
    if spec["regime"] == "masked-memory":
        assert r["mean_memory_mass"][0] == [0.0] * heads  # no memory in the first layers
        assert max(r["mean_memory_mass"][-1]) > 0.0
    assert 0.99 < r["blocks"]["processing"] + r["blocks"]["read"] < 1.01
    plot(r, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_no_memory_is_refused():
    model = MemoryViT(make_backbone("tiny"))
    model.add_task("h", 3, regime="head")
    with pytest.raises(ValueError, match="no memory"):
        memory_attention(model, "h", images(model.backbone))
