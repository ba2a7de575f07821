"""The accuracy-table protocol end to end on a tiny budget: sweep seeds, grid, held-out floor, divergence retry."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import accuracy_tables  # noqa: E402
from helpers import make_backbone  # noqa: E402


def test_protocol_runs_and_reports_what_it_chose(tmp_path):
    args = argparse.Namespace(data_root="data", min_heldout=300, max_heldout=1000, device="cpu", grid="0.01,0.3",
                              full_grid="0.001,0.01", sweep_seeds="0,1", seeds="0,2", configs="head,masked-m5,adapters-d5",
                              steps=2, batch_size=16, cuda_graph=False, out=tmp_path, tag="")
    res = accuracy_tables.run_dataset("digits", make_backbone("tiny"), args)
    assert res["heldout_images"] >= 280 and abs(res["heldout_share"] - 300 / 1437) < 0.01  # 72 images before
    for row in res["rows"]:
        assert row["grid"] == [0.01, 0.3] and row["lr"] in row["grid"] and row["sweep_seeds"] == [0, 1]
        assert len(row["test_accuracy"]) == 2
        assert set(row["sweep"]) == {0.01, 0.3}
        # two untrained steps stay at chance: every rate diverges, so the other rate was tried before giving up
        if row["diverged_seeds"]:
            assert row["rejected_lrs"]
    runs = [r for r in res["runs"] if r["config"] == "head"]
    assert {(r["seed"], r["lr"]) for r in runs} >= {(0, 0.01), (0, 0.3), (1, 0.01), (1, 0.3)}
    assert "diverged seeds" in accuracy_tables.markdown(res) or all(not r["diverged_seeds"] for r in res["rows"])
