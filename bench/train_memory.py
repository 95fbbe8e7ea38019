"""Peak memory of one Axolotl training with Axolotl's default dataloader (one worker, forked
from the trainer each epoch) and with none (what copa renders on CPU), on the same rendered
config: the sum of PSS over the training's process tree, sampled every 0.5 s, the losses and
the adapter's bytes (they must be the same). Results: bench/results/train_memory.json.

    python bench/train_memory.py [--recipe recipes/iris.yaml]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, write_result  # noqa: E402

LOADER_KEYS = ("dataloader_num_workers", "dataloader_pin_memory", "dataloader_prefetch_factor")


def tree_pss_kb(root: int) -> int:
    """PSS (shared pages split between their sharers) summed over a process and its children."""
    pids, total = [root], 0
    while pids:
        pid = pids.pop()
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:  # gone meanwhile
            continue
        found = re.search(r"^Pss:\s+(\d+)", rollup, re.M)
        total += int(found.group(1)) if found else 0
        pids.extend(int(c) for c in children)
    return total


def train(config: dict, work: Path, train_jsonl: Path) -> dict:
    work.mkdir(parents=True)
    shutil.copy(train_jsonl, work / "train.jsonl")
    config = {**config, "dataset_prepared_path": str(work / "prepared"),
              "output_dir": str(work / "checkpoints"),
              "datasets": [{**d, "path": str(work / "train.jsonl")} for d in config["datasets"]]}
    (work / "axolotl.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    log = (work / "train.log").open("w")
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "axolotl.cli.main", "train",
                             str(work / "axolotl.yml"), "--launcher", "python"],
                            stdout=log, stderr=subprocess.STDOUT)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_pss_kb(proc.pid))
        time.sleep(0.5)
    log.close()
    text = (work / "train.log").read_text()
    adapter = work / "checkpoints" / "adapter_model.safetensors"
    return {"exit": proc.returncode, "seconds": round(time.time() - start, 1),
            "peak_pss_gb": round(peak / 2**20, 2),
            "losses": re.findall(r"'loss': '([0-9.e-]+)'", text),
            "adapter_sha256": hashlib.sha256(adapter.read_bytes()).hexdigest()
            if adapter.is_file() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "iris.yaml"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="copa-bench-trainmem-"))
    try:
        rendered = work / "rendered"
        subprocess.run([sys.executable, "-m", "copa.cli", "render", args.recipe, "-o",
                        str(rendered)], check=True)
        config = yaml.safe_load((rendered / "axolotl.yml").read_text())
        default = {k: v for k, v in config.items() if k not in LOADER_KEYS}
        none = {**default, "dataloader_num_workers": 0, "dataloader_pin_memory": False}
        runs = {name: train(cfg, work / name, rendered / "train.jsonl")
                for name, cfg in (("axolotl_default_worker", default), ("no_worker", none))}
        shas = {run["adapter_sha256"] for run in runs.values()}
        same = len(shas) == 1 and None not in shas
        write_result("train_memory", {"recipe": args.recipe, "runs": runs,
                                      "same_adapter_bytes": same})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
