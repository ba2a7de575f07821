"""Registry guarantees: exact reload across processes, corruption detection, atomic changes under crashes and
concurrency, refused imports leave the DB unchanged, dependants protected, append-only log, PostgreSQL."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from continual_mem import MemoryViT, TaskStateError, export_task_bytes
from helpers import make_backbone, perturb
from registry import Registry, RegistryError, VerificationFailed
from registry import api as registry_api
from registry.db import session
from registry_helpers import (PostgresServer, find_postgres_bin, flip_param_byte, grow, new_registry,
                              rewrite_task_params, snapshot)

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def run_child(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture
def three(tmp_path):
    reg, net = new_registry(tmp_path / "reg.db")
    grow(reg, net, "a", 1)
    grow(reg, net, "b", 2, mode="extension", memory=2, layers="last:2")
    grow(reg, net, "c", 3, regime="head")
    return reg, net


def test_reload_in_a_new_process_is_bit_exact(three, tmp_path):
    reg, net = three
    child = run_child("""
        import json, sys, torch
        from registry import Registry
        from registry import api
        from registry.db import session
        reg = Registry(sys.argv[1])
        model = reg.load()
        with session(reg.engine) as s:
            row = api.get_model(s, "default")
            images = api.probe_images(s, row)
            with api.cpu_threads(api.verify_threads(s)), torch.inference_mode():
                out = model(images, original=False)
            equal = {t.name: torch.equal(out[t.name], api._tensor_from_ref(t.reference)) for t in row.tasks}
        report = reg.verify()
        print(json.dumps({"equal": equal, "statuses": {t.name: t.status for t in report.tasks}, "ok": report.ok}))
    """, str(tmp_path / "reg.db"))
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result == {"equal": {"a": True, "b": True, "c": True},
                      "statuses": {"a": "equal", "b": "equal", "c": "equal"}, "ok": True}
    reloaded = reg.load()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name in "abc":
            assert torch.equal(reloaded(x)[name], net(x)[name])


def test_flipped_byte_is_named_by_verification(three):
    reg, _ = three
    flip_param_byte(reg, "a")
    report = reg.verify()
    assert not report.ok
    status = {t.name: t for t in report.tasks}
    assert status["a"].status == "corrupt" and "sha256 mismatch" in status["a"].detail
    assert status["b"].status == "blocked" and "'a'" in status["b"].detail  # b attends to a
    assert status["c"].status == "equal"
    assert reg.verification_history()[-1]["results"] == {"a": "corrupt", "b": "blocked", "c": "equal"}
    with pytest.raises(RegistryError, match="task 'a' is corrupt"):
        reg.load()


def test_changed_logits_are_a_mismatch_with_max_abs_diff(three):
    reg, _ = three
    with reg.engine.begin() as conn:  # tamper with a stored reference instead of the parameters
        tid = conn.execute(text("SELECT id FROM tasks WHERE name='c'")).scalar()
        raw = bytearray(conn.execute(text("SELECT logits FROM \"references\" WHERE task_id=:i"), {"i": tid}).scalar())
        raw[0:4] = torch.tensor([123.0]).numpy().tobytes()
        conn.execute(text("UPDATE \"references\" SET logits=:d WHERE task_id=:i"), {"d": bytes(raw), "i": tid})
    report = reg.verify()
    c = next(t for t in report.tasks if t.name == "c")
    assert c.status == "mismatch" and c.max_abs_diff > 100


def test_outputs_one_ulp_off_are_a_mismatch_naming_the_task(three):
    # the stored blob and its sha256 agree (rewritten together), so only comparing the outputs bit for bit can tell:
    # a tolerance (allclose, atol 1e-3) would call these logits equal
    reg, _ = three
    with session(reg.engine) as s:
        probe = registry_api.probe_images(s, registry_api.get_model(s, "default"))
    net = reg.load()
    with torch.inference_mode():
        before = net(probe, original=False)["c"]
    steps = 0

    def one_ulp(task):  # the smallest nudge of one bias that changes some logit's bits
        nonlocal steps
        bias = task.head.bias
        while True:
            steps += 1
            bias[0] = torch.nextafter(bias[0], torch.tensor(float("inf")))
            if not torch.equal(task.head(net.backbone.forward_head(net.backbone.forward_features(probe),
                                                                   pre_logits=True))[:, 0], before[:, 0]):
                return

    rewrite_task_params(reg, "c", one_ulp)
    report = reg.verify()
    status = {t.name: t for t in report.tasks}
    assert not report.ok and steps < 64
    assert status["c"].status == "mismatch" and 0 < status["c"].max_abs_diff < 1e-5, status["c"]
    assert status["a"].status == status["b"].status == "equal"
    assert reg.verification_history()[-1]["results"] == {"a": "equal", "b": "equal", "c": "mismatch"}


def test_reference_from_another_build_is_not_comparable(three):
    reg, _ = three
    with reg.engine.begin() as conn:
        build = json.loads(conn.execute(text("SELECT build FROM \"references\" LIMIT 1")).scalar())
        build["torch"] = "1.0.0+elsewhere"
        conn.execute(text("UPDATE \"references\" SET build=:b WHERE task_id=(SELECT min(task_id) FROM \"references\")"),
                     {"b": json.dumps(build)})
    report = reg.verify()
    a = next(t for t in report.tasks if t.name == "a")
    assert a.status == "not-comparable" and "1.0.0+elsewhere" in a.detail


def test_exception_mid_add_leaves_previous_state(three, monkeypatch):
    reg, net = three
    before = snapshot(reg)

    def boom(*args, **kwargs):  # parameters are written and flushed by now, the commit has not happened
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(registry_api, "check", boom)
    perturb(net.add_task("d", 3), seed=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        reg.add_task(net, "d")
    assert snapshot(reg) == before
    assert reg.task_names() == ["a", "b", "c"]


def test_killed_process_mid_add_leaves_previous_state(three, tmp_path):
    reg, _ = three
    before = snapshot(reg)
    child = run_child("""
        import os, signal, sys
        from continual_mem import MemoryViT
        from helpers import perturb
        from registry import Registry
        from registry import api
        reg = Registry(sys.argv[1])
        net = reg.load()
        perturb(net.add_task("d", 3), seed=4)
        def die(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)  # rows for d are flushed, nothing committed
        api.check = die
        reg.add_task(net, "d")
    """, str(tmp_path / "reg.db"))
    assert child.returncode == -9, child.stderr
    fresh = Registry(tmp_path / "reg.db")
    assert snapshot(fresh) == before
    with fresh.engine.connect() as conn:
        assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
    assert fresh.verify().ok
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("reg.db")) == []  # no orphan files


def test_two_processes_adding_concurrently_both_land(three, tmp_path):
    code = """
        import sys, time
        from helpers import perturb
        from registry import Registry
        from registry import api
        reg = Registry(sys.argv[1])
        net = reg.load()
        perturb(net.add_task(sys.argv[2], 3), seed=int(sys.argv[3]))
        slow = api.check
        def held(*a, **k):  # hold the write transaction open so the other process has to wait for it
            time.sleep(1.0)
            return slow(*a, **k)
        api.check = held
        go = sys.argv[4]
        open(go + "." + sys.argv[2], "w").close()  # ready
        while not __import__("os").path.exists(go):
            time.sleep(0.01)
        reg.add_task(net, sys.argv[2])
        print("ok")
    """
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(tmp_path / "reg.db"), name, seed,
                               str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, seed in (("d", "4"), ("e", "5"))]
    import time

    deadline = time.monotonic() + 240
    while not all((tmp_path / f"go.{n}").exists() for n in "de"):  # both loaded, both about to write
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "children did not start"
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "locked" not in err
    reg, _ = three
    assert sorted(reg.task_names()) == ["a", "b", "c", "d", "e"]
    assert reg.verify().ok


def test_refused_imports_change_nothing(three, tmp_path):
    reg, _ = three
    before = snapshot(reg)
    events = len(reg.events())
    other = MemoryViT(make_backbone("tiny", seed=9))
    other.add_task("z", 3)
    with pytest.raises(RegistryError, match="was trained on backbone"):
        reg.import_bundle(export_task_bytes(other, "z"))
    good = reg.export_bundle("a")
    truncated = tmp_path / "a.safetensors"
    truncated.write_bytes(good[: len(good) - 100])
    with pytest.raises(TaskStateError, match="not a readable safetensors|corrupted"):
        reg.import_bundle(truncated)
    with pytest.raises(RegistryError, match="already has a task named 'a'"):
        reg.import_bundle(good)
    with pytest.raises(RegistryError, match="does not exist"):
        reg.import_bundle(tmp_path / "nope.safetensors")
    assert snapshot(reg) == before
    kinds = [e["kind"] for e in reg.events()[events:]]
    assert kinds == ["failure", "failure", "failure"]  # the missing file is refused before touching the DB


def _second(net, folder) -> Registry:
    folder.mkdir(parents=True, exist_ok=True)
    second = Registry(folder / "second.db")
    second.create_model(net.backbone, timm_name="vit_tiny_patch16_224",
                        model_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3,
                                      "num_classes": 10})
    return second


def test_export_import_round_trip_through_a_second_registry(three, tmp_path):
    reg, net = three
    second = _second(net, tmp_path)
    report = second.import_bundle(reg.export_bundle("a"))
    assert [t.status for t in report.tasks] == ["new"] and report.trigger == "import:a"
    event = second.events()[-1]
    assert event["kind"] == "import" and event["task"] == "a" and event["detail"]["source"] == "bundle"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(second.load()(x)["a"], net(x)["a"])


def test_many_bundles_import_in_one_change_and_one_verification(three, tmp_path):
    reg, net = three
    bundles = [reg.export_bundle(n) for n in ("a", "b", "c")]
    one_by_one, at_once = _second(net, tmp_path / "1"), _second(net, tmp_path / "2")
    for b in bundles:
        one_by_one.import_bundle(b)
    runs = len(at_once.verification_history())
    report = at_once.import_bundles(bundles)
    assert [(t.name, t.status) for t in report.tasks] == [("a", "new"), ("b", "new"), ("c", "new")]
    assert report.trigger == "import:3 tasks" and len(at_once.verification_history()) == runs + 1  # one check
    assert [e["task"] for e in at_once.events() if e["kind"] == "import"] == ["a", "b", "c"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(at_once.load()(x)[n], one_by_one.load()(x)[n]) for n in "abc")
    assert at_once.verify().ok
    before = snapshot(at_once)
    with pytest.raises(RegistryError, match="already has a task named 'a'"):  # the second of two: neither lands
        at_once.import_bundles([export_task_bytes(_fresh_task(net), "fresh"), bundles[0]])
    with pytest.raises(RegistryError, match="no bundle to import"):
        at_once.import_bundles([])
    assert snapshot(at_once) == before


def _fresh_task(net) -> MemoryViT:
    other = MemoryViT(net.backbone)
    perturb(other.add_task("fresh", 3), seed=4)
    return other


def test_remove_respects_extension_dependants(three):
    reg, _ = three
    with pytest.raises(RegistryError, match=r"extension tasks \['b'\] attend to it"):
        reg.remove_task("a")
    report = reg.remove_task("b")
    assert report.ok and [t.name for t in report.tasks] == ["a", "c"]
    reg.remove_task("a")
    assert reg.task_names() == ["c"]
    assert [e["kind"] for e in reg.events()][-4:] == ["verify", "remove", "verify", "remove"]


def test_failed_verification_rolls_back_the_change(three, monkeypatch):
    reg, net = three
    before = snapshot(reg, skip=("events", "verification_runs", "verification_results"))
    real = registry_api.check

    def bad(s, model, **kw):
        report = real(s, model, **kw)
        report.tasks[0].status = "mismatch"  # pretend adding d changed a's outputs
        return report

    monkeypatch.setattr(registry_api, "check", bad)
    perturb(net.add_task("d", 3), seed=4)
    with pytest.raises(VerificationFailed, match="add of task 'd' rolled back: verification failed for a"):
        reg.add_task(net, "d")
    assert snapshot(reg, skip=("events", "verification_runs", "verification_results")) == before
    assert reg.verification_history()[-1]["ok"] is False
    assert reg.events()[-1]["kind"] == "failure"


def test_event_log_is_append_only(three):
    reg, _ = three
    with pytest.raises(DatabaseError, match="append-only"):
        with reg.engine.begin() as conn:
            conn.execute(text("UPDATE events SET kind='x'"))
    with pytest.raises(DatabaseError, match="append-only"):
        with reg.engine.begin() as conn:
            conn.execute(text("DELETE FROM events"))


def test_schema_version_is_checked(tmp_path):
    reg, _ = new_registry(tmp_path / "reg.db")
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE meta SET value='999' WHERE key='schema_version'"))
    with pytest.raises(RegistryError, match="schema version 999"):
        Registry(tmp_path / "reg.db")


def test_unknown_model_and_task_errors(three):
    reg, net = three
    with pytest.raises(RegistryError, match="no model named 'nope'"):
        reg.load("nope")
    with pytest.raises(RegistryError, match="has no task 'zzz'"):
        reg.remove_task("zzz")
    with pytest.raises(RegistryError, match="has no task 'zzz'"):
        reg.add_task(net, "zzz")


def test_sqlite_pragmas(three):
    reg, _ = three
    with reg.engine.connect() as conn:
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 60000


@pytest.fixture(scope="module")
def postgres():
    if find_postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql); .ci/run installs them")
    server = PostgresServer()
    yield server.url
    server.stop()


def test_postgresql_backend(postgres):
    reg, net = new_registry(postgres)
    grow(reg, net, "a", 1)
    grow(reg, net, "b", 2, mode="extension")
    assert [t.status for t in reg.verify().tasks] == ["equal", "equal"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(Registry(postgres).load()(x)["b"], net(x)["b"])
    with pytest.raises(RegistryError, match="attend to it"):
        reg.remove_task("a")
    with pytest.raises(DatabaseError, match="append-only"):
        with reg.engine.begin() as conn:
            conn.execute(text("DELETE FROM events"))


def test_a_rolled_back_change_names_each_failing_task_with_its_evidence():
    import datetime as dt

    from registry.api import Report, TaskCheck
    from registry.changes import failure_message

    now = dt.datetime(2026, 12, 2)
    report = Report("default", "add", {}, now, now, [
        TaskCheck("a", "equal", max_abs_diff=0.0), TaskCheck("b", "mismatch", max_abs_diff=1.5e-7, detail="logits"),
        TaskCheck("c", "corrupt", detail="no stored reference outputs"), TaskCheck("d", "not-comparable"),
        TaskCheck("e", "blocked")])
    assert failure_message(report, "add of task 'x'") == (
        "add of task 'x' rolled back: verification failed for b (mismatch, max abs diff 1.5e-07: logits), "
        "c (corrupt: no stored reference outputs), e (blocked)")
