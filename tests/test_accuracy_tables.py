"""The accuracy-table protocol end to end on a tiny budget: sweep seeds, grid, held-out floor, divergence retry."""
import argparse
import sys
from pathlib import Path

import pytest

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


def test_rate_shards_merge_to_the_unsharded_table(tmp_path):
    """Shards of one rate each (every seed), merged, pick the same rate and report the same runs as one run over
    the whole grid; a missing shard is named."""
    import json

    import merge_tables

    bb = make_backbone("tiny")

    def args(grid: str, out: Path, tag: str) -> argparse.Namespace:
        return argparse.Namespace(data_root="data", min_heldout=300, max_heldout=1000, device="cpu", grid=grid,
                                  full_grid="", sweep_seeds="0,1", seeds="0,2", configs="head", steps=20,
                                  batch_size=16, cuda_graph=False, out=out, tag=tag)

    whole = accuracy_tables.run_dataset("digits", bb, args("0.03,1", tmp_path, ""))
    shards = tmp_path / "shards"
    shards.mkdir()
    env = {"backbone": "tiny", "img_size": 32, "steps": 20, "batch_size": 16, "seeds": "0,2", "sweep_seeds": "0,1",
           "min_heldout": 300}
    for i, lr in enumerate(("0.03", "1")):
        res = accuracy_tables.run_dataset("digits", bb, args(lr, shards, f"__r{i}"))
        (shards / f"digits__r{i}.json").write_text(json.dumps({**env, "command": f"shard {lr}", **res}))
    merged = merge_tables.main([str(shards), "--out", str(tmp_path / "merged")])[0]
    want, got = whole["rows"][0], merged["rows"][0]
    for key in ("lr", "grid", "test_accuracy", "rejected_lrs", "diverged_seeds", "sweep", "trainable_params"):
        assert got[key] == want[key], key
    assert json.loads((tmp_path / "merged" / "digits.json").read_text())["merged_from"] == ["digits__r0.json",
                                                                                              "digits__r1.json"]
    (shards / "digits__r1.json").unlink()  # one rate's shard lost: the pooled grid is one rate, still complete
    data = json.loads((shards / "digits__r0.json").read_text())
    data["runs"] = [r for r in data["runs"] if r["seed"] != 1]  # a sweep seed lost
    (shards / "digits__r0.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"sweep runs missing for \(seed, lr\) \[\(1, 0.03\)\]"):
        merge_tables.merge(sorted(shards.glob("*.json")))


def test_a_dataset_spec_with_a_path_gets_a_file_name(tmp_path):
    # imagefolder:/abs/path has slashes and a colon: the partial (and final) JSON is named after it, not at it
    from test_datasets import write_png

    from table_report import result_stem

    folder = tmp_path / "photos"
    for c, cls in enumerate(("cat", "dog")):
        for i in range(12):
            write_png(folder / cls / f"{i}.png", seed=c * 20 + i)
    out = tmp_path / "out"
    out.mkdir()
    args = argparse.Namespace(data_root="data", min_heldout=4, max_heldout=8, device="cpu", grid="0.1",
                              full_grid="", sweep_seeds="0", seeds="0", configs="head", steps=1, batch_size=4,
                              cuda_graph=False, out=out, tag="")
    res = accuracy_tables.run_dataset(f"imagefolder:{folder}", make_backbone("tiny"), args)
    assert res["dataset"] == f"imagefolder:{folder}"
    stem = result_stem(res["dataset"])
    assert "/" not in stem and ":" not in stem and stem.endswith("photos")
    assert [p.name for p in out.iterdir()] == [f"{stem}.partial.json"]
