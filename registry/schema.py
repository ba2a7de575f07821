"""Registry schema (SQLAlchemy 2.x typed ORM). Bump SCHEMA_VERSION with a migration when a table changes."""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    DDL,
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, deferred, mapped_column, relationship

SCHEMA_VERSION = 2  # 2: task_stats (created on open of a version-1 registry; nothing else changed)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Meta(Base):
    """Key/value facts about the registry itself (schema version, verification threads)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Backbone(Base):
    __tablename__ = "backbones"
    id: Mapped[int] = mapped_column(primary_key=True)
    timm_name: Mapped[str] = mapped_column(String(200))
    model_kwargs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    weights_source: Mapped[str] = mapped_column(String(1000))  # "embedded", "pretrained", "file:PATH"
    weights: Mapped[bytes | None] = deferred(mapped_column(LargeBinary, nullable=True))  # safetensors, if embedded
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    image_size: Mapped[int] = mapped_column(Integer)
    timm_version: Mapped[str] = mapped_column(String(40))
    torch_version: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Model(Base):
    """A growing model: one backbone, its probe batch and its tasks in order."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    backbone_id: Mapped[int] = mapped_column(ForeignKey("backbones.id", ondelete="RESTRICT"))
    group_size: Mapped[int] = mapped_column(Integer, default=4)  # MemoryViT(group_size=...): part of the bits
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    backbone: Mapped[Backbone] = relationship()
    tasks: Mapped[list["Task"]] = relationship(back_populates="model", order_by="Task.position",
                                               cascade="all, delete-orphan", passive_deletes=True)


class Probe(Base):
    """The fixed input every task's reference logits are computed on."""

    __tablename__ = "probes"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), unique=True)
    recipe: Mapped[dict[str, Any]] = mapped_column()
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors {"images": (N, 3, H, W) float32}
    sha256: Mapped[str] = mapped_column(String(64))


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("model_id", "name"), UniqueConstraint("model_id", "position"))
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)
    dataset: Mapped[str] = mapped_column(String(200), default="")
    mode: Mapped[str] = mapped_column(String(20))
    regime: Mapped[str] = mapped_column(String(20))
    memory: Mapped[int] = mapped_column(Integer)
    layers: Mapped[list[Any]] = mapped_column()
    num_classes: Mapped[int] = mapped_column(Integer)
    class_names: Mapped[list[Any]] = mapped_column(default=list)
    config: Mapped[dict[str, Any]] = mapped_column()
    param_count: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="active")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    model: Mapped[Model] = relationship(back_populates="tasks")
    params: Mapped["TaskParams"] = relationship(cascade="all, delete-orphan", passive_deletes=True)
    reference: Mapped["Reference"] = relationship(cascade="all, delete-orphan", passive_deletes=True)
    metrics: Mapped[list["Metric"]] = relationship(cascade="all, delete-orphan", passive_deletes=True)
    stats: Mapped["TaskStats | None"] = relationship(cascade="all, delete-orphan", passive_deletes=True)


class TaskParams(Base):
    """The task bundle (safetensors: tensors + config + backbone fingerprint), stored in the database itself so
    the task row and its parameters commit or roll back together: no orphan files, ever."""

    __tablename__ = "task_params"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[bytes] = deferred(mapped_column(LargeBinary))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)


class TaskStats(Base):
    """A task's class statistics (``continual_mem.class_stats``; safetensors), written once with the task or later
    by ``continual-mem stats``, never changed: task-agnostic prediction reads them."""

    __tablename__ = "task_stats"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[bytes] = deferred(mapped_column(LargeBinary))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Reference(Base):
    """A task's logits on the probe when it was registered, and the build they were computed on."""

    __tablename__ = "references"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    logits: Mapped[bytes] = mapped_column(LargeBinary)  # raw tensor bytes (C order)
    sha256: Mapped[str] = mapped_column(String(64))
    shape: Mapped[list[Any]] = mapped_column()
    dtype: Mapped[str] = mapped_column(String(20))
    build: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VerificationRun(Base):
    __tablename__ = "verification_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    trigger: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    ok: Mapped[bool] = mapped_column(Boolean)
    build: Mapped[dict[str, Any]] = mapped_column()
    results: Mapped[list["VerificationResult"]] = relationship(cascade="all, delete-orphan", passive_deletes=True)


class VerificationResult(Base):
    __tablename__ = "verification_results"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("verification_runs.id", ondelete="CASCADE"))
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id", ondelete="SET NULL"), nullable=True)
    task_name: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20))  # equal | mismatch | corrupt | blocked | not-comparable | new
    max_abs_diff: Mapped[float | None] = mapped_column(Float, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")


class Metric(Base):
    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    split: Mapped[str] = mapped_column(String(40))
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    wall_time_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    device: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Event(Base):
    """Append-only log (add, import, remove, verify, failure); database triggers refuse UPDATE and DELETE."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(20))
    model_name: Mapped[str] = mapped_column(String(64))
    task_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


for _op in ("UPDATE", "DELETE"):
    event.listen(Event.__table__, "after_create", DDL(
        f"CREATE TRIGGER events_no_{_op.lower()} BEFORE {_op} ON events "
        "BEGIN SELECT RAISE(ABORT, 'events are append-only'); END").execute_if(dialect="sqlite"))
event.listen(Event.__table__, "after_create", DDL(
    "CREATE OR REPLACE FUNCTION events_append_only() RETURNS trigger AS $$ BEGIN "
    "RAISE EXCEPTION 'events are append-only'; END $$ LANGUAGE plpgsql").execute_if(dialect="postgresql"))
event.listen(Event.__table__, "after_create", DDL(
    "CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events "
    "FOR EACH ROW EXECUTE FUNCTION events_append_only()").execute_if(dialect="postgresql"))
