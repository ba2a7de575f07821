"""The accuracy-table protocol end to end on a tiny budget: sweep seeds, grid, held-out floor, divergence retry."""
import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import accuracy_tables  # noqa: E402
from helpers import make_backbone  # noqa: E402


def test_protocol_runs_and_reports_what_it_chose(tmp_path):
    args = argparse.Namespace(img_size=28, data_root="data", min_heldout=300, max_heldout=1000, device="cpu", grid="0.01,0.3",
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

    import merge_tables

    bb = make_backbone("tiny")

    def args(grid: str, out: Path, tag: str) -> argparse.Namespace:
        return argparse.Namespace(img_size=28, data_root="data", min_heldout=300, max_heldout=1000, device="cpu",
                                  grid=grid, full_grid="", sweep_seeds="0,1", seeds="0,2", configs="head", steps=20,
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
    args = argparse.Namespace(img_size=28, data_root="data", min_heldout=4, max_heldout=8, device="cpu", grid="0.1",
                              full_grid="", sweep_seeds="0", seeds="0", configs="head", steps=1, batch_size=4,
                              cuda_graph=False, out=out, tag="")
    res = accuracy_tables.run_dataset(f"imagefolder:{folder}", make_backbone("tiny"), args)
    assert res["dataset"] == f"imagefolder:{folder}"
    stem = result_stem(res["dataset"])
    assert "/" not in stem and ":" not in stem and stem.endswith("photos")
    assert [p.name for p in out.iterdir()] == [f"{stem}.partial.json"]
    partial = json.loads((out / f"{stem}.partial.json").read_text())
    assert (partial["steps"], partial["img_size"], partial["batch_size"]) == (1, 28, 4)  # a cut run says what it ran


def test_recovery_table_pools_seeds_and_gives_the_share_with_its_error(tmp_path):
    import recovery_table as rt

    def runs(config, lr, accs, dataset="packed:/x/fmnist.npz"):
        return [{"dataset": dataset, "config": config, "seed": s, "lr": lr, "test_accuracy": a}
                for s, a in enumerate(accs)]

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "head.json").write_text(json.dumps({"steps": 2000, "runs": runs("head", 1.0, [0.80, 0.82, 0.81])
                                                          + runs("head", 0.1, [0.99, 0.99, 0.99])}))
    (tmp_path / "a" / "long.json").write_text(json.dumps({"steps": 5000, "runs": runs("head", 1.0, [0.5, 0.5, 0.5])}))
    # a partial that does not say its steps, and a final file holding a different value for the same run
    (tmp_path / "a" / "mem.partial.json").write_text(json.dumps({"runs": runs("memory-m10", 0.03, [0.0, 0.90])}))
    (tmp_path / "a" / "mem.json").write_text(json.dumps({"steps": 2000, "runs": runs("memory-m10", 0.03,
                                                                                      [0.91, 0.89, 0.90])[:1]}))
    for s, a in enumerate([0.88, 0.86, 0.87]):
        (tmp_path / f"d{s}.json").write_text(json.dumps({"dataset": "fmnist", "config": "default", "seed": s,
                                                         "lr": 0.2, "steps": 2000, "test_accuracy": a}))
    (tmp_path / "bits.json").write_text('{"ok": true}\nOK: trailing line')  # not JSON: skipped
    for i, c in enumerate((0.30, 0.32, 0.31)):
        (tmp_path / f"timing_{i}.json").write_text(json.dumps({"timing": {"rows": [
            {"config": "fork", "measured_cost_ratio": c}]}}))
    got = rt.collect([tmp_path], {"head": 1.0, "memory-m10": 0.03}, 2000, partials_steps=2000)
    assert got[("fmnist", "head")] == {0: 0.80, 1: 0.82, 2: 0.81}  # the rate picked, the 5,000-step runs left out
    assert got[("fmnist", "memory-m10")] == {0: 0.91, 1: 0.90}  # the final file wins; seed 2 only in neither
    assert got[("fmnist", "default")] == {0: 0.88, 1: 0.86, 2: 0.87}
    assert ("fmnist", "memory-m10") not in rt.collect([tmp_path / "a" / "mem.partial.json"], {}, 2000)
    res = rt.table(got, rt.costs([tmp_path]), head="head", memory="memory-m10", preserving="default",
                   timing_config={"default": "fork"})
    row = res["rows"][0]
    assert row["recovered"] == pytest.approx((0.87 - 0.81) / (0.905 - 0.81))
    # delta method by hand: d(a/b) with a = d - h, b = m - h
    a, b = 0.06, 0.095
    se_d, se_m, se_h = 0.01 / 3 ** 0.5, 0.00707107 / 2 ** 0.5, 0.01 / 3 ** 0.5
    want = ((se_d / b) ** 2 + (a / b ** 2 * se_m) ** 2 + ((a - b) / b ** 2 * se_h) ** 2) ** 0.5
    assert row["recovered_se"] == pytest.approx(want, rel=1e-4)
    assert res["cost"]["default"] == pytest.approx((0.31, 0.30, 0.32))
    text = rt.markdown(res, head="head", memory="memory-m10", preserving="default")
    assert "| fmnist | 81.00 ± 1.00 (3) | 90.50 ± 0.71 (2) | +9.5 | 87.00 ± 1.00 (3) | 63% ± " in text
    with pytest.raises(ValueError, match="no gain to recover"):
        rt.recovery([0.8], [0.8], [0.9])
