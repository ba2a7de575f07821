"""Per-task class statistics of the frozen backbone's features, for task-agnostic (class-incremental) prediction.

Each task stores, once, from its training images: each class's mean feature, its image count, and the task's
within-class scatter ``sum (h - mean_c)(h - mean_c)^T`` (summed in float64, stored in float32). The backbone is frozen, so every task's
statistics live in one feature space and compare across tasks; they never change after they are written.

From every task's statistics, :class:`TaskAgnostic` scores an image against the union of all classes:

- ``"prototype"``: cosine similarity to each class mean (SimpleCIL's classifier; the baseline);
- ``"gaussian"``: the log-density of a Gaussian per class, with the task's own within-class covariance (shrunk
  towards a scaled identity);

and :func:`combine` turns those scores into one answer: ``"stats"`` (default) takes the best column; ``"head"`` lets
the statistics pick the task and its own head pick the class. A task's scores use its own statistics only, so adding a task appends columns
and changes no earlier one: which task wins for an image changes only if the new task scores higher; every task's
own outputs and stored statistics never change.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .forward_plan import ORIGINAL

FORMAT = "continual-mem-class-stats/1"
METHODS = ("prototype", "gaussian")
COMBINE = ("stats", "head")


class StatsError(ValueError):
    """Class statistics that are missing, corrupt or do not fit the model."""


@dataclass(frozen=True)
class ClassStats:
    """One task's class statistics (see the module doc); ``means`` ``(C, D)``, ``counts`` ``(C,)``, ``scatter``
    ``(D, D)``."""

    task: str
    means: torch.Tensor
    counts: torch.Tensor
    scatter: torch.Tensor

    def __post_init__(self) -> None:
        C, D = self.means.shape if self.means.dim() == 2 else (0, 0)
        if self.means.dim() != 2 or C == 0 or D == 0:
            raise StatsError(f"task {self.task!r}: means must be (classes, features), got {tuple(self.means.shape)}")
        if self.counts.shape != (C,) or self.scatter.shape != (D, D):
            raise StatsError(f"task {self.task!r}: counts {tuple(self.counts.shape)} and scatter "
                             f"{tuple(self.scatter.shape)} do not fit means {tuple(self.means.shape)}")
        if self.means.dtype != torch.float32 or self.scatter.dtype != torch.float32 or self.counts.dtype != torch.int64:
            raise StatsError(f"task {self.task!r}: means and scatter must be float32 and counts int64")

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to_bytes(self) -> bytes:
        """safetensors bytes (tensors; the task name and the format in its metadata, as one JSON value: the same
        statistics always give the same bytes)."""
        meta = json.dumps({"format": FORMAT, "task": self.task}, sort_keys=True)
        return save({"means": self.means.contiguous(), "counts": self.counts.contiguous(),
                     "scatter": self.scatter.contiguous()}, metadata={"continual_mem": meta})

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "class statistics") -> "ClassStats":
        try:
            tensors = load(data)
            meta = _metadata(data)
        except (SafetensorError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise StatsError(f"{source} is not readable class statistics ({exc})") from None
        if meta.get("format") != FORMAT or set(tensors) != {"means", "counts", "scatter"}:
            raise StatsError(f"{source}: not {FORMAT} (format {meta.get('format')!r}, tensors {sorted(tensors)})")
        return cls(meta.get("task", ""), tensors["means"], tensors["counts"], tensors["scatter"])

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


def _metadata(data: bytes) -> dict:
    """Our metadata in the safetensors header (8-byte little-endian length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8:8 + n]).get("__metadata__", {}).get("continual_mem", "{}"))
    if not isinstance(meta, dict):
        raise ValueError("metadata is not an object")
    return meta


def backbone_features(model, x: torch.Tensor) -> torch.Tensor:
    """The frozen backbone's pooled features ``(B, D)`` (timm's ``forward_head(..., pre_logits=True)``)."""
    bb = model.backbone
    with torch.no_grad():
        return bb.forward_head(bb.forward_features(x), pre_logits=True)


def pooled_features(model, x: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled features of a pass whose own output was ``original``: that output itself for a
    backbone without a classifier (``num_classes=0``, as the registry's), else one more backbone pass."""
    return original if model.backbone.num_classes == 0 else backbone_features(model, x)


def features_and_logits(model, x: torch.Tensor, tasks: Sequence[str]) -> tuple[torch.Tensor, dict]:
    """One pass: the backbone's pooled features and ``tasks``' logits."""
    with torch.no_grad():
        out = model(x, tasks=list(tasks), original=True)
    return pooled_features(model, x, out.pop(ORIGINAL)), out


def collect(task: str, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> ClassStats:
    """Statistics from ``(features (B, D), labels (B,))`` batches (float64 sums on the features' device, in batch
    order). Every class needs at least one image."""
    s1 = s2 = None
    counts = None
    for h, y in batches:
        h = h.detach().to(torch.float64)
        y = y.to(h.device)
        if s1 is None:
            D = h.shape[1]
            s1 = h.new_zeros(num_classes, D)
            s2 = h.new_zeros(D, D)
            counts = torch.zeros(num_classes, dtype=torch.int64, device=h.device)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise StatsError(f"task {task!r}: labels must be in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
        s1.index_add_(0, y, h)
        s2 += h.T @ h
        counts += torch.bincount(y, minlength=num_classes)
    if s1 is None:
        raise StatsError(f"task {task!r}: no images to compute class statistics from")
    if (missing := (counts == 0).nonzero().flatten().tolist()):
        raise StatsError(f"task {task!r}: classes {missing[:8]} have no training image; every class needs one")
    means = s1 / counts[:, None]
    scatter = s2 - means.T @ (means * counts[:, None])  # sum (h - mu_c)(h - mu_c)^T
    scatter = (scatter + scatter.T) / 2
    return ClassStats(task, means.float().cpu(), counts.cpu(), scatter.float().cpu())


def collect_from_source(model, task: str, source, num_classes: int, *, batch_size: int = 256) -> ClassStats:
    """Statistics of ``task``'s classes from a training source's evaluation batches (no augmentation)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        batches = ((backbone_features(model, x.to(device)), y) for x, y in source.eval_batches(batch_size))
        return collect(task, batches, num_classes)
    finally:
        model.train(was)


class TaskAgnostic:
    """Scores over the union of every task's classes (columns in task order, each task's classes in its order).

    Each task's columns are computed from its own statistics only, on their own: adding a task appends columns
    and leaves every earlier column's bits as they were (so an image whose best column is an old task's keeps its
    answer unless the new task scores higher).

    Args:
        stats: Each task's statistics, in the model's task order.
        method: ``"prototype"`` (cosine to the class means) or ``"gaussian"`` (the log-density of a Gaussian per
            class, with the task's within-class covariance shrunk towards a scaled identity).
        shrinkage: ``"gaussian"`` only: the covariance is ``(1 - s) * cov + s * mean(diag(cov)) * I``, with ``s``
            given, or ``"oas"``: chosen per task from its statistics by the Oracle Approximating Shrinkage estimator
            (Chen et al. 2010, as scikit-learn's ``OAS``): strong for a task with few images per feature, weak for
            one with many.
    """

    def __init__(self, stats: Sequence[ClassStats], *, method: str = "gaussian",
                 shrinkage: float | str = "oas") -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if shrinkage != "oas" and not (isinstance(shrinkage, (int, float)) and 0.0 < shrinkage <= 1.0):
            raise ValueError(f"shrinkage must be 'oas' or in (0, 1], got {shrinkage!r}")
        if not stats:
            raise StatsError("no task has class statistics: task-agnostic prediction needs at least one")
        dims = {s.dim for s in stats}
        if len(dims) != 1:
            raise StatsError(f"class statistics of different feature sizes {sorted(dims)}: not one backbone")
        self.tasks = [s.task for s in stats]
        self.bounds: list[tuple[int, int]] = []
        at = 0
        for s in stats:
            self.bounds.append((at, at + s.num_classes))
            at += s.num_classes
        self._scorers = [_Scorer(s, method, shrinkage) for s in stats]

    @property
    def num_classes(self) -> int:
        return self.bounds[-1][1]

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, classes)`` float32 scores on the features' device, one task's columns at a time."""
        return torch.cat([f(features) for f in self._scorers], dim=1)

    def to(self, device) -> "TaskAgnostic":
        """Keep the scoring tensors on ``device`` (a server scores every pass there)."""
        for f in self._scorers:
            f.to(device)
        return self

    def task_of(self, column: torch.Tensor) -> torch.Tensor:
        """The task index of each union column."""
        ends = torch.tensor([hi for _, hi in self.bounds], device=column.device)
        return torch.bucketize(column, ends, right=True)


def oas_shrinkage(cov: torch.Tensor, n: int) -> float:
    """The OAS estimator's shrinkage of the sample covariance ``cov`` of ``n`` samples (scikit-learn's formula)."""
    p = cov.shape[0]
    mu = cov.diagonal().mean()
    alpha = (cov * cov).mean()
    den = (n + 1.0) * (alpha - mu * mu / p)
    return 1.0 if den <= 0 else float(min(1.0, (alpha + mu * mu) / den))


def shrunk_covariance(scatter: torch.Tensor, dof: int, shrinkage: float | str) -> torch.Tensor:
    """The within-class covariance of a ``scatter`` with ``dof`` degrees of freedom (images minus classes), shrunk
    towards ``mean(diag) * I`` by ``shrinkage`` (a share, or ``"oas"``: :func:`oas_shrinkage`'s, at least 1e-6)."""
    dof = max(1, dof)
    cov = scatter / dof
    if shrinkage == "oas":
        shrinkage = max(1e-6, oas_shrinkage(cov, dof))
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    return (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean().clamp_min(1e-12) * eye


class _Scorer:
    """One task's scoring function ``(B, D) -> (B, C)`` (float32), from its statistics alone."""

    def __init__(self, stats: ClassStats, method: str, shrinkage: float | str) -> None:
        self.method = method
        means = stats.means.double()
        if method == "prototype":
            self.weight = torch.nn.functional.normalize(means, dim=1).T.float().contiguous()  # (D, C)
            return
        D = stats.dim
        cov = shrunk_covariance(stats.scatter.double(), int(stats.counts.sum()) - stats.num_classes, shrinkage)
        chol = torch.linalg.cholesky(cov)
        # whitening: z = L^-1 h, so (h - mu)^T cov^-1 (h - mu) = |z - m|^2; float64 keeps the expanded form exact
        self.white = torch.linalg.solve_triangular(chol, torch.eye(D, dtype=cov.dtype), upper=False).T.contiguous()
        self.m = (means @ self.white).T.contiguous()  # (D, C)
        self.const = -0.5 * (self.m * self.m).sum(0) - chol.diagonal().log().sum()  # -|m|^2/2 - logdet(cov)/2

    def to(self, device) -> "_Scorer":
        for key, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, key, value.to(device))
        return self

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.method == "prototype":
            return torch.nn.functional.normalize(h.float(), dim=1) @ self.weight.to(h.device)
        z = h.double() @ self.white.to(h.device)
        return (z @ self.m.to(h.device) - 0.5 * (z * z).sum(1, keepdim=True) + self.const.to(h.device)).float()


def combine(agnostic: TaskAgnostic, scores: torch.Tensor, logits: dict[str, torch.Tensor] | None = None, *,
            mode: str = "stats") -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's ``(task index, class within that task)`` (policy, pure). ``"stats"``: the best union column;
    ``"head"``: the statistics pick the task (its best class's score), that task's own head picks the class
    (``logits[task]``, ``(B, classes of the task)``)."""
    if mode not in COMBINE:
        raise ValueError(f"mode must be one of {COMBINE}, got {mode!r}")
    best = scores.argmax(1)
    task = agnostic.task_of(best)
    lo = torch.tensor([a for a, _ in agnostic.bounds], device=scores.device)[task]
    cls = best - lo
    if mode == "head":
        if logits is None or any(t not in logits for t in agnostic.tasks):
            raise ValueError("mode 'head' needs every task's logits")
        for i, name in enumerate(agnostic.tasks):
            rows = task == i
            if rows.any():
                cls[rows] = logits[name][rows].argmax(1).to(cls.device)
    return task, cls


def predict(model, agnostic: TaskAgnostic, x: torch.Tensor, *, mode: str = "stats") -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's ``(task index in agnostic.tasks, class within that task)`` from one pass of ``model``: the
    backbone alone (``mode="stats"``, the default, picked by measurement: ``docs/task_agnostic.md``), or with
    every task's logits (``"head"``)."""
    feats, logits = features_and_logits(model, x, agnostic.tasks if mode == "head" else [])
    return combine(agnostic, agnostic.scores(feats), logits, mode=mode)
