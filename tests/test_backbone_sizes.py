"""The paper's Table 3 backbones (ViT-B/32, B/16, L/32 from the timm hub) on random weights: the same regimes,
exact preservation and the oracle, and the accuracy script's --backbone path, offline."""
import json
import sys
from pathlib import Path

import pytest
import torch

from continual_mem import ORIGINAL, MemoryViT
from continual_mem.backbone import create_backbone
from continual_mem.reference import reference_forward
from helpers import perturb

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["vit_base_patch32_224", "vit_base_patch16_224", "vit_large_patch32_224"])
def test_table3_backbones_take_every_preserving_design(name):
    torch.manual_seed(0)
    bb = create_backbone(name, img_size=64 if "32" in name else 32, num_classes=0)
    net = MemoryViT(bb)
    x = torch.randn(2, 3, bb.patch_embed.img_size[0], bb.patch_embed.img_size[1])
    perturb(net.add_task("masked", 3, memory=2), scale=0.02, seed=1)
    with torch.no_grad():
        before = net(x)
    perturb(net.add_task("ft", 4, memory=2, fork_layers=2, fork_finetune=True), scale=0.02, seed=2)
    perturb(net.add_task("mem", 4, regime="memory", memory=2), scale=0.02, seed=3)
    with torch.no_grad():
        out = net(x)
        ref = reference_forward(net, x)
    for key in (ORIGINAL, "masked"):
        assert torch.equal(out[key], before[key])
    torch.testing.assert_close(out["ft"], ref["ft"], rtol=1e-4, atol=1e-4)


def test_accuracy_script_runs_a_hub_backbone_by_name_on_random_weights(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import accuracy_tables

    accuracy_tables.main(["--device", "cpu", "--backbone", "vit_base_patch32_224", "--random-weights",
                          "--img-size", "64", "--datasets", "digits", "--configs", "head,fork-k2-ft", "--steps", "2",
                          "--batch-size", "8", "--seeds", "0", "--sweep-seeds", "0", "--grid", "0.1",
                          "--min-heldout", "20", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "digits.json").read_text())
    assert result["backbone"] == "vit_base_patch32_224 (random weights)"
    assert [r["config"] for r in result["rows"]] == ["head", "fork-k2-ft"]
