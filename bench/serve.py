"""Requests/s and p50 / p95 latency of `copa serve` on a finished run, at 1, 8 and 32 concurrent
clients. Each client sends its requests one after another (a closed loop) over real HTTP on
loopback; the server is a `copa serve` process, as a user starts it.
Results: bench/results/serve.json.

    python bench/serve.py [RUN_DIR (default runs/iris)] [--requests 96] [--clients 1 8 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, write_result  # noqa: E402

STARTUP_S = 600.0


def post(url: str, body: dict[str, Any]) -> tuple[float, int]:
    """One request: (seconds, HTTP status)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return time.perf_counter() - start, status


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> float:
    start = time.time()
    while time.time() - start < STARTUP_S:
        if proc.poll() is not None:
            sys.exit(f"copa serve exited: {log.read_text()[-3000:]}")
        try:
            get(f"{url}/health")
            return time.time() - start
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    sys.exit(f"copa serve did not answer /health within {STARTUP_S:.0f}s")


def test_inputs(run_dir: Path, fields: list[str]) -> list[dict[str, Any]]:
    """The run's test rows (inputs only); an export has none: Iris rows then."""
    split = run_dir / "rendered" / "splits" / "test.jsonl"
    if split.is_file():
        rows = [json.loads(line) for line in split.read_text().splitlines() if line.strip()]
    else:
        from copa.data.sources import iris_rows

        rows = iris_rows()
    return [{f: row[f] for f in fields} for row in rows]


def level(url: str, inputs: list[dict[str, Any]], clients: int, requests: int) -> dict[str, Any]:
    """`requests` requests from `clients` clients, each sending its share one after another."""
    per_client = [[inputs[(c + i * clients) % len(inputs)] for i in range(requests // clients)]
                  for c in range(clients)]

    def client(rows: list[dict[str, Any]]) -> list[tuple[float, int]]:
        return [post(f"{url}/predict", row) for row in rows]

    before = get(f"{url}/health").get("engine", {})
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [r for rs in pool.map(client, per_client) for r in rs]
    wall = time.perf_counter() - start
    after = get(f"{url}/health").get("engine", {})
    latencies = sorted(seconds for seconds, _ in results)
    failed = sum(status != 200 for _, status in results)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 \
        else latencies * 99
    batches = after.get("batches", 0) - before.get("batches", 0)
    served = after.get("requests", 0) - before.get("requests", 0)
    return {"clients": clients, "requests": len(results), "failed": failed,
            "seconds": round(wall, 3), "requests_per_s": round(len(results) / wall, 3),
            "latency_p50_s": round(cuts[49], 4), "latency_p95_s": round(cuts[94], 4),
            "mean_engine_batch": round(served / batches, 2) if batches else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", nargs="?", default=str(REPO / "runs" / "iris"))
    parser.add_argument("--requests", type=int, default=96,
                        help="requests per concurrency level (rounded down to a multiple of "
                             "the client count)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--arm", default="best")
    parser.add_argument("--warmup", type=int, default=8)
    args = parser.parse_args()
    run_dir = Path(args.run_dir).resolve()
    from copa.inference.servers import free_port  # loopback port nothing listens on
    from copa.use.bundle import open_bundle

    bundle = open_bundle(run_dir, args.arm)  # fails here, clearly, on an unfinished run
    inputs = test_inputs(run_dir, bundle.input_fields)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="copa-bench-serve-")) / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("COPA_API_KEY", None)
    load_at_start = os.getloadavg()[0]  # other work on the machine skews every figure
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "copa.cli", "serve", str(run_dir),
                                 "--port", str(port), "--arm", args.arm], stdout=handle,
                                stderr=subprocess.STDOUT, env=env)
    try:
        startup = wait_until_up(url, proc, log)
        for row in inputs[:args.warmup]:  # model load paths, prefix cache: not what is timed
            post(f"{url}/predict", row)
        levels = []
        for clients in args.clients:
            requests = max(clients, args.requests - args.requests % clients)
            levels.append(level(url, inputs, clients, requests))
            print(json.dumps(levels[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    write_result("serve", {
        "run_dir": str(run_dir), "arm": bundle.arm, "model": bundle.model_role,
        "engine": bundle.recipe.serve.engine,
        "max_batch_size": bundle.recipe.serve.max_batch_size,
        "max_tokens": bundle.recipe.evaluate.max_tokens, "startup_s": round(startup, 1),
        "load_average_at_start": load_at_start, "levels": levels})


if __name__ == "__main__":
    main()
