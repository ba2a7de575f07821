import timm
import torch

from continual_mem import MemoryViT, backbone_flops, cost_table, task_cost


def test_vit_b32_backbone_flops_match_the_published_count():
    # timm / fvcore report 4.41 GMACs for vit_base_patch32_224 (8.8 GFLOPs).
    model = MemoryViT(timm.create_model("vit_base_patch32_224"))
    assert abs(backbone_flops(model) / 2e9 - 4.41) < 0.05


def test_task_cost_counts_only_the_task():
    model = MemoryViT(timm.create_model("vit_base_patch32_224", num_classes=0))
    t = model.add_task("t", 100, memory=5)
    cost = task_cost(model, "t")
    assert cost.params == sum(p.numel() for p in t.parameters()) == 768 + 12 * 5 * 768 + 768 * 100 + 100
    d, n, keys = 768, 50, 50 + 1 + 5
    per_layer = 2 * (3 * d * d + d * d + 2 * d * 4 * d) + 4 * keys * d
    assert cost.flops == 12 * per_layer + 2 * d * 100
    assert cost.batch_flops == 12 * 2 * 5 * d * 2 * d
    # ten such tasks fill 3 groups of 4: 12 slots of ~2% of the backbone each (empty slots have no head)
    for i in range(9):
        model.add_task(f"t{i}", 100, memory=5)
    rows = cost_table(model)
    assert rows[-2]["name"] == "empty group slots (2)"
    assert rows[-2]["gflops"] * 1e9 == 2 * (cost.flops - 2 * d * 100)
    assert 1.2 < rows[-1]["ratio_to_backbone"] < 1.25


def test_extension_tasks_pay_for_the_keys_they_read():
    model = MemoryViT(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2))
    model.add_task("a", 3, memory=4)
    b = task_cost(model, model.add_task("b", 3, memory=4).name)
    c = task_cost(model, model.add_task("c", 3, memory=4, mode="extension").name)
    d = model.backbone.blocks[0].attn.attn_dim
    # two layers x one query x (tasks a and b: 2 tokens + 8 memory) extra keys, scores and weighted sum
    assert c.flops - b.flops == 2 * 4 * 1 * (2 + 8) * d
    assert model.tasks["c"].config.sees == ("a", "b")
    assert torch.is_tensor(model.tasks["c"].memory)
