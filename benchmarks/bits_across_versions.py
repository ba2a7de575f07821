"""Old outputs across code versions: store one task of every regime with one version of the code, verify them with
another. The registry recomputes each stored task from its bytes and compares with the logits the storing version
computed, bit for bit (sha256 and ``torch.equal``), so a refactor that changes any bit fails here.

    # with the old code first on the path (e.g. a `git worktree` of the previous commit):
    PYTHONPATH=/path/to/old python benchmarks/bits_across_versions.py store /tmp/bits.db
    python benchmarks/bits_across_versions.py verify /tmp/bits.db       # the current code

Prints JSON (the code's location, every task's status) and exits 1 if any task is not ``equal``. Also compares the
full forward (every task at once, including the GPU path with ``--device cuda``) against the logits the storing
version saved beside the registry.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch

# one task per regime and path the shared pass and the own passes have
TASKS = [
    ("head", dict(regime="head")),
    ("headcls", dict(regime="head+cls", task_tokens=2)),
    ("masked", dict(memory=3)),
    ("masked2", dict(memory=3)),  # same group as "masked"
    ("ext", dict(memory=2, mode="extension", layers="last:2")),
    ("fork", dict(memory=2, fork_layers=2)),
    ("forkft", dict(memory=2, fork_layers=1, fork_finetune=True, adapter_dim=3)),
    ("pooled", dict(memory=2, fork_layers=2, fork_pool=2)),
    ("memory", dict(regime="memory", memory=2)),
    ("adapters", dict(regime="adapters")),
    ("memadapt", dict(regime="memory+adapters", memory=2)),
    ("full", dict(regime="full")),
    ("inputmem", dict(regime="input-memory")),
    ("hybrid", dict(regime="hybrid", memory=2)),
    ("memctrl", dict(regime="mem-ctrl")),
    ("membottleneck", dict(regime="mem-bottleneck")),
]
KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)


def backbone():
    torch.manual_seed(0)
    bb = timm.create_model("vit_tiny_patch16_224", **KWARGS)
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return bb.eval()


def images(device: str) -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)


def store(db: Path, device: str) -> dict:
    from continual_mem import MemoryViT
    from registry import Registry

    bb = backbone()
    reg = Registry(db)
    reg.create_model(bb, timm_name="vit_tiny_patch16_224", model_kwargs=KWARGS)
    net = MemoryViT(bb)
    for i, (name, kw) in enumerate(TASKS):
        task = net.add_task(name, 3 + i % 3, **kw)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in task.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        reg.add_task(net, name)
    net = reg.load().to(device).eval()
    with torch.no_grad():
        out = net(images(device))
    torch.save({k: v.cpu() for k, v in out.items()}, db.with_suffix(f".{device}.pt"))
    return {"stored": [n for n, _ in TASKS]}


def verify(db: Path, device: str) -> dict:
    from registry import Registry

    reg = Registry(db)
    report = reg.verify()
    statuses = {t.name: t.status for t in report.tasks}
    net = reg.load().to(device).eval()
    with torch.no_grad():
        out = net(images(device))
    saved = torch.load(db.with_suffix(f".{device}.pt"))
    forward = {k: bool(torch.equal(out[k].cpu(), v)) for k, v in saved.items()}
    changed = sorted({k for k, s in statuses.items() if s != "equal"} | {k for k, eq in forward.items() if not eq})
    return {"registry_verify": statuses, "forward_equal_on_" + device: forward, "changed": changed,
            "ok": report.ok and not changed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["store", "verify"])
    p.add_argument("db", type=Path)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    import continual_mem

    result = store(args.db, args.device) if args.action == "store" else verify(args.db, args.device)
    result["code"] = str(Path(continual_mem.__file__).resolve().parent.parent)
    print(json.dumps(result, indent=1))
    if args.action == "verify":
        print(f"{'OK' if result['ok'] else 'CHANGED'}: {len(result['registry_verify'])} stored tasks, "
              f"not equal: {result['changed'] or 'none'}")
        return 0 if result["ok"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
