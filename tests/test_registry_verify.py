"""What the registry's verification stands on besides the bits: references are compared only on the build that
made them, changes reuse the registered backbone instead of rebuilding it, every change locks its model's row,
a corrupted blob is refused by name on export."""
import pytest
from sqlalchemy import text

from registry import RegistryError, api
from registry_helpers import flip_param_byte, grow, new_registry, two_task_registry


@pytest.fixture
def two(tmp_path):
    return two_task_registry(tmp_path)


def test_references_are_compared_only_on_the_build_that_made_them(two):
    # the CPU thread count is part of what decides a forward's bits: a reference made with one is not compared
    # with outputs made with another, it is reported as not comparable, naming the difference
    reg, _ = two
    assert reg.verify().ok
    with reg.engine.begin() as conn:
        threads = int(conn.execute(text("SELECT value FROM meta WHERE key = 'verify_threads'")).scalar())
        conn.execute(text("UPDATE meta SET value = :v WHERE key = 'verify_threads'"), {"v": str(threads + 1)})
    report = reg.verify()
    assert report.model == "default" and report.trigger == "manual"
    assert report.build["threads"] == threads + 1  # reported, not failed: a new build cannot be compared
    assert [(c.name, c.status) for c in report.tasks] == [("a", "not-comparable"), ("b", "not-comparable")]
    assert f"'threads': ({threads}, {threads + 1})" in report.tasks[0].detail


def test_changes_reuse_the_registered_backbone(two, monkeypatch):
    # building a backbone from its stored bytes is the slow part of a check: the registry builds it once and
    # every later verify, import and removal reuses it
    reg, _net = two
    reg.verify()  # the registry's backbone is built by now
    built = []
    real = api.instantiate_backbone
    monkeypatch.setattr(api, "instantiate_backbone", lambda row: built.append(row) or real(row))
    bundle = reg.export_bundle("b")
    reg.remove_task("b")
    reg.import_bundle(bundle)
    reg.verify()
    grow(reg, _net, "c", 3)  # an add checks with the training model's backbone
    assert built == [] and reg.task_names() == ["a", "b", "c"]


def test_every_change_locks_its_model_row(two, monkeypatch):
    # on PostgreSQL two writers changing one model are serialised by SELECT ... FOR UPDATE on its row
    reg, net = two
    locks = []
    real = api.get_model
    monkeypatch.setattr(api, "get_model", lambda s, name, **kw: locks.append(kw.get("for_update")) or real(s, name,
                                                                                                           **kw))
    bundle = reg.export_bundle("b")
    locks.clear()  # reading is not a change
    reg.remove_task("b")
    assert True in locks
    locks.clear()
    reg.import_bundle(bundle)
    assert True in locks
    locks.clear()
    grow(reg, net, "c", 3)
    assert True in locks


def test_a_corrupted_blob_is_reported_and_refused_on_export_by_name(two):
    reg, _ = two
    flip_param_byte(reg, "a")
    report = reg.verify()  # the first task is unreadable: the ones after it are still checked
    assert [(c.name, c.status) for c in report.tasks] == [("a", "corrupt"), ("b", "equal")] and not report.ok
    with pytest.raises(RegistryError, match=r"^task 'a''s stored parameters are corrupted \(sha256 mismatch\)$"):
        reg.export_bundle("a")
    assert reg.export_bundle("b")  # the others still export


def test_a_task_without_its_reference_is_corrupt_and_the_others_still_compared(two):
    reg, _ = two
    with reg.engine.begin() as conn:
        conn.execute(text('DELETE FROM "references" WHERE task_id = (SELECT id FROM tasks WHERE name = :n)'),
                     {"n": "a"})
    report = reg.verify()
    a, b = report.tasks
    assert (a.name, a.status, a.detail) == ("a", "corrupt", "no stored reference outputs") and not report.ok
    assert (b.name, b.status, b.max_abs_diff) == ("b", "equal", 0.0)


def reference_of(logits, build: dict):
    """What ``api.compare`` reads of a stored reference, for ``logits`` computed on ``build``."""
    from types import SimpleNamespace

    raw = logits.numpy().tobytes()
    return SimpleNamespace(logits=raw, sha256=api.sha256(raw), shape=list(logits.shape),
                           dtype=str(logits.dtype).removeprefix("torch."), build=build)


def test_compare_names_the_difference():
    import torch

    out = torch.tensor([[1.0, 2.0]])
    build = api.current_build(1)
    ref = reference_of(out, build)
    assert api.compare("t", out, ref, build) == api.TaskCheck("t", "equal", max_abs_diff=0.0)
    off = torch.tensor([[1.0, 2.5]])
    got = api.compare("t", off, ref, build)
    assert (got.name, got.status, got.max_abs_diff) == ("t", "mismatch", 0.5)
    assert got.detail == f"logits differ from the stored reference (sha256 {ref.sha256[:16]}…)"
    assert api.compare("t", out[:, :1], ref, build).max_abs_diff == float("inf")  # another shape
    other = {**build, "torch": "0.0"}
    got = api.compare("t", out, ref, other)
    assert (got.name, got.status) == ("t", "not-comparable")
    assert got.detail == f"reference computed on another build: {{'torch': ({build['torch']!r}, '0.0')}}"


def test_equal_means_the_same_bytes_not_equal_values():
    # torch.equal calls -0.0 and 0.0 equal; their bytes differ, so the stored outputs did change
    import torch

    build = api.current_build(1)
    zero = torch.zeros(1, 2)
    ref = reference_of(zero, build)
    assert torch.equal(-zero, zero)
    assert api.compare("t", -zero, ref, build).status == "mismatch"


def test_an_added_task_is_stored_with_all_it_is(tmp_path):
    # every column an add writes, read back: the task row, its blob, its reference and build, its metrics, the
    # verification it passed and the event
    from sqlalchemy import select

    from registry.db import session
    from registry.schema import Task

    reg, net = new_registry(tmp_path / "r.db")
    grow(reg, net, "a", 1)
    report = grow(reg, net, "b", 2, memory=2, layers="last:2", dataset="digits", class_names=("x", "y", "z"))
    assert report.trigger == "add:b" and [(c.name, c.status) for c in report.tasks] == [("a", "equal"), ("b", "new")]
    a, b = reg.tasks()
    task = net.tasks["b"]
    assert a["position"] == 1 and task.config.dataset == "digits" and task.config.class_names == ("x", "y", "z")
    assert {k: b[k] for k in ("name", "position", "regime", "mode", "memory", "layers", "num_classes", "dataset",
                              "param_count", "status")} == {
        "name": "b", "position": a["position"] + 1, "regime": "masked-memory", "mode": "concatenation", "memory": 2,
        "layers": list(task.config.layers), "num_classes": 3, "dataset": task.config.dataset,
        "param_count": sum(p.numel() for p in task.state_dict().values()), "status": "active"}
    assert b["metrics"] == [{"split": "test", "accuracy": 0.5, "loss": None, "steps": None, "wall_time_s": None,
                             "device": ""}]
    data = reg.export_bundle("b")
    assert b["params_sha256"] == api.sha256(data)
    with session(reg.engine) as s:
        row = s.scalars(select(Task).where(Task.name == "b")).one()
        assert row.params.size == len(data) and row.class_names == list(task.config.class_names)
        assert row.config == task.config.to_dict()
        ref = row.reference
        logits = report.tasks[1].logits
        assert (ref.shape, ref.dtype, ref.build) == (list(logits.shape), "float32", report.build)
        assert ref.logits == logits.numpy().tobytes() and ref.sha256 == api.sha256(ref.logits)
    assert reg.verification_history()[-1] == {**reg.verification_history()[-1], "trigger": "add:b", "ok": True,
                                              "results": {"a": "equal", "b": "new"}}
    event = reg.events()[-1]
    assert (event["kind"], event["task"], event["model"]) == ("add", "b", "default")
    assert event["detail"] == {"regime": "masked-memory", "mode": "concatenation", "source": "task 'b'",
                               "sha256": b["params_sha256"]}


def test_refused_imports_name_the_bundle_and_the_backbones(two, tmp_path):
    from continual_mem import MemoryViT, TaskStateError
    from helpers import make_backbone

    reg, net = two
    other = MemoryViT(make_backbone("tiny", seed=9))
    other.add_task("z", 3)
    path = tmp_path / "z.safetensors"
    from continual_mem import export_task_bytes

    path.write_bytes(export_task_bytes(other, "z"))
    theirs, ours = other.backbone_fingerprint()[:12], net.backbone_fingerprint()[:12]
    with pytest.raises(RegistryError, match=(f"^{path}: task 'z' was trained on backbone {theirs}…, model 'default' "
                                             f"uses {ours}…; import it into a model with that backbone$")):
        reg.import_bundle(path)
    truncated = tmp_path / "cut.safetensors"
    good = reg.export_bundle("a")
    truncated.write_bytes(good[: len(good) - 100])
    with pytest.raises(TaskStateError, match=f"^{truncated} is not a readable safetensors file"):
        reg.import_bundle(truncated)


def test_a_removal_that_breaks_another_task_is_rolled_back_with_its_report(two):
    from registry import VerificationFailed

    reg, net = two
    grow(reg, net, "c", 3)
    flip_param_byte(reg, "a")
    with pytest.raises(VerificationFailed) as err:
        reg.remove_task("b")
    assert str(err.value).startswith("removal of task 'b' rolled back: verification failed for a (corrupt")
    assert [(c.name, c.status) for c in err.value.report.tasks] == [("a", "corrupt"), ("c", "equal")]
    assert reg.task_names() == ["a", "b", "c"]


def test_a_removal_is_recorded_as_an_event_of_its_task(two):
    reg, net = two
    grow(reg, net, "ext", 3, mode="extension")
    with pytest.raises(RegistryError, match=r"^cannot remove 'b': extension tasks \['ext'\] attend to it; remove "
                                            r"them first$"):
        reg.remove_task("b")
    reg.remove_task("ext")
    reg.remove_task("b")
    event = reg.events()[-1]
    assert (event["kind"], event["model"], event["task"]) == ("remove", "default", "b")
    assert reg.verification_history()[-1]["trigger"] == "remove:b"


def test_a_task_stored_before_extension_tasks_existed_reads_as_reading_none(two):
    # rows written before configs had "sees" (no extension tasks then) must not block a removal
    reg, _ = two
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE tasks SET config = json_remove(config, '$.sees')"))
    reg.remove_task("b")
    assert reg.task_names() == ["a"]


def test_a_bundle_taken_or_without_a_backbone_is_refused_by_name(two):
    import json
    import struct

    reg, net = two
    bundle = reg.export_bundle("a")
    with pytest.raises(RegistryError, match="^model 'default' already has a task named 'a'; remove it or rename$"):
        reg.import_bundle(bundle)
    n = struct.unpack("<Q", bundle[:8])[0]
    header = json.loads(bundle[8:8 + n])
    del header["__metadata__"]["backbone_fingerprint"]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    ours = net.backbone_fingerprint()[:12]
    with pytest.raises(RegistryError, match=f"^bundle: task 'a' was trained on backbone \\?…, model 'default' uses "
                                            f"{ours}…; import it into a model with that backbone$"):
        reg.import_bundle(struct.pack("<Q", len(raw)) + raw + bundle[8 + n:])


def test_an_extension_bundle_from_other_token_tasks_is_refused_by_name(two):
    reg, net = two
    grow(reg, net, "ext", 3, mode="extension")
    bundle = reg.export_bundle("ext")
    reg.remove_task("ext")
    reg.remove_task("b")
    with pytest.raises(RegistryError, match=r"^extension task 'ext' was trained on top of tasks \['a', 'b'\], but "
                                            r"model 'default' has token tasks \['a'\]; retrain it on the current "
                                            r"model$"):
        reg.import_bundle(bundle)


def test_verification_in_worker_processes_reports_what_one_process_does(two):
    reg, net = two
    grow(reg, net, "c", 3)
    one, many = reg.verify(), reg.verify(workers=2)
    assert many.ok and many.build == one.build and many.trigger == "manual"
    assert [(c.name, c.status, c.max_abs_diff) for c in many.tasks] == \
        [(c.name, c.status, c.max_abs_diff) for c in one.tasks] == [("a", "equal", 0.0), ("b", "equal", 0.0),
                                                                    ("c", "equal", 0.0)]
    flip_param_byte(reg, "c")
    bad = reg.verify(tasks=["c", "a"], workers=3)  # in the model's order, as one process reports them
    assert [(c.name, c.status) for c in bad.tasks] == [("a", "equal"), ("c", "corrupt")] and not bad.ok
    with pytest.raises(RegistryError, match=r"workers must be >= 1, got 0"):
        reg.verify(workers=0)


def test_tasks_are_split_into_contiguous_parts_of_near_equal_size():
    from registry.parallel import parts

    assert parts(list("abcde"), 2) == [["a", "b", "c"], ["d", "e"]]
    assert parts(list("abc"), 3) == [["a"], ["b"], ["c"]]
    assert parts(["a"], 4) == [["a"]] and parts([], 3) == []
    with pytest.raises(ValueError, match="workers must be >= 1"):
        parts(["a"], 0)
