"""Serving benchmark: the BentoML service against the bare encoder, in one run (a script, not a test).

    MIXLLM_ROUTERBENCH=../shared/data/routerbench_subset/routerbench_subset_long.csv.gz \
        python benchmarks/serve.py [--project DIR] [--requests 256] [--backend auto|onnx-int8|onnx|torch|static]

Without --project it trains a champion on the subset in a temporary project first, with the encoder
backend --backend (embedding.backend). The service's cold start (process start to /readyz 200) is timed,
first with no local copy of the champion (it waits for the registry), and after the load tests over
--restarts restarts, which serve the copy the first start kept. Then, on the
same holdout prompts: the bare in-process encoder (one query at a time, and batches of 64), /route
latency over HTTP (sequential), throughput at concurrency 1, 8 and 32 for /route and for
/route_batch with one query per call (adaptive batching merges concurrent calls), errors, and the
service's resident memory. Throughputs are the median of --repeats passes (2 shared cores are noisy). Also the encoder's time per query at 256, 128 and 64 tokens,
and with int8 Linear layers.
Figures are printed as ratios to the bare encoder measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixllm.cli.processes import free_port, start, stop, wait_http  # noqa: E402
from mixllm.config import load_config  # noqa: E402
from mixllm.evaluation.baselines import query_frame  # noqa: E402
from mixllm.io.data import ingest  # noqa: E402
from mixllm.io.registry import Registry  # noqa: E402
from mixllm.io.workspace import load_split  # noqa: E402
from mixllm.jobs.training import run_training  # noqa: E402


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1000, q))


def rss_mb(pid: int) -> float:
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def bare_encoder(router, queries, batch=64, repeats=1):
    """Per-query times one at a time, and the median batched throughput over `repeats` passes."""
    encoder = router.encoder_
    encoder.transform(queries[:4])  # warm-up
    singles = []
    for q in queries:
        t = time.perf_counter()
        encoder.transform([q])
        singles.append(time.perf_counter() - t)
    passes = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, len(queries), batch):
            encoder.transform(queries[i:i + batch])
        passes.append(len(queries) / (time.perf_counter() - t))
    return singles, statistics.median(passes)


def load_test(base, path, queries, concurrency, body):
    """`concurrency` requests kept in flight by one asyncio client. A thread per connection would
    compete with the service for the same 2 cores (GIL switching), so the client stays light; its
    own CPU time is reported next to the figures."""

    async def run():
        limit = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
            async def one(q):
                async with limit:
                    t = time.perf_counter()
                    response = await client.post(f"{base}{path}", json=body(q))
                    return response.status_code, time.perf_counter() - t

            return await asyncio.gather(*(one(q) for q in queries))

    cpu, started = time.process_time(), time.perf_counter()
    results = asyncio.run(run())
    elapsed, client_cpu = time.perf_counter() - started, time.process_time() - cpu
    errors = sum(status != 200 for status, _ in results)
    return len(queries) / elapsed, errors, [latency for _, latency in results], client_cpu / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=None, help="A project folder with a trained champion.")
    parser.add_argument("--requests", type=int, default=256, help="Requests per load level.")
    parser.add_argument("--backend", choices=("torch", "torch-int8", "onnx", "onnx-int8", "static", "auto"),
                        default="auto", help="The champion's encoder when trained without --project: "
                        "embedding.backend, '-int8' for embedding.quantize int8; auto (the default) compares "
                        "embedding.auto_backends on validation, as mixllm train does.")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Passes per throughput figure (bare batched and each load level); the median is shown.")
    parser.add_argument("--restarts", type=int, default=3,
                        help="Restarts timed after the load tests (each serves the local copy the first start kept).")
    args = parser.parse_args()
    source = os.environ.get("MIXLLM_ROUTERBENCH")
    project = args.project
    temporary = project is None
    if temporary:
        if not source:
            print("set MIXLLM_ROUTERBENCH (or pass --project with a trained champion)", file=sys.stderr)
            return 2
        project = Path(tempfile.mkdtemp(prefix="mixllm-serve-bench-"))
        params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        backend, _, variant = args.backend.partition("-")
        params["embedding"]["backend"] = backend
        if variant:
            params["embedding"]["quantize"] = variant
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        config = load_config(project / "params.yaml")
        ingest(source, config)
        print("training a champion first ...", flush=True)
        run_training(config, progress=False, baselines=[])
    config = load_config(project / "params.yaml")
    router, version = Registry(config).load_router("champion")
    queries = query_frame(load_split(config).holdout)["query"].tolist()[: args.requests]

    singles, batched_qps = bare_encoder(router, queries, repeats=args.repeats)
    bare_ms = statistics.median(singles) * 1000
    seq_rows = []
    for length in (256, 128, 64) if router.encoder_.backend == "torch" else ():
        router.encoder_.model_.max_seq_length = length
        s, qps = bare_encoder(router, queries[:128])
        seq_rows.append((length, statistics.median(s) * 1000, qps))
    if router.encoder_.backend == "torch":
        router.encoder_.model_.max_seq_length = config.embedding.max_seq_length
        served_quantize = router.encoder_.quantize
        router.encoder_.quantize = "int8"  # the same weights, Linear layers in int8 (embedding.quantize)
        s, qps = bare_encoder(router, queries[:128])
        seq_rows.append((f"{config.embedding.max_seq_length}, int8", statistics.median(s) * 1000, qps))
        router.encoder_.quantize = served_quantize

    # The load generator is one client: the per-client limit (service.client_rate_per_s) would
    # measure itself, so the served copy of the settings turns it off.
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params.setdefault("service", {})["client_rate_per_s"] = 0
    served_params = project / "params-serve-bench.yaml"
    served_params.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    port = free_port()
    env = {**os.environ, "MIXLLM_PARAMS": str(served_params), "BENTOML_DO_NOT_TRACK": "true",
           "BENTOML_HOME": str(project / "bentoml")}
    env.pop("MIXLLM_API_TOKEN", None)
    launched = time.perf_counter()
    process = start([sys.executable, "-m", "bentoml", "serve", "mixllm.service.app:MixLLMService", "--host", "127.0.0.1",
                     "--port", str(port)], log_path=project / "serve-bench.log", env=env, cwd=project)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_http(f"{base}/readyz", 300, process, interval=0.05)
        cold_start_s = time.perf_counter() - launched
        for q in queries[:8]:
            httpx.post(f"{base}/route", json={"query": q}, timeout=60)
        sequential = []
        seq_errors = 0
        with httpx.Client(timeout=60) as client:
            for q in queries:
                t = time.perf_counter()
                seq_errors += client.post(f"{base}/route", json={"query": q}).status_code != 200
                sequential.append(time.perf_counter() - t)
        for concurrency in (1, 8, 32):
            for label, path, body in (("/route", "/route", lambda q: {"query": q}),
                                      ("/route_batch (adaptive)", "/route_batch", lambda q: {"requests": [{"query": q}]})):
                passes = sorted((load_test(base, path, queries, concurrency, body) for _ in range(args.repeats)),
                                key=lambda result: result[0])
                qps, _, latencies, client_share = passes[len(passes) // 2]  # the median pass
                errors = sum(result[1] for result in passes)  # over every pass
                rows.append((label, concurrency, qps, errors, percentile(latencies, 50), percentile(latencies, 95),
                             client_share))
        # Calls of 32 queries each, 32 clients: the most a batching client gets. Enough calls (the
        # prompts' chunks in turn) that all 32 clients stay busy: the 8 calls of 256 prompts alone
        # measured a burst of 8 in flight, not 32 clients. The service keeps no per-query cache.
        chunks = [queries[i:i + 32] for i in range(0, len(queries), 32)]
        chunks = [chunks[k % len(chunks)] for k in range(max(len(chunks), 4 * 32))]
        passes = sorted((load_test(base, "/route_batch", chunks, 32, lambda chunk: {"requests": [{"query": q} for q in chunk]})
                         for _ in range(args.repeats)), key=lambda result: result[0])
        calls_per_s, _, latencies, client_share = passes[len(passes) // 2]
        rows.append(("/route_batch, 32 queries per call", 32, calls_per_s * sum(map(len, chunks)) / len(chunks),
                     sum(result[1] for result in passes), percentile(latencies, 50), percentile(latencies, 95), client_share))
        memory = rss_mb(process.pid)
        # Restarts: the service now has a local copy of what it served (service.warm_start), which a
        # restart serves before the registry has answered; the first start above had none.
        stop(process)
        restarts = []
        for _ in range(args.restarts):
            launched = time.perf_counter()
            process = start([sys.executable, "-m", "bentoml", "serve", "mixllm.service.app:MixLLMService", "--host",
                             "127.0.0.1", "--port", str(port)], log_path=project / "serve-bench.log", env=env, cwd=project)
            wait_http(f"{base}/readyz", 300, process, interval=0.05)
            restarts.append(time.perf_counter() - launched)
            stop(process)
    finally:
        stop(process)
        if temporary:
            shutil.rmtree(project, ignore_errors=True)

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n## Serving ({stamp}; {platform.machine()}, {os.cpu_count()} cores; champion v{version}; "
          f"{len(queries)} holdout prompts, max_seq_length {config.embedding.max_seq_length}, "
          f"encoder backend {router.encoder_.backend}, quantize {getattr(router.encoder_, 'quantize', 'none')}; "
          f"TOKENIZERS_PARALLELISM "
          f"{os.environ.get('TOKENIZERS_PARALLELISM', 'unset')})\n")
    print("| measure | value | ratio to the bare encoder |\n|---|---|---|")
    print(f"| bare encoder, one query at a time: median ms/query | {bare_ms:.1f} | 1.00 |")
    print(f"| bare encoder, batches of 64: queries/s | {batched_qps:.1f} | 1.00 |")
    p50, p95, p99 = (percentile(sequential, q) for q in (50, 95, 99))
    print(f"| /route over HTTP, sequential: p50 / p95 / p99 ms | {p50:.1f} / {p95:.1f} / {p99:.1f} | "
          f"p50 = {p50 / bare_ms:.2f}x (target <= 1.25x) |")
    print(f"| errors (sequential) | {seq_errors} | |")
    print(f"| service resident memory (all processes) | {memory:.0f} MB | |")
    print(f"| cold start: process start to /readyz 200, first start (no local copy: waits for the registry) | "
          f"{cold_start_s:.1f} s | (target <= 5 s) |")
    if restarts:
        print(f"| cold start: restart (serves its local copy, asks the registry after) | median "
              f"{statistics.median(restarts):.1f} s ({', '.join(f'{s:.1f}' for s in restarts)}) | (target <= 5 s) |")
    print("\n| endpoint | concurrency | queries/s | errors | p50 ms | p95 ms | client CPU (cores) | x bare batched throughput |"
          "\n|---|---|---|---|---|---|---|---|")
    for label, concurrency, qps, errors, l50, l95, client_share in rows:
        print(f"| {label} | {concurrency} | {qps:.1f} | {errors} | {l50:.0f} | {l95:.0f} | {client_share:.2f} | "
              f"{qps / batched_qps:.2f} |")
    print("\nEncoder cost by max_seq_length (same prompts; quality per length: benchmarks/RESULTS.md ablations)\n")
    print("| max_seq_length | median ms/query (single) | queries/s (batches of 64) |\n|---|---|---|")
    for length, ms, qps in seq_rows:
        print(f"| {length} | {ms:.1f} | {qps:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
