"""The fused Triton group-attention kernel, run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set
before Triton is imported, so in a child process): it matches the PyTorch expression (allclose) and keeps the
exactness rule (adding a task to a group leaves the old outputs' bits equal)."""
import sys

import pytest
import torch

from helpers import TRITON_DEVICES, triton_child

from continual_mem.kernels import ENV, use_triton

pytest.importorskip("triton", reason="Triton is not installed (it ships with torch's CUDA wheels)")

CHILD = r"""
import json, sys, torch
dev = torch.device(sys.argv[1])
from continual_mem import ORIGINAL, MemoryViT, kernels
from continual_mem.kernels import group_attention_torch, group_attention_triton
from helpers import images, make_backbone, perturb

report = {"kernel": []}
B, H, S, scale = 2, 3, 4, 0.37
for n, hd, N, m in [(1, 16, 37, 5), (2, 12, 70, 6), (1, 8, 130, 0)]:
    g = torch.Generator().manual_seed(n + N)
    # every input a strided view of a qkv output laid out as timm's, as the model passes them
    q, tk, tv = torch.randn(B, S * n, 3, H, hd, generator=g).to(dev).permute(2, 0, 3, 1, 4).unbind(0)
    _, sk, sv = torch.randn(B, N, 3, H, hd, generator=g).to(dev).permute(2, 0, 3, 1, 4).unbind(0)
    mk = mv = None
    own_k, own_v = tk.reshape(B, H, S, n, hd), tv.reshape(B, H, S, n, hd)
    if m:
        _, mk, mv = torch.randn(1, S * m, 3, H, hd, generator=g).to(dev).permute(2, 0, 3, 1, 4).unbind(0)
        own_k = torch.cat([own_k, mk.reshape(1, H, S, m, hd).expand(B, -1, -1, -1, -1)], dim=3)
        own_v = torch.cat([own_v, mv.reshape(1, H, S, m, hd).expand(B, -1, -1, -1, -1)], dim=3)
    want = group_attention_torch((q * scale).reshape(B, H, S, n, hd), sk, sv, own_k, own_v)
    got = group_attention_triton(q, sk, sv, tk, tv, mk, mv, slots=S, scale=scale)
    report["kernel"].append(float((got - want).abs().max()))
# several groups in one launch, packed any number per program: a group's bits never depend on how many follow it
from continual_mem.kernels import stacked_attention_triton
G, S, n, m, hd, N = 3, 2, 1, 3, 16, 45
g = torch.Generator().manual_seed(7)
qkv = torch.randn(G, B, S * n, 3, H, hd, generator=g).to(dev)
_, sk, sv = torch.randn(B, N, 3, H, hd, generator=g).to(dev).permute(2, 0, 3, 1, 4).unbind(0)
_, mk, mv = torch.randn(1, G * S * m, 3, H, hd, generator=g).to(dev).permute(2, 0, 3, 1, 4).unbind(0)


def stacked(groups, pack):
    out = torch.full((groups, B, S * n, H, hd), float("nan"), device=dev)
    sl = slice(0, groups * S * m)
    stacked_attention_triton(qkv[:groups], sk, sv, mk[:, :, sl], mv[:, :, sl], out, slots=S, scale=scale, pack=pack)
    return out


# a non-finite value in one slot's token or memory values reaches no other slot or group (a masked weight is
# exactly zero, and zero times inf is NaN): the rest keep their bits, the slot that owns it is NaN
report["overflow_isolated"] = True
pack = 4  # every group in one program: the other slot of its group and the other groups
clean = stacked(G, pack)
poisoned_mem = [t.clone() for t in (mk, mv)]
poisoned_mem[1][0, :, 2 * S * m] = float("inf")  # group 2, slot 0's first memory value
poisoned_qkv = qkv.clone()
poisoned_qkv[2, :, 0, 2] = float("inf")  # group 2, slot 0's token value
for q_, (mk_, mv_) in ((qkv, poisoned_mem), (poisoned_qkv, (mk, mv))):
    out = torch.full((G, B, S * n, H, hd), float("nan"), device=dev)
    stacked_attention_triton(q_, sk, sv, mk_, mv_, out, slots=S, scale=scale, pack=pack)
    report["overflow_isolated"] &= (torch.equal(out[:2], clean[:2]) and torch.equal(out[2, :, n:], clean[2, :, n:])
                                    and bool(torch.isnan(out[2, :, :n]).all()))
report["stacked_equal_alone"] = True
for pack in (1, 2, 4):
    full = stacked(G, pack)
    report["stacked_equal_alone"] &= all(torch.equal(stacked(k, pack), full[:k]) for k in (1, 2))
    q, tk, tv = qkv[1].permute(2, 0, 3, 1, 4).unbind(0)
    single = group_attention_triton(q, sk, sv, tk, tv, mk[:, :, S * m:2 * S * m], mv[:, :, S * m:2 * S * m],
                                    slots=S, scale=scale)
    report["kernel"].append(float((full[1].permute(0, 2, 1, 3) - single).abs().max()))
# the per-task path's fused attention: output and gradients against the PyTorch expression
from continual_mem.kernels import task_attention_triton
from continual_mem.layers import attend
grads = []
for n, P, N in [(1, 6, 37), (3, 20, 70)]:
    g = torch.Generator().manual_seed(n + P)
    q, k, v = torch.randn(B, n, 3, H, hd, generator=g).to(dev).permute(2, 0, 3, 1, 4).unbind(0)
    _, sk, sv = torch.randn(B, N, 3, H, hd, generator=g).to(dev).permute(2, 0, 3, 1, 4).unbind(0)
    mk, mv = torch.randn(2, 1, H, P - n, hd, generator=g).to(dev).unbind(0)
    dout = torch.randn(B, H, n, hd, generator=g).to(dev)
    for fn in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, mk, mv)]
        lq, lk, lv, lmk, lmv = leaves
        if fn == "triton":
            own_k = torch.cat([lk, lmk.expand(B, -1, -1, -1)], dim=2)
            own_v = torch.cat([lv, lmv.expand(B, -1, -1, -1)], dim=2)
            out = task_attention_triton(lq, sk, sv, own_k, own_v, scale)
        else:
            out = attend(lq, sk, sv, [lk, lmk], [lv, lmv], scale)
        out.backward(dout)
        grads.append([out.detach()] + [t.grad for t in leaves])
    report["kernel"].append(max(float((a - b).abs().max()) for a, b in zip(grads[-2], grads[-1])))
assert kernels.use_triton(dev)
bb = make_backbone("tiny")
net = MemoryViT(bb, group_size=4)
x = images(bb, n=2).to(dev)
perturb(net.add_task("a", 3, memory=2), seed=1)
net.to(dev)
with torch.no_grad():
    before = net(x)
net.cpu()  # perturb draws on the CPU
perturb(net.add_task("b", 4, memory=2), seed=2)  # fills the next slot of the same group
net.to(dev)
with torch.no_grad():
    after = net(x)
report["old_equal"] = all(torch.equal(after[k], before[k]) for k in (ORIGINAL, "a"))
from continual_mem.reference import reference_forward
ref = reference_forward(net, x)
report["vs_oracle"] = max(float((after[k] - ref[k]).abs().max()) for k in ("a", "b"))
import os
os.environ[kernels.ENV] = "torch"
with torch.no_grad():
    plain = net(x)
report["vs_torch"] = max(float((after[k] - plain[k]).abs().max()) for k in ("a", "b"))
# a training step's gradients (the per-task path, backbone K/V in place) against the PyTorch path
from continual_mem import train_step, build_optimizer
y = torch.tensor([0, 2, 1])[: x.shape[0]].to(dev)
step_grads = {}
for mode in ("triton", "torch"):
    os.environ[kernels.ENV] = mode
    net.zero_grad(set_to_none=True)
    opt = build_optimizer(net, "b", lr=1e-30)  # a step that leaves the parameters as they are
    train_step(net, "b", x, y, opt)
    step_grads[mode] = [p.grad.clone() for p in net.tasks["b"].parameters() if p.grad is not None]
report["train_grads"] = max(float((a - b).abs().max()) for a, b in zip(step_grads["triton"], step_grads["torch"]))
report["train_grad_count"] = len(step_grads["triton"])
os.environ[kernels.ENV] = "triton"
report["kernel_used"] = "continual_mem._triton_kernels" in sys.modules
print("REPORT" + json.dumps(report))
"""


def _check(report: dict) -> None:
    assert report["kernel_used"], report
    assert max(report["kernel"]) < 1e-5, report
    assert report["old_equal"] and report["stacked_equal_alone"] and report["overflow_isolated"], report
    assert report["vs_torch"] < 1e-4 and report["vs_oracle"] < 1e-4, report
    assert report["train_grad_count"] >= 3 and report["train_grads"] < 1e-4, report


@pytest.mark.slow
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_kernels_match_pytorch_and_keep_old_bits(device):
    _check(triton_child(CHILD, device))


def test_policy(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(ENV, raising=False)
    assert use_triton(torch.device("cuda"))  # the default on CUDA, where Triton imports
    assert not use_triton(torch.device("cpu"))  # PyTorch on the CPU
    assert not use_triton(torch.device("cpu"), "triton")  # no CUDA, no interpreter: PyTorch
    assert not use_triton(torch.device("cuda"), "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(torch.device("cpu"), "triton") and not use_triton(torch.device("cpu"))  # interpreter: asked only
    monkeypatch.setitem(sys.modules, "triton", None)  # a GPU without Triton: PyTorch, selected automatically
    assert not use_triton(torch.device("cuda"))
    with pytest.raises(ValueError, match="must be auto, torch or triton"):
        use_triton(torch.device("cpu"), "cuda")


def test_backbone_kv_stays_in_place_when_the_fused_kernels_read_it(monkeypatch):
    """Views of timm's qkv output are kept whenever the fused kernels consume them (groups and the per-task path,
    training included); the PyTorch expression (or a compiled per-task path) gets one contiguous copy per layer."""
    from continual_mem import MemoryViT
    from helpers import make_backbone

    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(ENV, "triton")
    net = MemoryViT(make_backbone("tiny"), group_size=4)
    net.add_task("a", 3, memory=2)
    net.add_task("b", 3, memory=2)
    cpu = torch.device("cpu")

    def in_place(*names: str) -> bool:
        return net.forward_plan(names, device=cpu).paths.kv_in_place

    with torch.no_grad():
        assert in_place("a", "b")
    assert in_place("a")  # grad on, a's parameters train: the fused per-task path
    net.task_block = lambda *a: None  # a compiled per-task path runs the PyTorch expression
    assert not in_place("a")
    with torch.no_grad():
        assert in_place("a", "b")
    monkeypatch.setenv(ENV, "torch")
    with torch.no_grad():
        assert not in_place("a", "b")


def test_a_training_forward_decides_outside_the_no_grad_block(monkeypatch):
    # the decision is taken outside the backbone's no-grad block, where a task's training is still visible
    from continual_mem import MemoryViT
    from helpers import images, make_backbone

    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(ENV, "triton")
    bb = make_backbone("tiny")
    net = MemoryViT(bb, group_size=4)
    net.add_task("a", 3, memory=2)
    net.task_block = torch.compile  # stands for a compiled per-task path: never called below
    seen = []

    def spy(model, task, state):
        seen.append(all(k.is_contiguous() and v.is_contiguous() for k, v in state.backbone_kv))
        raise StopIteration

    monkeypatch.setattr("continual_mem.task_paths.token_task", spy)
    with pytest.raises(StopIteration):
        net(images(bb, n=2), tasks=["a"])
    assert seen == [True]


def test_fused_task_attention_policy(monkeypatch):
    from continual_mem.kernels import fused_task_attention

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    monkeypatch.setenv(ENV, "triton")
    assert fused_task_attention(cpu)  # training included
    monkeypatch.setenv(ENV, "auto")
    assert not fused_task_attention(cpu)  # not CUDA
    monkeypatch.setattr("continual_mem.kernels.use_triton", lambda device, requested=None: True)
    assert fused_task_attention(torch.device("cuda"))
    assert fused_task_attention(torch.device("cuda"), queries=16, private=256)
    assert not fused_task_attention(torch.device("cuda"), queries=17)  # beyond one program's tiles: PyTorch
    assert not fused_task_attention(torch.device("cuda"), private=257)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not fused_task_attention(torch.device("cuda"))  # a compiled per-task path traces PyTorch
