"""Profile one single-pass forward with K tasks on the GPU: top kernels by device time (torch.profiler).

    python benchmarks/profile_single_pass.py --tasks 10
    python benchmarks/profile_single_pass.py --tasks 1 --train   # one masked-memory training step instead
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from continual_mem import MemoryViT, build_optimizer, train_step  # noqa: E402


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--train", action="store_true", help="profile a training step of the last task instead")
    args = common.resolve(p.parse_args())
    bb = common.create(args)
    model = MemoryViT(bb, group_size=args.group_size)
    for i in range(args.tasks):
        model.add_task(f"t{i}", 100, memory=args.memory)
    model.to(args.device)
    x = torch.randn(args.batch_size, 3, *bb.patch_embed.img_size, device=args.device, dtype=common.tensor_dtype(args))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    if args.train:
        name = f"t{args.tasks - 1}"
        y = torch.randint(0, 100, (args.batch_size,), device=args.device)
        opt = build_optimizer(model, name)

        def step() -> None:
            with common.autocast(args):
                train_step(model, name, x, y, opt)
    else:
        def step() -> None:
            with torch.inference_mode(), common.autocast(args):
                model(x)
    for _ in range(3):
        step()
    with profile(activities=acts) as prof:
        step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
