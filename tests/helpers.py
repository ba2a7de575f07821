"""Shared test helpers: small random timm ViTs and inputs; Triton checks in a child process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parent.parent


# the Triton checks run twice: in Triton's interpreter on the CPU, and compiled on a GPU host (`pytest -m gpu`)
TRITON_DEVICES = [
    pytest.param("cpu", id="interpreter"),
    pytest.param("cuda", id="gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (run `pytest -m gpu` on a GPU host)")]),
]


def triton_child(script: str, device: str) -> dict:
    """Run ``script`` (it prints ``REPORT`` + JSON) with the fused kernels requested, on ``device``: the CPU runs
    Triton's interpreter (``TRITON_INTERPRET`` must be set before Triton is imported, hence a child process; if
    this process was started with it, e.g. for mutation testing, which cannot follow a child, the script runs here)."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return _in_this_process(script, device)
    env = {**os.environ, "CONTINUAL_MEM_ATTENTION": "triton",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("TRITON_INTERPRET", None)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", script, device], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.split("REPORT", 1)[1])


def _in_this_process(script: str, device: str) -> dict:
    """:func:`triton_child`'s script run in this process; the project's modules it patches are put back after."""
    import contextlib
    import io

    saved = {name: dict(vars(m)) for name, m in list(sys.modules.items())
             if name.split(".")[0] in ("continual_mem", "scenarios") and m is not None}
    argv, env = sys.argv, os.environ.get("CONTINUAL_MEM_ATTENTION")
    sys.argv, os.environ["CONTINUAL_MEM_ATTENTION"] = ["-c", device], "triton"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(script, "<triton_child>", "exec"), {"__name__": "__main__"})
    finally:
        sys.argv = argv
        if env is None:
            os.environ.pop("CONTINUAL_MEM_ATTENTION", None)
        else:
            os.environ["CONTINUAL_MEM_ATTENTION"] = env
        for name, attrs in saved.items():
            vars(sys.modules[name]).update(attrs)
    return json.loads(printed.getvalue().split("REPORT", 1)[1])


def make_backbone(kind: str = "tiny", seed: int = 0):
    """Small random timm ViTs of the shapes we support. Layer-scale gammas are made O(1) so every block
    matters (DINOv2's 1e-5 init would hide attention bugs)."""
    torch.manual_seed(seed)
    if kind == "tiny":
        bb = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=4,
                               num_heads=3, num_classes=10)
    elif kind == "dinov2":  # vit_small_patch14_dinov2-shaped: layer-scale, registers, no head
        bb = timm.create_model("vit_small_patch14_dinov2", img_size=42, embed_dim=48, depth=3, num_heads=3,
                               reg_tokens=2, num_classes=0)
    elif kind == "b32":
        bb = timm.create_model("vit_base_patch32_224", img_size=64, num_classes=11)
    elif kind == "qknorm":  # qk-norm + avg pool with fc_norm
        bb = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=3,
                               num_heads=3, num_classes=5, qk_norm=True, global_pool="avg", fc_norm=True)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if ".ls" in name:
                p.uniform_(0.3, 1.0)
    return bb.eval()


def images(bb, n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *bb.patch_embed.img_size, generator=g)


def perturb(task, scale: float = 0.2, seed: int = 0) -> None:
    """Give a task non-trivial parameters (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def model_with_an_old_task(kind: str = "tiny"):
    """A model with one trained-looking preserving task, an input, and every output before anything is added:
    ``(model, x, before)`` for preservation checks."""
    from continual_mem import MemoryViT

    model = MemoryViT(make_backbone(kind))
    perturb(model.add_task("old", 3))
    x = images(model.backbone, n=3)
    with torch.no_grad():
        before = model(x)
    return model, x, before


def check_private_addition(net, x, before, name: str, own) -> tuple[dict, dict]:
    """Task ``name`` is a late fork plus private parameters (``own(key)`` picks them: adapters, a fine-tuned copy of
    the fork's blocks) beside ``net``'s trained task ``plain`` with the same fork. Fresh, it computes ``plain``'s
    bits; perturbed, it matches the oracle and differs from ``plain``; the original and the old task stay
    bit-identical throughout. Returns the perturbed outputs and the oracle's."""
    from continual_mem.reference import reference_forward

    task = net.tasks[name]
    task.load_state_dict({**net.tasks["plain"].state_dict(), **{k: v for k, v in task.state_dict().items() if own(k)}})
    with torch.no_grad():
        out = net(x)
    assert torch.equal(out[name], out["plain"])
    perturb(task, seed=2)
    with torch.no_grad():
        out = net(x)
        ref = reference_forward(net, x)
    assert not torch.equal(out[name], out["plain"])
    torch.testing.assert_close(out[name], ref[name], rtol=1e-4, atol=1e-4)
    for key in ("original", "old"):
        assert torch.equal(out[key], before[key])
    return out, ref


def routed_trials(net, pool, reference, *, trials: int = 3, rows: int = 3, most: int = 3, seed: int = 0) -> dict:
    """Random routed batches of ``rows`` images from ``pool`` (1..``most`` tasks each): the worst distance of a
    routed answer from ``reference(picks, b, name)``, and whether every (image, task) answer was the same bits
    wherever it came up."""
    import random

    rng = random.Random(seed)
    seen, worst, same = {}, 0.0, True
    for _ in range(trials):
        picks = rng.sample(range(len(pool)), rows)
        routes = [rng.sample(net.task_names, rng.randint(1, most)) for _ in range(rows)]
        for b, row in enumerate(net.forward_routed(pool[picks], routes)):
            for name, logits in row.items():
                worst = max(worst, float((logits - reference(picks, b, name)).abs().max()))
                same = same and torch.equal(seen.setdefault((picks[b], name), logits), logits)
    return {"worst": worst, "same": same, "seen": len(seen)}


def rows_match_eager(graph, model, x, routes) -> int:
    """``routes`` on ``x`` through a routed ``graph`` and the eager routed pass: each row's tasks where the layout
    puts them, each fork's and linear-head task's answer bit-equal, the grouped ones to float tolerance (on the CPU
    the eager pass's heads are not gathered: patch ``routed.gathered_heads`` to True, as on CUDA, before asking for
    head tasks). Returns the answers compared bit for bit."""
    from continual_mem import fork_batch

    layout = graph.layout(routes)
    assert layout is not None, routes
    out, eager, checked = graph(x, layout).clone(), model.forward_routed(x, routes), 0
    for b, row in enumerate(layout.rows):
        assert [name for name, _, _ in row] == routes[b]
        for name, lo, hi in row:
            if fork_batch.family(model.tasks[name]) is not None or name in graph.heads:
                assert torch.equal(out[b, lo:hi], eager[b][name]), (b, name)
                checked += 1
            else:
                torch.testing.assert_close(out[b, lo:hi], eager[b][name], rtol=1e-4, atol=1e-5)
    return checked


def bright_regions(n: int, seed: int, regions: list[tuple[slice, slice]], side: int):
    """``n`` grey ``side``-pixel images of dark noise, class ``c`` with ``regions[c]`` (rows, columns) bright: an
    ``ImageSet`` whose label is where the light is."""
    from scenarios.types import ImageSet

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(regions), (n,), generator=g)
    imgs = torch.randint(0, 60, (n, 1, side, side), generator=g)
    for i, c in enumerate(labels.tolist()):
        imgs[i, 0][regions[c]] += 180
    return ImageSet(imgs.clamp(0, 255).to(torch.uint8), labels)
