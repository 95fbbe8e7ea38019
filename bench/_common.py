"""Helpers shared by the benchmarks: timing, peak memory of children, writing results."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def timed(cmd: list[str], **kwargs: Any) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return time.time() - start, result


def keep_or_remove(folder: Path, keep: bool, shown: Path | None = None) -> None:
    """A benchmark's scratch folder: printed and kept with --keep, else removed."""
    import shutil

    if keep:
        print(f"run directory: {shown or folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)


def children_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    import os

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine()}


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
            **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2))
    return path


def score_on_engine(engine: Any, name: str, kit: Any, program: Any, testset: list[Any],
                    threads: int, max_tokens: int) -> tuple[float, list[Any], float]:
    """dspy.Evaluate-style scoring of `program` on a copa BatchingEngine, uncached; returns the
    mean metric, the per-row results and the wall seconds. The engine is closed afterwards."""
    import dspy

    from copa.dspy.scoring import score

    lm = dspy.LM(f"local/{name}", engine=engine, cache=False, max_tokens=max_tokens)
    try:
        with dspy.context(lm=lm, adapter=kit.adapter):
            start = time.perf_counter()
            mean, results = score(program, testset, kit.metric, threads)
            return mean, results, time.perf_counter() - start
    finally:
        engine.close()
