"""The accuracy tables' configurations: a name for each regime and setting ``accuracy_tables.py`` can run."""
from __future__ import annotations

# name -> add_task keyword arguments ("all" fork = depth: the paper's unmasked regime on a private branch)
CONFIGS: dict[str, dict] = {
    "head": dict(regime="head"),
    "head+cls": dict(regime="head+cls"),
    "head+cls-unmasked": dict(regime="head+cls", fork_layers="all"),
    "masked-m5": dict(regime="masked-memory", memory=5),
    "masked-m10": dict(regime="masked-memory", memory=10),
    "masked-m5-tokens4": dict(regime="masked-memory", memory=5, task_tokens=4),
    "fork-k1": dict(regime="masked-memory", memory=5, fork_layers=1),
    "fork-k2": dict(regime="masked-memory", memory=5, fork_layers=2),
    "fork-k4": dict(regime="masked-memory", memory=5, fork_layers=4),
    "fork-k4-m1": dict(regime="masked-memory", memory=1, fork_layers=4),
    "fork-k6": dict(regime="masked-memory", memory=5, fork_layers=6),
    # pooled forks: the branch runs on the 2x2- (4x4-) average-pooled patch grid, so deeper forks fit the budget
    "fork-k6-p2": dict(regime="masked-memory", memory=5, fork_layers=6, fork_pool=2),
    "fork-k8-p2": dict(regime="masked-memory", memory=5, fork_layers=8, fork_pool=2),
    "fork-k12-p2": dict(regime="masked-memory", memory=5, fork_layers=12, fork_pool=2),
    "fork-k12-p4": dict(regime="masked-memory", memory=5, fork_layers=12, fork_pool=4),
    "fork-k6-p1x2": dict(regime="masked-memory", memory=5, fork_layers=6, fork_pool=(1, 2)),
    "fork-k7-p2": dict(regime="masked-memory", memory=5, fork_layers=7, fork_pool=2),
    "fork-k7-p1x2": dict(regime="masked-memory", memory=5, fork_layers=7, fork_pool=(1, 2)),
    "fork-k6-p2-m10": dict(regime="masked-memory", memory=10, fork_layers=6, fork_pool=2),
    "memory-m1": dict(regime="memory", memory=1),
    "memory-m5": dict(regime="memory", memory=5),
    "memory-m10": dict(regime="memory", memory=10),
    "memory-m20": dict(regime="memory", memory=20),
    "full": dict(regime="full"),  # TrainConfig's default recipe for full: layer decay 0.75 (= full-ld75)
    "full-no-decay": dict(regime="full", layer_decay=1.0),
    # the paper's Table 4: Houlsby adapters (bottleneck 5) alone and combined with memory
    "adapters-d5": dict(regime="adapters", adapter_dim=5),
    "memory-m5-adapters-d5": dict(regime="memory+adapters", memory=5, adapter_dim=5),
    # late forks on the patches the class token attends to most (EViT-style), at 224 px of 256 patches
    "fork-k6-s128": dict(regime="masked-memory", memory=5, fork_layers=6, fork_select=128),
    "fork-k8-s64": dict(regime="masked-memory", memory=5, fork_layers=8, fork_select=64),
    # preserving: adapters inside the late-fork branch only
    "fork-k6-a8": dict(regime="masked-memory", memory=5, fork_layers=6, adapter_dim=8),
    "fork-k6-p1x2-a8": dict(regime="masked-memory", memory=5, fork_layers=6, fork_pool=(1, 2), adapter_dim=8),
    # the Memory Transformer's ablations on propagated input memory (own pass)
    "input-memory-m5": dict(regime="input-memory", input_memory=5),
    "mem-ctrl-m5": dict(regime="mem-ctrl", input_memory=5),
    "mem-bottleneck-m5": dict(regime="mem-bottleneck", input_memory=5),
    # preserving surgical fine-tuning: the branch trains its own copy of the last k blocks (at 0.03x the rate)
    "fork-k1-ft": dict(regime="masked-memory", memory=5, fork_layers=1, fork_finetune=True),
    "fork-k2-ft": dict(regime="masked-memory", memory=5, fork_layers=2, fork_finetune=True),
    "fork-k3-ft": dict(regime="masked-memory", memory=5, fork_layers=3, fork_finetune=True),
    "fork-k4-ft": dict(regime="masked-memory", memory=5, fork_layers=4, fork_finetune=True),
    "fork-k8-s96-ft": dict(regime="masked-memory", memory=5, fork_layers=8, fork_select=96, fork_finetune=True),
    "fork-k10-s64-ft": dict(regime="masked-memory", memory=5, fork_layers=10, fork_select=64, fork_finetune=True),
    "fork-k6-s128-ft": dict(regime="masked-memory", memory=5, fork_layers=6, fork_select=128, fork_finetune=True),
    # preserving by construction: a ladder side network (LST) on the backbone's states at every block
    "ladder": dict(regime="ladder"),
    "fork-k6-p1x2-ft": dict(regime="masked-memory", memory=5, fork_layers=6, fork_pool=(1, 2), fork_finetune=True),
    # LP-FT (TrainConfig.probe_fraction): the first half of the steps trains only the head (and tokens), then the
    # pretrained copies join on a schedule of their own
    "full-lpft": dict(regime="full", probe_fraction=0.5),
    # layer-wise rate decay (TrainConfig.layer_decay, timm's rule): the patch embedding, which carries most of SGD's
    # gradient norm on a small weight, moves least
    "full-ld75": dict(regime="full", layer_decay=0.75),
    "full-ld75-lpft": dict(regime="full", layer_decay=0.75, probe_fraction=0.5),
    "fork-k2-ft-ld75": dict(regime="masked-memory", memory=5, fork_layers=2, fork_finetune=True, layer_decay=0.75),
    "fork-k3-ft-ld75": dict(regime="masked-memory", memory=5, fork_layers=3, fork_finetune=True, layer_decay=0.75),
}
TRAIN_KEYS = ("probe_fraction", "finetune_lr_scale", "layer_decay")  # TrainConfig fields a configuration may set
