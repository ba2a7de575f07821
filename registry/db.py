"""Engines and transactions: SQLite by default (WAL, busy timeout, foreign keys, immediate write locks), any
SQLAlchemy URL accepted."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, select
from sqlalchemy.orm import Session

from .errors import RegistryError
from .schema import SCHEMA_VERSION, Base, Meta

BUSY_TIMEOUT_MS = 120_000


def to_url(location: str | Path) -> str:
    """A SQLAlchemy URL from a URL or a plain file path."""
    text = str(location)
    return text if "://" in text else f"sqlite:///{Path(text).expanduser().resolve()}"


def _sqlite_setup(engine: Engine, *, read_only: bool) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        # Take the write lock up front: two writers queue on the busy timeout instead of one failing with
        # "database is locked" when it upgrades a read transaction. Readers (WAL) run beside a writer.
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def open_engine(location: str | Path, *, read_only: bool = False) -> Engine:
    """Open (and create if needed) a registry database; checks the schema version. ``read_only``: an existing
    registry, for readers beside a writer (verification workers); its transactions must not write."""
    url = to_url(location)
    if url.startswith("sqlite:///") and not read_only:
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine, read_only=read_only)
    with session(engine) as s:
        fresh = not inspect(s.connection()).has_table("meta")
        if read_only and fresh:
            raise RegistryError(f"no registry at {url}")
        if fresh:
            Base.metadata.create_all(s.connection())
            s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            s.add(Meta(key="verify_threads", value=str(min(2, os.cpu_count() or 1))))
        else:
            version = s.scalar(select(Meta.value).where(Meta.key == "schema_version"))
            if version == "1" and not read_only:  # version 2 only adds a table: create it, touch nothing else
                Base.metadata.create_all(s.connection())
                s.merge(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                version = str(SCHEMA_VERSION)
            if version != str(SCHEMA_VERSION):
                raise RegistryError(
                    f"registry {url} has schema version {version}, this continual-mem expects {SCHEMA_VERSION}; "
                    "open it with the matching continual-mem version or migrate it"
                )
    return engine


@contextmanager
def session(engine: Engine) -> Iterator[Session]:
    """One transaction: committed on success, rolled back on any exception."""
    with Session(engine, expire_on_commit=False) as s, s.begin():
        yield s
