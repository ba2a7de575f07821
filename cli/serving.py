"""Deployment: ``serve`` (HTTP, every task in one pass, tasks added live) and ``export-onnx``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import JsonOpt, app, command, emit, out, pick_device, registry, state


@app.command()
@command
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    max_batch: Annotated[int, typer.Option(min=1, help="images per model pass at most")] = 64,
    max_wait_ms: Annotated[float, typer.Option(min=0.0, help="how long a batch waits to fill")] = 5.0,
    cuda_graphs: Annotated[bool, typer.Option(help="on CUDA, replay each pass as a CUDA graph per batch-size "
                                                   "bucket (powers of two)")] = True,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="larger request bodies get HTTP 413")] = 20.0,
    max_pixels: Annotated[int, typer.Option(min=1, help="larger images get HTTP 413")] = 40_000_000,
    poll_s: Annotated[float, typer.Option(min=0.0, help="how often to look for registry changes (0: never)")] = 1.0,
    amp: Annotated[bool, typer.Option(help="bf16 autocast on CUDA")] = True,
    decode_workers: Annotated[str, typer.Option(help="auto | threads | processes: where uploads are decoded "
                                                     "(auto: processes on CUDA)")] = "auto",
    jpeg_decode: Annotated[str, typer.Option(help="auto | device | host: where complete JPEG uploads are decoded "
                                                  "(device: inside the pass, nvJPEG on CUDA; auto: device on "
                                                  "CUDA)")] = "auto",
    overlap_passes: Annotated[str, typer.Option(help="auto | on | off: launch the next pass while the GPU runs "
                                                     "the current one (auto: on CUDA)")] = "auto",
    workers: Annotated[int, typer.Option(min=1, help="HTTP server processes sharing the port, each with its own "
                                                     "decoding pool")] = 1,
    shared_model: Annotated[bool, typer.Option(help="with --workers > 1: one model process batches every HTTP "
                                                    "process's images (--no-shared-model: a model per "
                                                    "process)")] = True,
    switch_interval_ms: Annotated[float, typer.Option(min=0.001, help="on CUDA, the interpreter's GIL switch "
                                                                 "interval while serving (Python's default: 5)")] = 0.2,
    resident_tasks: Annotated[int | None, typer.Option(min=1, help="fine-tuned late forks of one family held on "
                                                                   "the device at once, paged in by use (default: "
                                                                   "all)")] = None,
    page_forks: Annotated[bool, typer.Option(help="keep fine-tuned late forks' weights in pinned host memory, "
                                                  "paged in by use (requests without tasks= then route every "
                                                  "task)")] = False,
    decoder_sms: Annotated[int, typer.Option(min=0, help="SMs each pass leaves to nvJPEG, so the next batch's "
                                                       "decode need not wait behind it (same answers; not shown "
                                                       "to raise throughput yet)")] = 0,
    keep_alive_s: Annotated[float, typer.Option(min=1.0, help="how long an idle client connection stays open "
                                                           "(uvicorn's default of 5 s races with clients that "
                                                           "reuse pooled connections)")] = 75.0,
) -> None:
    """Serve every task over HTTP (POST /predict, GET /tasks /health /metrics); tasks that another process
    adds, imports or removes are picked up without a restart, and old tasks' answers do not change."""
    try:
        import uvicorn

        from serving import ServeSettings, create_app
    except ImportError as exc:
        raise ValueError(f"serving needs the serve extra ({exc}): pip install 'continual-mem[serve]'") from None
    registry()  # refuses a missing registry here, not inside the server's start-up
    settings = ServeSettings(registry=state.registry, model=state.model, device=pick_device(device),
                             max_batch=max_batch, max_wait_ms=max_wait_ms, cuda_graphs=cuda_graphs,
                             max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels,
                             poll_interval_s=poll_s, amp=amp, decode_workers=decode_workers, jpeg_decode=jpeg_decode,
                             overlap_passes=overlap_passes,
                             switch_interval_ms=switch_interval_ms, workers=workers, shared_model=shared_model,
                             resident_tasks=resident_tasks, page_forks=page_forks, decoder_sms=decoder_sms)
    if decoder_sms:  # an impossible request fails here in one line, not in the model process's start-up
        import torch

        from continual_mem.sm_partition import sm_count

        settings.held_sms(sm_count(torch.device(settings.device)))
    if workers == 1:  # the model in the server's own process
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info", timeout_keep_alive=keep_alive_s)
        return
    _serve_workers(settings, host=host, port=port, keep_alive_s=keep_alive_s)


def _serve_workers(settings, *, host: str, port: int, keep_alive_s: float) -> None:
    """uvicorn's worker processes, each building the app from the settings in the environment, in front of one
    model process (``settings.shared_model``) that they reach on a Unix socket; their metrics meet in a temporary
    folder (prometheus_client's multiprocess mode). Both go at exit, the model process with them."""
    import dataclasses
    import json
    import os
    import tempfile

    import uvicorn

    from serving.app import SETTINGS_ENV

    with tempfile.TemporaryDirectory(prefix="continual-mem-serve-") as shared:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = shared
        stop_model = None
        if settings.shared_model:
            settings = dataclasses.replace(settings, model_socket=os.path.join(shared, "model.sock"))
            stop_model = _start_model_process(settings)
        os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
        try:
            uvicorn.run("serving.app:create_app_from_env", factory=True, workers=settings.workers, host=host,
                        port=port, log_level="info", timeout_keep_alive=keep_alive_s)
        finally:
            if stop_model is not None:
                stop_model()


def _start_model_process(settings):
    """Start the shared model process and wait until it is ready (model loaded, graphs captured, socket
    listening); if it exits on its own, the server stops too (its HTTP processes could only answer 503). Returns
    the function that stops it, which raises if the model process had exited on its own."""
    import dataclasses
    import multiprocessing
    import os
    import signal
    import threading

    from serving.engine import run_model_process

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=run_model_process, args=(dataclasses.asdict(settings), settings.model_socket, ready),
                       name="continual-mem-model", daemon=True)
    proc.start()
    while not ready.wait(0.2):
        if not proc.is_alive():
            raise ValueError(f"the model process exited with code {proc.exitcode} before it was ready; its "
                             "error is above")

    stopping, died = threading.Event(), threading.Event()

    def stop_when_it_exits() -> None:
        proc.join()
        if not stopping.is_set():
            died.set()
            os.kill(os.getpid(), signal.SIGTERM)

    def stop() -> None:
        stopping.set()
        proc.terminate()
        proc.join(timeout=30)
        if died.is_set():
            raise ValueError(f"the model process exited with code {proc.exitcode} while serving, so the server "
                             "stopped; its error is above")

    threading.Thread(target=stop_when_it_exits, daemon=True).start()
    return stop


@app.command("export-onnx")
@command
def export_onnx(
    file: Annotated[Path, typer.Argument(help="the .onnx file to write (a .json sidecar goes beside it)")],
    tasks: Annotated[str, typer.Option(help="comma list of tasks [default: every task]")] = "",
    opset: Annotated[int, typer.Option(min=14)] = 17,
    dynamic_batch: Annotated[bool, typer.Option(help="let the batch size vary")] = True,
    check: Annotated[bool, typer.Option(help="compare onnxruntime with PyTorch on a probe batch")] = True,
    routed: Annotated[bool, typer.Option(help="a routed graph: inputs images and task (each image's index into "
                                              "the sidecar's tasks), one output logits; grouped tasks only")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export the shared pass (original head + every preserving task) as one ONNX graph with an output per
    task, or with --routed a graph where each image runs its own task only, plus a JSON sidecar (classes,
    preprocessing, backbone fingerprint)."""
    import torch

    from continual_mem.onnx_export import export_onnx as export, run_onnx

    reg = registry()
    net = reg.load(state.model)
    sidecar = export(net, file, tasks=[t for t in tasks.split(",") if t] or None, opset=opset,
                     dynamic_batch=dynamic_batch, extra_metadata={"model_version": reg.model_version(state.model)},
                     routed=routed)
    report = {"file": str(file), "sidecar": str(file.with_suffix(".json")), "outputs": sidecar["outputs"],
              "bytes": file.stat().st_size}
    if check:
        size = sidecar["preprocess"]["size"]
        x = torch.randn(2 if dynamic_batch else 1, 3, size, size, generator=torch.Generator().manual_seed(0))
        if routed:  # image b asks for task b (cycling through the list)
            task = torch.arange(len(x)) % len(sidecar["tasks"])
            got = run_onnx(file, x, task)["logits"]
            rows = net.forward_routed(x, [[sidecar["tasks"][i]["name"]] for i in task.tolist()])
            report["max_abs_diff"] = max(float((got[b, :len(v)] - v).abs().max()) for b, row in enumerate(rows)
                                         for v in row.values())
        else:
            ours = run_onnx(file, x)
            with torch.no_grad():
                ref = net(x, tasks=[t["name"] for t in sidecar["tasks"]], original="original" in sidecar["outputs"])
            report["max_abs_diff"] = max(float((ours[n] - ref[n]).abs().max()) for n in sidecar["outputs"])
        if report["max_abs_diff"] > 1e-3:
            raise ValueError(f"onnxruntime differs from PyTorch by {report['max_abs_diff']:.2e}; please report it")
    emit(report, as_json, lambda r: out.print(
        f"exported {', '.join(r['outputs'])} to {r['file']} ({r['bytes']:,} bytes; sidecar {r['sidecar']})"
        + (f"; onnxruntime vs PyTorch max |diff| {r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "")))
