"""Launch configurations of the fused group-attention kernel, timed side by side (GPU): BLOCK_N, warps, stages,
groups packed per program.

One launch covers G groups (the stacked path); a program takes ``pack`` of them in one tile (the backbone's K/V
read once for all of them). Shapes: ViT-B/32 (50 keys, 12 heads) and DINOv2 ViT-S/14 at 224 px
(257 keys, 6 heads), batch 256, group capacity 4, one token and 5 memory tokens per task, bf16. Each config is
checked against the PyTorch expression first; the floor is the backbone K/V read once from device memory.

    python benchmarks/attention_configs.py --json-out attention_configs.json
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from continual_mem.kernels import (  # noqa: E402
    attention_launch,
    group_attention_torch,
    pack_size,
    stacked_attention_triton,
)

SHAPES = {"B/32": dict(H=12, N=50), "S/14-224": dict(H=6, N=257)}


def inputs(H: int, N: int, G: int, B: int, slots: int, m: int, hd: int = 64):
    g = torch.Generator(device="cuda").manual_seed(G * 1000 + N)
    qkv = torch.randn(G, B, slots, 3, H, hd, device="cuda", generator=g, dtype=torch.bfloat16)
    _, sk, sv = torch.randn(B, N, 3, H, hd, device="cuda", generator=g, dtype=torch.bfloat16).permute(
        2, 0, 3, 1, 4).unbind(0)
    _, mk, mv = torch.randn(1, G * slots * m, 3, H, hd, device="cuda", generator=g, dtype=torch.bfloat16).permute(
        2, 0, 3, 1, 4).unbind(0)
    return qkv, sk, sv, mk, mv


def reference(qkv, sk, sv, mk, mv, slots: int, m: int, scale: float) -> torch.Tensor:
    G, B, L, _, H, hd = qkv.shape
    outs = []
    for g in range(G):
        q, k, v = qkv[g].permute(2, 0, 3, 1, 4).float().unbind(0)  # (B, H, L, hd)
        own_k = torch.cat([k.reshape(B, H, slots, 1, hd), mk[:, :, g * slots * m:(g + 1) * slots * m].float()
                           .reshape(1, H, slots, m, hd).expand(B, -1, -1, -1, -1)], dim=3)
        own_v = torch.cat([v.reshape(B, H, slots, 1, hd), mv[:, :, g * slots * m:(g + 1) * slots * m].float()
                           .reshape(1, H, slots, m, hd).expand(B, -1, -1, -1, -1)], dim=3)
        o = group_attention_torch((q * scale).reshape(B, H, slots, 1, hd), sk.float(), sv.float(), own_k, own_v)
        outs.append(o.permute(0, 2, 1, 3))  # (B, L, H, hd)
    return torch.stack(outs)


def main(argv: list[str] | None = None) -> dict:
    import triton

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", default="1,3,5")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    slots, m, scale, B = 4, 5, 0.125, args.batch_size
    configs = [dict(BLOCK_N=bn, num_warps=w, num_stages=s, pack=pack)
               for bn, w, s, pack in itertools.product((32, 64), (1, 2, 4), (2, 3), (1, 2, 4))]
    results = []
    for (name, shape), G in itertools.product(SHAPES.items(), [int(g) for g in args.groups.split(",")]):
        qkv, sk, sv, mk, mv = inputs(**shape, G=G, B=B, slots=slots, m=m)
        want = reference(qkv, sk, sv, mk, mv, slots, m, scale)
        floor_bytes = 2 * sk.numel() * sk.element_size() + qkv.numel() * 2 // 3 * 2  # K/V once, q and out
        pack = pack_size(slots, slots * m)
        default = {**attention_launch(pack * slots, shape["N"], pack * slots * m), "pack": pack}
        for cfg in configs + ([default] if default not in configs else []):
            out = torch.full((G, B, slots, shape["H"], 64), float("nan"), device="cuda", dtype=torch.bfloat16)

            def run():
                launch = {k: v for k, v in cfg.items() if k != "pack"}
                stacked_attention_triton(qkv, sk, sv, mk, mv, out, slots=slots, scale=scale, pack=cfg["pack"],
                                         launch=launch)
            try:
                run()
            except Exception as e:  # a config Triton cannot build (e.g. out of shared memory)
                results.append({"shape": name, "groups": G, **cfg, "error": str(e).splitlines()[0][:120]})
                continue
            err = float((out.float() - want).norm() / want.norm())
            us = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median") * 1e3
            results.append({"shape": name, "groups": G, **cfg, "us": us, "rel_err": err,
                            "gb_per_s": floor_bytes / us / 1e3, "default": cfg == default})
    ok = [r for r in results if "us" in r]

    def key(r: dict) -> str:
        return f"{r['shape']} G={r['groups']}"

    best = {}
    for r in ok:
        if key(r) not in best or r["us"] < best[key(r)]["us"]:
            best[key(r)] = r
    out = {"benchmark": "attention_configs", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "batch": B, "slots": slots, "memory": m, "results": results, "best": best}
    worst_err = f"{max(x['rel_err'] for x in ok):.1e}"
    rows = []
    for name, r in best.items():
        d = next(x for x in ok if key(x) == name and x["default"])
        config = f"BN{r['BLOCK_N']} w{r['num_warps']} s{r['num_stages']} pack{r['pack']}"
        rows.append([name, f"{d['us']:.1f}", f"{r['us']:.1f}", config, f"{r['gb_per_s']:.0f}", worst_err])
    common.report(out, "group attention: default config against the best", ["shape", "default us", "best us",
                  "best config", "best GB/s (floor bytes)", "max rel err"], rows, args.json_out)
    return out


if __name__ == "__main__":
    main()
