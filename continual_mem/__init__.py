"""continual-mem: a frozen timm ViT that learns task after task with learnable memory, bit-exactly
preserving the original model and every earlier task (Sandler et al., CVPR 2022)."""
from .accounting import backbone_flops, cost_table, task_cost
from .backbone import BackboneError, create_backbone, fingerprint
from .config import MODES, REGIMES, TaskConfig, parse_layers
from .masking import TokenSpec, build_attention_mask, visible_tasks
from .model import ORIGINAL, MemoryViT, TaskError
from .state import TaskStateError, export_task, export_task_bytes, import_task, import_task_bytes, merge
from .task import TaskModule
from .train import TrainConfig, build_optimizer, evaluate, fit, lr_sweep, train_step

__version__ = "0.1.0"

__all__ = [
    "ORIGINAL", "MODES", "REGIMES", "BackboneError", "MemoryViT", "TaskConfig", "TaskError", "TaskModule",
    "TaskStateError", "TokenSpec", "TrainConfig", "backbone_flops", "build_attention_mask", "build_optimizer",
    "cost_table", "create_backbone", "evaluate", "export_task", "export_task_bytes", "fingerprint", "fit",
    "import_task", "import_task_bytes", "lr_sweep", "merge", "parse_layers", "task_cost", "train_step",
    "visible_tasks",
]
