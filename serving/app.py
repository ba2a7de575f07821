"""The FastAPI app: ``POST /predict``, ``GET /tasks``, ``GET /health``, ``GET /metrics``.

State lives on ``app.state`` and is made in the lifespan handler (load the model, start the batch worker and the
registry watcher), so tests build as many apps as they like; nothing happens at import.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import sys
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from scenarios.decode import BadImage, host_cores
from scenarios.gpu_jpeg import device_decodable

from .agnostic import AGNOSTIC
from .batcher import Answer
from .decoding import Decoders, check_header, use_processes
from .engine import LocalModel, ModelClient, ModelUnavailable, server_process_setup
from .metrics import Metrics
from .settings import ServeSettings



class Prediction(BaseModel):
    class_name: str = Field(serialization_alias="class")
    index: int
    prob: float


class TaskAnswer(BaseModel):
    top: list[Prediction]
    logits: list[float] | None = None


class AgnosticAnswer(BaseModel):
    """``?task_agnostic=true``: the one answer over every task's classes, and the task it came from."""

    task: str
    class_name: str = Field(serialization_alias="class")
    index: int


class ImageAnswer(BaseModel):
    image: str
    tasks: dict[str, TaskAnswer]
    task_agnostic: AgnosticAnswer | None = None


class PredictResponse(BaseModel):
    model_version: int
    results: list[ImageAnswer]


def top_probabilities(logits: np.ndarray, k: int) -> tuple[list[float], list[int]]:
    """The ``k`` largest softmax probabilities of one row of logits and their classes, largest first (NumPy on a
    row of a few hundred values: a torch call per task and image costs more than the arithmetic)."""
    z = np.exp(logits - logits.max(), dtype=np.float64)
    probs = z / z.sum()
    idx = np.argsort(-probs, kind="stable")[:k]
    return probs[idx].tolist(), idx.tolist()


async def _uploads(request: Request, limit: int) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every image in a multipart upload (any file field) or a JSON ``{"images": [base64]}``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPException(413, f"request body of {int(length):,} bytes; the limit is {limit:,}")
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if hasattr(v, "read")]
    elif kind.startswith("application/json"):
        body = await request.body()
        if len(body) > limit:
            raise HTTPException(413, f"request body of {len(body):,} bytes; the limit is {limit:,}")
        try:
            items = (await request.json())["images"]
            files = [(f"images[{i}]", base64.b64decode(b, validate=True)) for i, b in enumerate(items)]
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise HTTPException(400, 'JSON body must be {"images": ["<base64>", ...]}') from None
    else:
        raise HTTPException(415, "send multipart/form-data file uploads or JSON {\"images\": [base64, ...]}")
    if not files:
        raise HTTPException(400, "no image in the request")
    if sum(len(b) for _, b in files) > limit:
        raise HTTPException(413, f"uploads of {sum(len(b) for _, b in files):,} bytes; the limit is {limit:,}")
    return files


async def _decoded(state, name: str, data: bytes) -> np.ndarray | bytes:
    """One upload ready for the batch: a complete JPEG goes as bytes when the pass decodes on the device (only its
    header is read here), anything else is decoded by the host's decode workers (400 / 413 if it cannot be)."""
    settings: ServeSettings = state.settings
    if settings.device_decode and device_decodable(data):
        check_header(data, name=name, max_pixels=settings.max_pixels)
        return data
    return await state.decoders.decode(data, name=name, max_pixels=settings.max_pixels)


def _check_agnostic(current, wanted: list[str] | None) -> None:
    """A task-agnostic request answers over every task, each of which needs class statistics (HTTP 400 / 409)."""
    if wanted:
        raise HTTPException(400, "task_agnostic answers over every task's classes; drop tasks=")
    missing = [t["name"] for t in current.tasks if not t.get("class_stats")]
    if missing or not current.tasks:
        fix = f"run `continual-mem stats {missing[0]}`" if missing else "add a task first"
        raise HTTPException(409, f"task-agnostic answers need every task's class statistics; "
                                 f"{'tasks ' + str(missing[:5]) + ' have none' if missing else 'no task'}: {fix}")


def _agnostic_answer(answer: Answer) -> AgnosticAnswer:
    got = answer.logits.get(AGNOSTIC)
    if got is None:  # the model swapped to one without statistics while the request waited
        raise HTTPException(409, "task-agnostic answers are unavailable: a task has no class statistics; run "
                                 "`continual-mem stats TASK`")
    task = answer.served.tasks[int(got[0])]["name"]
    index = int(got[1])
    return AgnosticAnswer(task=task, class_name=answer.served.classes[task][index], index=index)


async def _answer(state, name: str, image: np.ndarray | bytes, tasks: tuple[str, ...] | None) -> Answer:
    try:
        return await state.model.submit(image, tasks)
    except BadImage as exc:
        raise HTTPException(400, f"{name}: cannot decode the image ({exc})") from None


class MeasureRequests:
    """Requests by endpoint and status, and their latency: a plain ASGI middleware (Starlette's
    ``BaseHTTPMiddleware`` streams every request body through extra tasks, ~0.1 ms per request)."""

    def __init__(self, app, *, state) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            metrics: Metrics = self.state.metrics
            metrics.requests.labels(scope["path"], str(status)).inc()
            metrics.latency.labels(scope["path"]).observe(time.perf_counter() - t0)


async def _watch_loop_lag(metrics: Metrics, period_s: float = 0.05) -> None:
    """How late the event loop wakes from a short sleep: the time a callback waits behind others or for the GIL."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(period_s)
        metrics.loop_lag_seconds.observe(max(0.0, loop.time() - t0 - period_s))


SETTINGS_ENV = "CONTINUAL_MEM_SERVE_SETTINGS"


def create_app_from_env() -> FastAPI:
    """The app of the settings in ``$CONTINUAL_MEM_SERVE_SETTINGS`` (JSON): what each ``serve --workers N`` process
    builds (uvicorn's worker processes import the app by name)."""
    return create_app(ServeSettings(**json.loads(os.environ[SETTINGS_ENV])))


def create_app(settings: ServeSettings) -> FastAPI:
    """A server of ``settings.model`` in ``settings.registry`` (see :class:`ServeSettings`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        metrics = Metrics(owns_model=not settings.model_socket)
        switch = sys.getswitchinterval()
        server_process_setup(settings)
        decoders = Decoders(processes=use_processes(settings.decode_workers, settings.device),
                            workers=max(1, host_cores() // settings.workers),
                            on_decoded=metrics.decode_seconds.observe)
        await decoders.start()
        model = ModelClient(settings.model_socket) if settings.model_socket else LocalModel(settings, metrics)
        await model.start()
        app.state.settings, app.state.metrics, app.state.model = settings, metrics, model
        app.state.decoders = decoders
        if isinstance(model, LocalModel):
            app.state.holder, app.state.batcher = model.holder, model.batcher
        lag = asyncio.create_task(_watch_loop_lag(metrics))
        try:
            yield
        finally:
            lag.cancel()
            await model.stop()
            decoders.shutdown()
            sys.setswitchinterval(switch)

    app = FastAPI(title="continual-mem", lifespan=lifespan)
    app.add_middleware(MeasureRequests, state=app.state)

    @app.exception_handler(HTTPException)
    async def one_line(request: Request, exc: HTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(ModelUnavailable)
    async def no_model(request: Request, exc: ModelUnavailable):
        return JSONResponse({"detail": f"{exc}; restart the server"}, status_code=503)

    @app.post("/predict", response_model=PredictResponse, response_model_by_alias=True)
    async def predict(request: Request, tasks: str = "", top_k: int | None = None,
                      logits: bool = False, task_agnostic: bool = False) -> PredictResponse:
        st: ServeSettings = request.app.state.settings
        wanted = [t for t in tasks.split(",") if t] if tasks else None
        known = request.app.state.model.current.classes
        if task_agnostic:
            _check_agnostic(request.app.state.model.current, wanted)
        unknown = [t for t in wanted or [] if t not in known]
        if unknown:
            raise HTTPException(404, f"unknown task {unknown[0]!r}; known tasks: {', '.join(known) or 'none'}")
        k = top_k or st.top_k
        if k < 1:
            raise HTTPException(400, "top_k must be >= 1")
        files = await _uploads(request, st.max_upload_bytes)
        # every upload is read before any is queued: a request refused for one bad file costs no pass
        images = await asyncio.gather(*(_decoded(request.app.state, name, data) for name, data in files))
        asked = tuple(dict.fromkeys(wanted)) if wanted else None  # a routed pass computes only these
        if task_agnostic:
            asked = (AGNOSTIC,)
        answers = await asyncio.gather(*(_answer(request.app.state, name, image, asked)
                                         for (name, _), image in zip(files, images)))
        results, version = [], answers[0].version
        for (name, _), answer in zip(files, answers):
            classes = answer.served.classes
            if task_agnostic:
                results.append(ImageAnswer(image=name, tasks={}, task_agnostic=_agnostic_answer(answer)))
                version = max(version, answer.version)
                continue
            per_task = {}
            for task in wanted or list(answer.logits):
                if task not in answer.logits:  # removed while this request waited
                    raise HTTPException(404, f"task {task!r} was removed; known tasks: {', '.join(classes)}")
                row = answer.logits[task]
                p, idx = top_probabilities(row, k)
                per_task[task] = TaskAnswer(
                    top=[Prediction(class_name=classes[task][j], index=j, prob=q) for q, j in zip(p, idx)],
                    logits=row.tolist() if logits else None)
                request.app.state.metrics.images.labels(task).inc()
            results.append(ImageAnswer(image=name, tasks=per_task))
            version = max(version, answer.version)
        return PredictResponse(model_version=version, results=results)

    @app.get("/tasks")
    async def list_tasks(request: Request) -> dict:
        current = request.app.state.model.current
        return {"model_version": current.version, "tasks": current.tasks}

    @app.get("/health")
    async def health(request: Request) -> dict:
        return {"status": "ok", **await request.app.state.model.status()}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.text(), media_type="text/plain; version=0.0.4")

    return app
