"""Fig. 4-style learning-rate curves from accuracy_tables results."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import lr_curves  # noqa: E402


def test_sweep_points_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [{"dataset": "d", "config": c, "seed": s, "lr": lr, "heldout_accuracy": a, "test_accuracy": a - 0.01}
            for c, s, lr, a in [("head", 0, 0.3, 0.8), ("head", 0, 0.03, 0.7), ("head", 1, 0.3, 0.9),
                                ("full", 0, 0.01, 0.6), ("full", 0, 0.003, 0.65), ("one-rate", 0, 0.1, 0.5)]]
    (tmp_path / "d.json").write_text(json.dumps({"runs": runs}))
    points = lr_curves.sweep_points([tmp_path])
    assert set(points["d"]) == {"head", "full"}  # one rate is no curve
    assert [p["lr"] for p in points["d"]["head"]] == [0.03, 0.3]  # the second seed is not part of the sweep
    assert points["d"]["head"][1] == {"lr": 0.3, "heldout": 0.8, "test": 0.8 - 0.01}
    lr_curves.main([str(tmp_path), "--out", str(tmp_path / "out"), "--configs", "head"])
    assert (tmp_path / "out" / "d.png").stat().st_size > 1000
    assert list(json.loads((tmp_path / "out" / "lr_curves.json").read_text())["d"]) == ["head"]
