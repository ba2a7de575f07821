"""Helpers for registry tests: a registered tiny model, DB snapshots, and a throwaway PostgreSQL server."""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from sqlalchemy import select, text

from continual_mem import MemoryViT
from helpers import make_backbone, perturb
from registry import Registry
from registry.schema import Base

TINY_KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)


def new_registry(location) -> tuple[Registry, MemoryViT]:
    bb = make_backbone("tiny")
    reg = Registry(location)
    reg.create_model(bb, timm_name="vit_tiny_patch16_224", model_kwargs=TINY_KWARGS)
    return reg, MemoryViT(bb)


def grow(reg: Registry, net: MemoryViT, name: str, seed: int, **kwargs):
    perturb(net.add_task(name, 3, **kwargs), seed=seed)
    return reg.add_task(net, name, metrics=[{"split": "test", "accuracy": 0.25 * seed}])


def two_task_registry(tmp_path: Path) -> tuple[Registry, MemoryViT]:
    """A registry in ``tmp_path`` with two masked-memory tasks: ``a`` and ``b`` (2 memory tokens)."""
    reg, net = new_registry(tmp_path / "r.db")
    grow(reg, net, "a", 1)
    grow(reg, net, "b", 2, memory=2)
    return reg, net


def snapshot(reg: Registry, *, skip=("events",)) -> dict[str, tuple[int, str]]:
    """Row count and a hash of every row, per table (events excluded: failures are appended there)."""
    out = {}
    with reg.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            if table.name in skip:
                continue
            rows = conn.execute(select(table).order_by(*table.primary_key.columns)).all()
            out[table.name] = (len(rows), hashlib.sha256(repr(rows).encode()).hexdigest())
    return out


def flip_param_byte(reg: Registry, task: str, offset: int = -5) -> None:
    with reg.engine.begin() as conn:
        tid, data = conn.execute(text(
            "SELECT t.id, p.data FROM tasks t JOIN task_params p ON p.task_id = t.id WHERE t.name = :n"),
            {"n": task}).one()
        data = bytearray(data)
        data[offset] ^= 0x10
        conn.execute(text("UPDATE task_params SET data = :d WHERE task_id = :i"), {"d": bytes(data), "i": tid})


def find_postgres_bin() -> Path | None:
    for cand in [shutil.which("pg_ctl"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)]:
        if cand and Path(cand).with_name("initdb").exists():
            return Path(cand).parent
    return None


class PostgresServer:
    """A throwaway PostgreSQL cluster on a Unix socket (no TCP), owned by the ``postgres`` user when run as root."""

    def __init__(self) -> None:
        self.bindir = find_postgres_bin()
        if self.bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb/pg_ctl); apt-get install postgresql")
        self.root = Path(tempfile.mkdtemp(prefix="cmpg"))
        self.data, self.sock = self.root / "data", self.root / "sock"
        self.sock.mkdir()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o",
                  f"-k {self.sock} -p 5499 -c listen_addresses=''", "start")
        self.url = f"postgresql+psycopg://postgres@/postgres?host={self.sock}&port=5499"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.prefix, str(self.bindir / tool), *args], check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def rewrite_task_params(reg: Registry, task: str, edit) -> None:
    """Change a stored task's parameters *consistently*: the bundle is re-exported from the edited task (its own
    tensor hash updated) and the blob's sha256 rewritten, so only the outputs can tell. ``edit(task_module)``
    changes the parameters in place."""
    from continual_mem.state import export_task_bytes

    net = reg.load()
    with torch.no_grad():
        edit(net.tasks[task])
    data = export_task_bytes(net, task)
    with reg.engine.begin() as conn:
        tid = conn.execute(text("SELECT id FROM tasks WHERE name = :n"), {"n": task}).scalar_one()
        conn.execute(text("UPDATE task_params SET data = :d, sha256 = :h, size = :s WHERE task_id = :i"),
                     {"d": data, "h": hashlib.sha256(data).hexdigest(), "s": len(data), "i": tid})
