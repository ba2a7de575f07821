import json

from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def test_cost_json_matches_the_library():
    result = runner.invoke(app, ["cost", "--backbone", "vit_base_patch32_224", "--tasks", "10", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["name"] == "backbone" and abs(rows[0]["gflops"] - 8.82) < 0.05
    assert len(rows) == 13 and 1.2 < rows[-1]["ratio_to_backbone"] < 1.25


def test_cost_table_and_unknown_backbone():
    ok = runner.invoke(app, ["cost", "--backbone", "vit_tiny_patch16_224", "--tasks", "2"])
    assert ok.exit_code == 0 and "task1" in ok.stdout
    bad = runner.invoke(app, ["cost", "--backbone", "resnet_nope"])
    assert bad.exit_code == 2
    assert "unknown timm model 'resnet_nope'" in bad.output
