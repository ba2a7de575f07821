"""The stacked path (every group of one shape in one set of launches per block): in Triton's interpreter on the CPU
(a child process: ``TRITON_INTERPRET`` must be set before Triton is imported) and compiled on a GPU. Old outputs
stay bit-identical as tasks fill groups and open new ones; results match the oracle and the per-group path."""
import pytest
import timm
import torch
from timm.models.vision_transformer import Block
from torch import nn

from helpers import TRITON_DEVICES, triton_child

from continual_mem import MemoryViT, stacked
from continual_mem.kernels import ENV

pytest.importorskip("triton", reason="Triton is not installed (it ships with torch's CUDA wheels)")

CHILD = r"""
import json, sys, torch
dev = torch.device(sys.argv[1])
from continual_mem import ORIGINAL, MemoryViT, stacked
from continual_mem.reference import reference_forward
from helpers import images, make_backbone, perturb

calls = []
run_blocks = stacked.run_blocks
stacked.run_blocks = lambda bb, tokens, *a, **k: calls.append(tokens.shape[0]) or run_blocks(bb, tokens, *a, **k)
bb = make_backbone("dinov2")  # layer scale (gammas O(1)) and register tokens
bb.blocks[1].attn.qkv.bias = None  # one block without a qkv bias: both paths of the stacked products
with torch.no_grad():  # timm starts biases at zero and norms at 1/0, which would hide a dropped bias or a swapped norm
    for name, p in bb.named_parameters():
        if name.endswith("bias"):
            p.normal_(0, 0.1)
        elif "norm" in name:
            p.normal_(1, 0.2)
net = MemoryViT(bb, group_size=2)
x = images(bb, n=2).to(dev)  # 2 images, 3 heads: a batch size read off another axis fails
specs = [dict(memory=2), dict(memory=2), dict(memory=2, layers="last:1"), dict(memory=2), dict(memory=2),
         dict(memory=2, task_tokens=2), dict(memory=2), dict(memory=40)]  # the last: one group per program
history = []
for i, spec in enumerate(specs):
    net.cpu()  # perturb draws on the CPU
    perturb(net.add_task(f"t{i}", 3 + i, **spec), seed=i + 1)
    net.to(dev)
    with torch.inference_mode() if i % 2 else torch.no_grad():  # both: inference tensors have no view bases
        history.append(net(x))
report = {"stacks": calls[-4:]}  # the last forward: groups per shape
report["old_equal"] = all(torch.equal(history[-1][k], out[k]) for out in history for k in out)
ref = reference_forward(net, x)
last = history[-1]
report["vs_oracle"] = max(float((last[k] - ref[k]).abs().max()) for k in ref)
net.stack_groups = False
with torch.no_grad():
    per = net(x)
report["vs_per_group"] = max(float((last[k] - per[k]).abs().max()) for k in per)
net.stack_groups = True
net.cpu()
perturb(net.add_task("ext", 5, memory=2, mode="extension"), seed=9)  # reads every group's token K/V
net.to(dev)
with torch.no_grad():
    out = net(x)
ref = reference_forward(net, x)
report["ext_vs_oracle"] = float((out["ext"] - ref["ext"]).abs().max())
report["old_equal_after_ext"] = all(torch.equal(out[k], last[k]) for k in last)
report["order"] = list(out) == ["original", *net.task_names]
print("REPORT" + json.dumps(report))
"""


def _check(report: dict) -> None:
    # 8 tasks, capacity 2: shape A holds t0 t1 | t3 t4 | t6 (3 groups), shapes B (t2), C (t5), D (t7) one each
    assert sorted(report["stacks"]) == [1, 1, 1, 3], report
    assert report["old_equal"] and report["old_equal_after_ext"] and report["order"], report
    assert report["vs_oracle"] < 1e-4 and report["vs_per_group"] < 1e-4 and report["ext_vs_oracle"] < 1e-4, report


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_stacked_groups_keep_old_bits_and_match_the_oracle(device):
    _check(triton_child(CHILD, device))


def test_supported_policy(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(ENV, "triton")
    bb = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    cpu = torch.device("cpu")
    assert stacked.supported(bb, torch.float32, cpu)
    assert not stacked.supported(bb, torch.bfloat16, cpu)  # weights in another dtype: autocast-style mixing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not stacked.supported(bb, torch.float32, cpu)
    bb.blocks[1].attn.q_norm = torch.nn.LayerNorm(bb.blocks[1].attn.head_dim)  # qk-norm: not reproduced
    assert not stacked.supported(bb, torch.float32, cpu)
    swiglu = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                               mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)
    assert not stacked.supported(swiglu, torch.float32, cpu)


def _refused(change) -> None:
    """``change`` (one edit of a plain ViT) makes the fused path refuse the backbone; the unedited one passes."""
    cpu = torch.device("cpu")
    bb = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                           init_values=0.5)  # layer scale: a plain block may hold one
    assert stacked.supported(bb, torch.float32, cpu)
    change(bb)
    assert not stacked.supported(bb, torch.float32, cpu)


class _SubBlock(Block):
    """A subclass may override ``forward``: the fused path cannot know what it does."""


class _Scale(nn.Module):
    def forward(self, x):
        return x * 2


def _swap(path: str, module: nn.Module):
    """An edit that puts ``module`` at ``path`` (dotted, list indices as numbers)."""
    def change(bb):
        *parents, last = path.split(".")
        owner = bb
        for p in parents:
            owner = owner[int(p)] if p.isdigit() else getattr(owner, p)
        setattr(owner, last, module)
    return change


def _sub_block(bb):
    blk = bb.blocks[1]
    blk.__class__ = _SubBlock


D = 192  # vit_tiny's width


@pytest.mark.parametrize("change", [
    _sub_block,
    _swap("blocks.1.attn.gate", nn.Linear(D, D)),  # gated attention (timm's `attn_gate`)
    _swap("blocks.0.mlp.norm", nn.LayerNorm(4 * D)),  # an MLP with a norm inside (scale_mlp_norm)
    _swap("blocks.1.mlp.act", nn.GELU(approximate="tanh")),  # another GELU: other bits
    _swap("blocks.1.mlp.act", nn.ReLU()),
    _swap("blocks.0.attn.proj", nn.modules.linear.NonDynamicallyQuantizableLinear(D, D)),  # a Linear subclass
    _swap("blocks.1.norm1", nn.LayerNorm(D, bias=False)),
    _swap("blocks.0.norm2", nn.LayerNorm(D, elementwise_affine=False)),
    _swap("blocks.1.norm2", nn.RMSNorm(D)),
    _swap("blocks.0.ls2", _Scale()),  # not a LayerScale
    _swap("norm", nn.LayerNorm(D, bias=False)),
    _swap("norm", nn.LayerNorm(D, elementwise_affine=False)),
    _swap("norm", nn.RMSNorm(D)),
], ids=["block-subclass", "gated-attention", "mlp-norm", "tanh-gelu", "relu", "linear-subclass",
        "norm1-no-bias", "norm2-no-affine", "rmsnorm", "other-scale", "final-norm-no-bias",
        "final-norm-no-affine", "final-rmsnorm"])
def test_the_fused_path_refuses_blocks_it_does_not_reproduce(change):
    _refused(change)


def test_an_attention_without_a_gate_attribute_is_plain():
    """timm before 1.0.30 has no ``attn.gate`` at all (we allow timm >= 1.0.15)."""
    bb = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    for blk in bb.blocks:
        if hasattr(blk.attn, "gate"):
            del blk.attn.gate
    assert stacked.supported(bb, torch.float32, torch.device("cpu"))


def test_group_buffer_aligns_every_group():
    buf = stacked.group_buffer(3, 5, 7, torch.empty(0))
    assert buf.shape == (3, 5, 7) and buf.stride() == (stacked.ALIGN, 7, 1)


def test_the_stacked_path_is_not_taken_on_the_cpu_by_default(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(ENV, "auto")
    bb = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    net = MemoryViT(bb, group_size=2)
    net.add_task("a", 3)
    monkeypatch.setattr(stacked, "run_blocks", lambda *a, **k: pytest.fail("stacked path on the CPU"))
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32))


def test_pack_size_policy():
    from continual_mem.kernels import pack_size

    assert pack_size(4, 20) == 4  # four groups of 4 rows fill a 16-row tile
    assert pack_size(16, 20) == 1 and pack_size(32, 0) == 1
    assert pack_size(4, 40) == 2 and pack_size(4, 200) == 1  # at most 128 memory keys per program
    for rows in (1, 2, 3, 4, 8):
        for private in (0, 5, 20, 64, 100):
            pack = pack_size(rows, private)
            assert pack >= 1 and (pack == 1 or pack * private <= 128) and pack * rows <= 16
