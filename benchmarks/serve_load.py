"""Load test of `continual-mem serve` on loopback: a bounded number of requests from N concurrent clients, the
served throughput against the offline single pass of the same model, latency percentiles, errors, and a task added
by another process in the middle of the load while a probe image checks that old tasks' answers never change.

For each K it builds a registry (random-weight backbone, K masked-memory tasks), measures the offline pass
(eval's preprocessing + one forward for every task, batches of --max-batch), starts the server as a subprocess on
127.0.0.1, sends the load, and stops everything by itself.

    python benchmarks/serve_load.py --device cpu --model vit_tiny_patch16_224 --img-size 64 --tasks 1 \\
        --requests 200 --clients 8                                   # a quick CPU check
    python benchmarks/serve_load.py --device cuda --tasks 1,10 --requests 2000 --clients 64
"""
from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from load_clients import client_in_worker, free_port, init_sent, shares, start_client, tree_cpu_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def build_model(args, k: int):
    """The served model: a random-weight ``args.model`` backbone (seed 0) and ``k`` tasks of 100 classes with
    non-trivial parameters (masked memory, fine-tuned forks of the last ``args.fork_layers`` blocks, or linear heads
    with ``args.head_tasks``); K = 0: one linear head, the served baseline (the server answers tasks only)."""
    import timm

    from continual_mem import MemoryViT

    torch.manual_seed(0)
    net = MemoryViT(timm.create_model(args.model, img_size=args.img_size, num_classes=0).eval())
    for i in range(k):
        _new_task(net, f"task{i}", seed=i, memory=args.memory, fork_layers=args.fork_layers, head=args.head_tasks)
    if not k:
        net.add_task("task0", 100, regime="head")
    return net


def build_registry(path: Path, args, k: int) -> None:
    """A registry holding :func:`build_model`'s model."""
    from continual_mem import export_task_bytes
    from registry import Registry

    net = build_model(args, k)
    reg = Registry(path)
    reg.create_model(net.backbone, timm_name=args.model, model_kwargs={"img_size": args.img_size, "num_classes": 0})
    reg.import_bundles([export_task_bytes(net, n) for n in net.task_names])  # one change, one verification


def _new_task(net, name: str, *, seed: int, memory: int, fork_layers: int = 0, head: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    if head:
        task = net.add_task(name, 100, regime="head")
    else:
        fork = dict(fork_layers=fork_layers, fork_finetune=True) if fork_layers else {}
        task = net.add_task(name, 100, memory=memory, **fork)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def add_task(reg, net, name: str, *, seed: int, memory: int, fork_layers: int = 0, head: bool = False) -> None:
    _new_task(net, name, seed=seed, memory=memory, fork_layers=fork_layers, head=head)
    reg.add_task(net, name)


def _copy_sqlite(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite registry (SQLite's backup API: the registry runs in WAL mode, so the main
    file alone can miss committed pages)."""
    import sqlite3

    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        b.close()
        a.close()


def offline_rate(reg_path: Path, args, batch: np.ndarray, *, backbone_only: bool = False) -> float:
    """Images/s of the served computation without HTTP: eval's device preprocessing + one pass for every task (with
    ``--route``, a routed pass where each image names one random task; ``backbone_only``: the backbone alone)."""
    from registry import Registry
    from scenarios.pipeline import Preprocess
    from scenarios.streaming import DeviceStage

    device = torch.device(args.device)
    net = Registry(reg_path).load().to(device).eval()
    stage = DeviceStage(Preprocess.for_backbone(net.backbone, "inception"), device)
    canvas = torch.from_numpy(np.repeat(batch[None], args.max_batch, axis=0))
    if device.type == "cuda":
        canvas = canvas.pin_memory()
    hw = torch.tensor([batch.shape[:2]] * args.max_batch)
    labels = torch.zeros(args.max_batch, dtype=torch.int64)

    rng = np.random.default_rng(0)

    def step():
        x, _ = stage(canvas, hw, labels, train=False)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if backbone_only:
                out = net(x, [], original=True)
            elif args.route:  # each image one random task, as the load's requests
                rows = net.forward_routed(x, [[f"task{rng.integers(len(net.tasks))}"] for _ in range(len(x))])
                out = {"all": torch.cat([t for row in rows for t in row.values()])}
            else:
                out = net(x, original=False)
        return {k: v.float().cpu() for k, v in out.items()}  # the server hands results to the host too

    return args.max_batch / common.median_seconds(step, args)


async def load(url: str, args, image: bytes, probe: bytes, reg_path: Path, k: int, server_pid: int,
               on_load=None) -> dict:
    """``args.requests`` requests from ``args.clients`` connections spread over ``args.client_procs`` processes; a
    probe every 20 ms and the live add (from a quarter of the requests) from this process."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from registry import Registry

    old = [f"task{i}" for i in range(max(k, 1))]  # K = 0 serves one head, task0
    if args.route:  # the probe asks for 8 of them, spread out (asking all of K = 1,000 in every probe is not a load)
        old = old[::max(1, k // 8)]
    probes: list[dict] = []
    stop = asyncio.Event()
    procs = max(1, min(args.client_procs, args.clients))
    ctx = mp.get_context("spawn")
    sent = ctx.Array("l", [0, int(args.live_add)])  # requests sent; hold the load until the add is served

    def send_probe(c: httpx.AsyncClient):
        return c.post(f"{url}/predict", params={"tasks": ",".join(old), "logits": "true"} if old else {"logits": "true"},
                      files=[("files", ("probe.jpg", probe, "image/jpeg"))])

    async def prober(c: httpx.AsyncClient, hold_limit_s: float = 300.0):
        t0 = time.perf_counter()
        while not stop.is_set():
            r = await send_probe(c)
            if r.status_code == 200:
                probes.append(r.json())
                # the load goes on until the added task answers (it must land during the load, not after it)
                served = added and probes[-1]["model_version"] >= added["version"]
                if sent[1] and (served or time.perf_counter() - t0 > hold_limit_s):
                    with sent.get_lock():
                        sent[1] = 0
            await asyncio.sleep(0.02)

    added: dict = {}

    async def live_add():
        while sent[0] < args.requests // 4:  # early: storing and verifying the task takes seconds
            await asyncio.sleep(0.005)
        # the adder stands for a trainer on another machine: its CPU verification passes get a few cores, not
        # every core of the host the server and the clients run on
        torch.set_num_threads(args.adder_threads)
        # another "process" changes the registry: the server must pick it up between batches
        try:
            reg = Registry(reg_path)
            net = await asyncio.to_thread(reg.load)
            await asyncio.to_thread(add_task, reg, net, f"task{max(k, 1)}", seed=1000, memory=args.memory,
                                    fork_layers=args.fork_layers, head=args.head_tasks)
        except BaseException:
            with sent.get_lock():  # the load must not wait for an add that will not come
                sent[1] = 0
            raise
        added.update(version=reg.model_version(), at=time.perf_counter())

    async def every_worker_swapped(c: httpx.AsyncClient, timeout: float = 120.0) -> float:
        """Seconds until /tasks answers with the new task 16 times in a row (each worker process answers some)."""
        t0, streak = time.perf_counter(), 0
        while streak < 16 and time.perf_counter() - t0 < timeout:
            tasks = (await c.get(f"{url}/tasks")).json()["tasks"]
            streak = streak + 1 if len(tasks) == max(k, 1) + 1 else 0
            await asyncio.sleep(0.01)
        if streak < 16:
            raise RuntimeError(f"the server did not pick up the added task within {timeout:.0f} s")
        return time.perf_counter() - added["at"]

    async with httpx.AsyncClient(timeout=120) as c:
        alone_before = (await send_probe(c)).json()
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(procs, mp_context=ctx, initializer=init_sent, initargs=(sent,)) as pool:
            await asyncio.gather(*(loop.run_in_executor(pool, start_client) for _ in range(procs)))  # started, warm
            probe_task = asyncio.create_task(prober(c))
            adder = asyncio.create_task(live_add()) if args.live_add else None
            t0, server_cpu0 = time.perf_counter(), tree_cpu_seconds(server_pid)
            clients = asyncio.gather(*(
                loop.run_in_executor(pool, client_in_worker, url, args.requests, n, args.images_per_request, image,
                                     max(k, 1) if args.route else 0)
                for n in shares(args.clients, procs)))
            if on_load is not None:  # once the load runs (the first second of a run profiled only idle workers)
                await asyncio.sleep(0.5)
                on_load()
            parts = await clients
            wall, server_cpu = time.perf_counter() - t0, tree_cpu_seconds(server_pid) - server_cpu0
        stop.set()
        await probe_task
        swapped_after = None
        if adder is not None:
            await adder
            swapped_after = await every_worker_swapped(c)  # the bit check below must see the new model
        health = (await c.get(f"{url}/health")).json()
        text = (await c.get(f"{url}/metrics")).text
        metrics = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                   if line.startswith("continual_mem_") and " " in line and "{" not in line}
        routed = {s.labels.get("path"): s.value for family in text_string_to_metric_families(text)
                  if family.name == "continual_mem_routed_passes" for s in family.samples if s.name.endswith("_total")}
        alone_after = (await send_probe(c)).json()
    # the load's own span, from the first client's first request to the last one's answer (the processes'
    # start-up is not the server's time); clients_waiting: the share of that span the connections spent waiting
    # for an answer (1.0: the server is the limit; lower: the load generator left it idle)
    outer, wall = wall, max(p["last"] for p in parts) - min(p["first"] for p in parts)
    latencies = [v for p in parts for v in p["latencies"]]
    errors = [e for p in parts for e in p["errors"]]
    versions = {v for p in parts for v in p["versions"]}
    first = {t: a["top"][0]["index"] for t, a in alone_before["results"][0]["tasks"].items()}
    changed = sum(1 for p in probes for t, a in p["results"][0]["tasks"].items() if a["top"][0]["index"] != first[t])
    # where answers moved: per model version, the probes whose logits differ from the first probe's, and by how much
    def logits(answer) -> np.ndarray:  # a non-finite logit comes back as JSON null: NaN here, and counted
        return np.asarray([np.nan if v is None else v for v in answer["logits"]], dtype=np.float64)

    ref = {t: logits(a) for t, a in alone_before["results"][0]["tasks"].items()}
    moved: dict[int, list] = {}
    non_finite: dict[int, list] = {}  # per model version: (probe number, task) of answers with a non-finite logit
    for i, p in enumerate(probes):
        d = []
        for t, a in p["results"][0]["tasks"].items():
            got = logits(a)
            if not np.isfinite(got).all():
                non_finite.setdefault(p["model_version"], []).append((i, t))
            d.append(float(np.nanmax(np.abs(got - ref[t]))) if np.isfinite(got).any() else float("inf"))
        moved.setdefault(p["model_version"], []).append(max(d, default=0.0))
    moved_summary = {str(v): {"probes": len(d), "differing": sum(x > 0 for x in d), "max_abs": max(d),
                              "non_finite": non_finite.get(v, [])[:20]}
                     for v, d in sorted(moved.items())}
    after_diff = max((float(np.nanmax(np.abs(logits(alone_after["results"][0]["tasks"][t]) - ref[t])))
                      for t in old), default=0.0)
    bits = all(alone_after["results"][0]["tasks"][t]["logits"] == alone_before["results"][0]["tasks"][t]["logits"]
               for t in old)
    lat = sorted(latencies)

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3

    return {"requests": len(latencies), "images": len(latencies) * args.images_per_request, "wall_s": wall,
            "wall_with_client_start_s": outer, "clients_waiting": sum(latencies) / (args.clients * wall),
            "images_per_s": len(latencies) * args.images_per_request / wall, "requests_per_s": len(latencies) / wall,
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "mean_ms": statistics.mean(lat) * 1e3,
            "errors": len(errors), "first_errors": errors[:3], "versions_seen": sorted(versions),
            # whether clients got answers from the model with the added task while the load ran, and how long
            # after the registry write every worker served it
            "add_landed_during_load": bool(added) and added["version"] in versions,
            "all_workers_swapped_s_after_add": swapped_after,
            "swaps": health["swaps"], "passes": health["passes"], "probes": len(probes),
            # routed passes that ran eagerly instead of replaying a graph (serving.metrics: routed_passes)
            "routed_passes_eager": routed.get("eager", 0.0), "routed_passes_graph": routed.get("graph", 0.0),
            # where a pass's time goes (see serving.metrics): wall, its thread's share, the GPU's share; decoding
            # per upload; how late the event loop's timers fire
            **{f"mean_{key}_ms": _mean_ms(metrics, f"continual_mem_{name}_seconds") for key, name in (
                ("pass", "pass"), ("pass_thread", "pass_thread"), ("pass_device", "pass_device"),
                ("decode", "decode"), ("loop_lag", "event_loop_lag"))},
            # who uses the host's cores: the server (all its processes) and the load generator, per request
            "server_cpu_ms_per_request": 1e3 * server_cpu / max(1, len(latencies)),
            "client_cpu_ms_per_request": 1e3 * sum(p["cpu_s"] for p in parts) / max(1, len(latencies)),
            "server_cores_busy": server_cpu / wall,
            "probe_top1_changes": changed, "probe_alone_bit_identical_after_add": bits,
            "probe_logits_moved_by_version": moved_summary, "probe_alone_after_add_max_abs_diff": after_diff}


def _profile(pid: int, out: Path) -> subprocess.Popen:
    """py-spy sampling every process of the server (HTTP and model processes) for the first seconds of the load,
    as collapsed stacks (one line per stack and its sample count, idle stacks included)."""
    import shutil

    if shutil.which("py-spy") is None:
        raise SystemExit("--profile-server needs py-spy: pip install py-spy")
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--idle",
                             "--format", "raw", "--duration", "2", "--rate", "200", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def _mean_ms(metrics: dict[str, float], histogram: str) -> float:
    return 1e3 * metrics.get(f"{histogram}_sum", 0.0) / max(1.0, metrics.get(f"{histogram}_count", 0.0))


def main(argv: list[str] | None = None) -> dict:
    from scenarios.synthetic import photo

    p = common.base_parser(__doc__.splitlines()[0])
    p.set_defaults(model="vit_small_patch14_dinov2")
    p.add_argument("--tasks", default="1,10", help="comma list of K (tasks in the model)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--upload-size", default="500x375", help="uploaded JPEG size, WxH")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--no-live-add", dest="live_add", action="store_false")
    p.add_argument("--adder-threads", type=int, default=4, help="CPU threads of the process that adds the task")
    p.add_argument("--decode-workers", default="auto", choices=["auto", "threads", "processes"],
                   help="the server's --decode-workers")
    p.add_argument("--jpeg-decode", default="auto", choices=["auto", "device", "host"],
                   help="the server's --jpeg-decode (auto: nvJPEG inside the pass on CUDA)")
    p.add_argument("--switch-interval-ms", type=float, default=0.2, help="the server's --switch-interval-ms")
    p.add_argument("--workers", type=int, default=1, help="the server's --workers (processes sharing the port)")
    p.add_argument("--registry-cache", type=Path, default=None,
                   help="keep each K's built registry here and reuse it (building K verified tasks takes a while)")
    p.add_argument("--profile-server", type=Path, default=None,
                   help="folder for py-spy profiles of the server's processes during the load (collapsed stacks)")
    p.add_argument("--overlap-passes", default="auto", choices=["auto", "on", "off"],
                   help="the server's --overlap-passes")
    p.add_argument("--no-shared-model", dest="shared_model", action="store_false",
                   help="with --workers > 1, a model per server process (the server's --no-shared-model)")
    p.add_argument("--fork-layers", type=int, default=0,
                   help="tasks are fine-tuned late forks of this many blocks (0: masked memory)")
    p.add_argument("--head-tasks", action="store_true",
                   help="tasks are linear heads (regime head) instead of masked memory or forks")
    p.add_argument("--server-args", default="", help="more `serve` options, e.g. '--page-forks --resident-tasks 8'")
    p.add_argument("--route", action="store_true",
                   help="each request names one random task (?tasks=taskN): routed passes; the offline rate is the "
                        "routed pass too, and the backbone alone is measured beside it")
    p.add_argument("--client-procs", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 4)),
                   help="load-generator processes sharing --clients (each one core's worth of aiohttp)")
    args = common.resolve(p.parse_args(argv))
    args.img_size = args.img_size or 224
    w, h = (int(v) for v in args.upload_size.split("x"))
    image, probe = photo(1, label=3, size=(w, h)), photo(2, label=5, size=(w, h))
    from scenarios.decode import MAX_ASPECT, SHORT_SIDE, decode_shrunk

    decoded = decode_shrunk(image, short_side=SHORT_SIDE, max_aspect=MAX_ASPECT)
    rows = []
    for k in [int(v) for v in args.tasks.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            reg_path = Path(tmp) / "serve.db"
            cached = (args.registry_cache / f"{args.model}_{args.img_size}px_k{k}_m{args.memory}_f{args.fork_layers}"
                      f"{'_h' if args.head_tasks else ''}.db"
                      if args.registry_cache else None)
            if cached is not None and cached.is_file():
                _copy_sqlite(cached, reg_path)
            else:
                build_registry(reg_path, args, k)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    _copy_sqlite(reg_path, cached)
            # twice, the faster counts: the first measurement of a call has come out up to 2x slower on the H100
            # host (2,067 against 3,931 img/s for the same K = 1 pass), and a slow baseline flatters the ratio
            offline_runs = [offline_rate(reg_path, args, decoded) for _ in range(2)]
            offline = max(offline_runs)
            backbone = max(offline_rate(reg_path, args, decoded, backbone_only=True) for _ in range(2))
            port = free_port()
            log = open(Path(tmp) / "server.log", "w")
            server = subprocess.Popen(
                [sys.executable, "-m", "cli", "--registry", str(reg_path), "serve", "--port", str(port),
                 "--device", args.device, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                 "--poll-s", "0.2", "--decode-workers", args.decode_workers, "--jpeg-decode", args.jpeg_decode,
                 "--switch-interval-ms", str(args.switch_interval_ms), "--workers", str(args.workers),
                 "--shared-model" if args.shared_model else "--no-shared-model",
                 "--overlap-passes", args.overlap_passes, *args.server_args.split()], cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
            try:
                url = f"http://127.0.0.1:{port}"
                _wait_up(url, server, Path(tmp) / "server.log")
                spies: list[subprocess.Popen] = []
                profile = (lambda: spies.append(_profile(server.pid, args.profile_server / f"server_k{k}.txt"))
                           ) if args.profile_server else None
                result = asyncio.run(load(url, args, image, probe, reg_path, k, server.pid, on_load=profile))
                for spy in spies:
                    spy.wait(timeout=60)
            finally:
                server.terminate()
                server.wait(timeout=30)
                log.close()
        result.update({"tasks": k, "offline_images_per_s": offline, "offline_runs_images_per_s": offline_runs,
                       "served_over_offline": result["images_per_s"] / offline,
                       "offline_backbone_images_per_s": backbone,
                       "served_over_offline_backbone": result["images_per_s"] / backbone})
        rows.append(result)
        print(f"K={k}: served {result['images_per_s']:.0f} img/s, offline {offline:.0f}, p99 {result['p99_ms']:.0f} ms, "
              f"errors {result['errors']}", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["tasks"] == 0), None)
    for r in rows:  # served against the served backbone (K = 0: one linear head), same run
        r["served_over_served_backbone"] = r["images_per_s"] / base["images_per_s"] if base else None
    env = common.environment(args)
    env.update({"img_size": args.img_size, "clients": args.clients, "requests": args.requests,
                "images_per_request": args.images_per_request, "upload": args.upload_size,
                "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "live_add": args.live_add,
                "adder_threads": args.adder_threads,
                "decode_workers": args.decode_workers, "jpeg_decode": args.jpeg_decode, "switch_interval_ms": args.switch_interval_ms,
                "server_workers": args.workers, "shared_model": args.shared_model,
                "overlap_passes": args.overlap_passes, "route": args.route, "fork_layers": args.fork_layers,
                "head_tasks": args.head_tasks,
                "server_args": args.server_args})
    result = {"environment": env, "results": rows}
    common.report(result, f"serve load, {args.model} {args.img_size}px, {args.clients} clients, {env['device']}",
                  ["K", "served img/s", "× served K=0", "offline img/s", "ratio", "× backbone", "p50/p99 ms",
                   "pass ms wall/thr/gpu",
                   "lag ms", "cpu ms/req server/client", "clients waiting", "errors", "swaps", "probe changes", "bit-identical"],
                  [[str(r["tasks"]), f"{r['images_per_s']:,.0f}",
                    "-" if base is None else f"{r['served_over_served_backbone']:.2f}",
                    f"{r['offline_images_per_s']:,.0f}",
                    f"{r['served_over_offline']:.2f}", f"{r['served_over_offline_backbone']:.2f}",
                    f"{r['p50_ms']:.0f}/{r['p99_ms']:.0f}",
                    f"{r['mean_pass_ms']:.1f}/{r['mean_pass_thread_ms']:.1f}/{r['mean_pass_device_ms']:.1f}",
                    f"{r['mean_loop_lag_ms']:.1f}",
                    f"{r['server_cpu_ms_per_request']:.2f}/{r['client_cpu_ms_per_request']:.2f}",
                    f"{r['clients_waiting']:.2f}", str(r["errors"]), str(r["swaps"]), str(r["probe_top1_changes"]),
                    str(r["probe_alone_bit_identical_after_add"])] for r in rows], args.json_out)
    return result


def _wait_up(url: str, server: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not come up")


if __name__ == "__main__":
    main()
