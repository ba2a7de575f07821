"""Class statistics in the registry: written once, with the task or later; read in task order; refused when missing,
duplicated or for another task; checked by verify; a version-1 registry gains the table and keeps everything."""
import pytest
import torch
from sqlalchemy import text

from continual_mem.class_stats import collect
from registry import Registry, RegistryError
from registry_helpers import new_registry, snapshot

from helpers import perturb


def stats_for(name: str, classes: int, seed: int, dim: int = 48):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(classes * 20, dim, generator=g)
    return collect(name, [(h, torch.arange(classes).repeat_interleave(20))], classes)


def add(reg: Registry, net, name: str, seed: int, *, with_stats: bool = True):
    perturb(net.add_task(name, 3), seed=seed)
    return reg.add_task(net, name, class_stats=stats_for(name, 3, seed) if with_stats else None)


@pytest.fixture
def reg_net(tmp_path):
    reg, net = new_registry(tmp_path / "r.db")
    add(reg, net, "a", 1)
    add(reg, net, "b", 2, with_stats=False)
    return reg, net


def test_stored_with_the_task_and_read_back_in_order(reg_net):
    reg, net = reg_net
    add(reg, net, "c", 3)
    got = reg.class_stats(["c", "a"])
    assert [s.task for s in got] == ["a", "c"]
    assert got[0].to_bytes() == stats_for("a", 3, 1).to_bytes()
    assert {t["name"]: t["class_stats"] for t in reg.tasks()} == {"a": True, "b": False, "c": True}


def test_a_task_without_statistics_is_a_one_line_error_naming_the_fix(reg_net):
    reg, _ = reg_net
    with pytest.raises(RegistryError) as exc:
        reg.class_stats()
    msg = str(exc.value)
    assert "['b']" in msg and "continual-mem stats b" in msg and "\n" not in msg


def test_written_once_later_and_never_again(reg_net):
    reg, _ = reg_net
    with pytest.raises(RegistryError, match="task 'x' with 3 classes do not fit task 'b'"):
        reg.set_class_stats("b", stats_for("x", 3, 8))
    with pytest.raises(RegistryError, match="2 classes do not fit task 'b' \\(3 classes\\)"):
        reg.set_class_stats("b", stats_for("b", 2, 8))
    version = reg.model_version()
    reg.set_class_stats("b", stats_for("b", 3, 7))
    assert reg.model_version() > version  # a server re-reads them
    assert [s.task for s in reg.class_stats()] == ["a", "b"]
    before = snapshot(reg)
    with pytest.raises(RegistryError, match="already has class statistics; they are written once"):
        reg.set_class_stats("b", stats_for("b", 3, 8))
    with pytest.raises(RegistryError, match="no task 'zz'"):
        reg.set_class_stats("zz", stats_for("zz", 3, 8))
    assert snapshot(reg) == before


def test_statistics_that_do_not_fit_roll_the_whole_add_back(reg_net):
    reg, net = reg_net
    before = snapshot(reg)
    perturb(net.add_task("c", 3), seed=4)
    with pytest.raises(RegistryError, match="2 classes do not fit task 'c' \\(3 classes\\)"):
        reg.add_task(net, "c", class_stats=stats_for("c", 2, 4))
    assert snapshot(reg) == before and "c" not in reg.task_names()


def test_adding_tasks_leaves_old_statistics_bytes_as_they_were(reg_net):
    reg, net = reg_net
    with reg.engine.connect() as conn:
        before = conn.execute(text("SELECT task_id, data, sha256 FROM task_stats ORDER BY task_id")).all()
    add(reg, net, "c", 3)
    reg.remove_task("c")
    with reg.engine.connect() as conn:
        after = conn.execute(text("SELECT task_id, data, sha256 FROM task_stats ORDER BY task_id")).all()
    assert after == before


def test_verify_reports_corrupt_statistics(reg_net):
    reg, _ = reg_net
    assert reg.verify().ok
    with reg.engine.begin() as conn:
        data = bytearray(conn.execute(text("SELECT data FROM task_stats")).scalar_one())
        data[-3] ^= 0x01
        conn.execute(text("UPDATE task_stats SET data = :d"), {"d": bytes(data)})
    report = reg.verify()
    status = {c.name: (c.status, c.detail) for c in report.tasks}
    assert not report.ok
    assert status["a"] == ("corrupt", "stored class statistics do not match their sha256")
    assert status["b"][0] == "equal"
    with pytest.raises(RegistryError, match="'a'.s stored class statistics are corrupted"):
        reg.class_stats(["a"])


def test_a_version_1_registry_gains_the_table_and_keeps_its_tasks(tmp_path):
    reg, net = new_registry(tmp_path / "r.db")
    add(reg, net, "a", 1, with_stats=False)
    with reg.engine.begin() as conn:
        conn.execute(text("DROP TABLE task_stats"))
        conn.execute(text("UPDATE meta SET value='1' WHERE key='schema_version'"))
    reg.engine.dispose()
    again = Registry(tmp_path / "r.db")
    assert again.task_names() == ["a"] and again.verify().ok
    again.set_class_stats("a", stats_for("a", 3, 1))
    assert [s.task for s in again.class_stats()] == ["a"]
    with again.engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM meta WHERE key='schema_version'")).scalar_one() == "2"


def test_an_import_brings_its_statistics_in_the_same_change(reg_net, tmp_path):
    reg, _ = reg_net
    bundle = reg.export_bundle("a")
    other, _ = new_registry(tmp_path / "other.db")
    before = snapshot(other)
    with pytest.raises(RegistryError, match="do not fit task 'a'"):
        other.import_bundles([bundle], class_stats=[stats_for("a", 2, 1)])
    assert snapshot(other) == before  # neither the task nor its statistics
    other.import_bundles([bundle], class_stats=reg.class_stats(["a"]))
    assert other.class_stats()[0].to_bytes() == reg.class_stats(["a"])[0].to_bytes()
