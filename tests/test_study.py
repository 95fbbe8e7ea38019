"""Issue 16: `copa study` for real on the tiny model (real Axolotl, DSPy and Ray): a 2x2 grid
over two seeds, killed with SIGKILL after its first run and resumed; cells that share their
training inputs share one trained model; the study files; two more cells as Ray tasks.

One study serves the tests that read it (module fixture): its two trainings (one per seed) are what
costs; its grid is over prompt-stage and evaluation keys, so its 8 runs train only twice.
The Ray test runs a study of its own (one training, two cells at once).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_tiny_recipe

from copa.cli import cli

pytestmark = pytest.mark.slow

STUDY = """\
recipe: tiny.yaml
grid:
  optimize.params.max_labeled_demos: [1, 2]
  evaluate.max_tokens: [4, 6]
seeds: [0, 1]
bootstrap: 300
"""
FIRST = "max_labeled_demos=1,max_tokens=4/seed-0"


def _descendants(pid: int) -> list[int]:
    """Every process below pid (Axolotl runs in a session of its own: killing copa's process
    group alone would leave it training)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "study-cell.json").read_text())["finished"]
    except (OSError, ValueError, KeyError):
        return False


def _files(run_dir: Path) -> dict[Path, int]:
    """Every file of a run and when it was written (the lock files come and go with holders)."""
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and not p.name.startswith(".copa.lock")}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    folder = tmp_path_factory.mktemp("study")
    write_tiny_recipe(folder, tiny_model_dir)
    study_file = folder / "grid.yaml"
    study_file.write_text(STUDY)
    out = folder / "out"
    cmd = [sys.executable, "-m", "copa.cli", "study", str(study_file), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while not _finished(out / FIRST) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    below = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert _finished(out / FIRST), "the first run did not finish before the deadline"
    first_files = _files(out / FIRST)
    from copa.study.runner import run_study

    messages: list[str] = []
    data, results = run_study(study_file, out_dir=out, emit=messages.append)
    return {"folder": folder, "file": study_file, "out": out, "data": data,
            "results": results, "messages": messages, "first_files": first_files}


def test_the_resumed_study_skips_the_run_finished_before_the_kill(study: dict) -> None:
    assert f"[{FIRST}] finished before: skipped" in study["messages"]
    status = {r["dir"]: r["status"] for r in study["results"]}
    assert status.pop(FIRST) == "skipped"
    assert set(status.values()) == {"finished"} and len(status) == 7
    # nothing in the finished run was written again
    assert _files(study["out"] / FIRST) == study["first_files"]


def test_every_cell_is_an_ordinary_run_directory(study: dict) -> None:
    runs = sorted(p.parent.relative_to(study["out"]).as_posix()
                  for p in study["out"].glob("*/seed-*/report.json"))
    assert len(runs) == 8 and FIRST in runs
    result = CliRunner().invoke(cli, ["report", str(study["out"] / FIRST)])
    assert result.exit_code == 0 and "| combined | fine-tuned (merged) |" in result.output
    recipe = json.loads((study["out"] / FIRST / "recipe.json").read_text())["recipe"]
    assert recipe["optimize"]["params"]["max_labeled_demos"] == 1
    assert recipe["evaluate"]["max_tokens"] == 4


def test_cells_with_the_same_training_inputs_share_one_model(study: dict) -> None:
    models = sorted((study["out"] / "models").iterdir())
    assert len(models) == 2  # one per seed; the grid changes nothing the training sees
    # the seed-0 model was trained once, before the kill, and only reused after it (seed 1's
    # may have been killed mid-training and resumed: at most twice started)
    first = json.loads((study["out"] / FIRST / "manifest.json").read_text())["stages"]
    seed0 = Path(first["train"]["shared_model"])
    for model in models:
        started = (model / "train" / "axolotl-train.log").read_text().count("axolotl.cli.main "
                                                                            "train")
        assert started == 1 if model == seed0 else started in (1, 2)
    by_seed: dict[str, set[str]] = {}
    keys = set()
    for run_dir in study["out"].glob("*/seed-*"):
        manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
        assert manifest["train"]["status"] == manifest["merge"]["status"] == "done"
        by_seed.setdefault(run_dir.name, set()).add(manifest["train"]["shared_model"])
        keys.add(manifest["train"]["key"])
        assert (run_dir / "merged").is_symlink()
        assert (run_dir / "merged" / "config.json").is_file()
        assert not (run_dir / "train").exists()  # no copy, no training of its own
    assert {s: len(m) for s, m in by_seed.items()} == {"seed-0": 1, "seed-1": 1}
    assert len(keys) == 8  # each run's own train key names its own folders: not what is shared


def test_study_files_hold_every_score_and_the_effects(study: dict) -> None:
    data = json.loads((study["out"] / "study.json").read_text())
    assert data == json.loads(json.dumps(study["data"]))
    assert len(data["runs"]) == 8 and len(data["cells"]) == 4
    for run in data["runs"]:
        report = json.loads((study["out"] / run["dir"] / "report.json").read_text())
        assert run["scores"] == pytest.approx({a: d["score"] for a, d in report["arms"].items()})
    for cell in data["cells"]:
        seeds = [r for r in data["runs"] if r["cell"] == cell["cell"]]
        for arm, entry in cell["arms"].items():
            assert entry["mean"] == pytest.approx(sum(r["scores"][arm] for r in seeds) / 2)
            assert entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
        m = {a: e["mean"] for a, e in cell["arms"].items()}
        interaction = cell["effects"]["interaction"]
        assert interaction["value"] == pytest.approx(
            m["combined"] - m["finetune_only"] - m["prompt_only"] + m["baseline"])
        assert interaction["excludes_zero"] == (interaction["ci95"][0] > 0
                                                or interaction["ci95"][1] < 0)
    assert len(data["findings"]) == 8  # synergy and interaction of each of the 4 cells
    assert all("the interval" in line for line in data["findings"])
    text = (study["out"] / "study.md").read_text()
    assert "## Findings" in text and "| max_labeled_demos=2,max_tokens=6 | 2 |" in text
    assert (study["out"] / "study.png").read_bytes().startswith(b"\x89PNG")


def test_copa_study_report_reprints(study: dict) -> None:
    (study["out"] / "study.md").unlink()
    result = CliRunner().invoke(cli, ["study", "--report", str(study["out"])])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (study["out"] / "study.md").read_text().strip()
    assert "## Findings" in result.output


def test_the_ray_executor_runs_two_cells_on_a_local_ray_instance(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Two cells as Ray tasks at once (2 CPUs, 1 each) that need the same model: one trains
    it while the other waits on the shared model's lock, then reuses it; never twice."""
    import ray

    from copa.study.runner import run_study

    write_tiny_recipe(tmp_path, tiny_model_dir)
    ray_file = tmp_path / "ray.yaml"
    ray_file.write_text("recipe: tiny.yaml\ngrid:\n  optimize.params.max_labeled_demos: [1, 2]\n"
                        "seeds: [2]\nbootstrap: 300\nresources: {num_cpus: 1}\n")
    out = tmp_path / "out"
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        messages: list[str] = []
        data, results = run_study(ray_file, executor="ray", out_dir=out, emit=messages.append)
    finally:
        ray.shutdown()
    assert [r["status"] for r in results] == ["finished", "finished"]
    assert "2 cells submitted to Ray (num_cpus=1 each)" in messages
    pids = {r["pid"] for r in results}
    assert len(pids) == 2 and os.getpid() not in pids  # two Ray worker processes
    (model,) = (out / "models").iterdir()
    log = (model / "train" / "axolotl-train.log").read_text()
    assert log.count("axolotl.cli.main train") == 1
    assert json.loads((model / "model.json").read_text())["trained_for"] in {
        str(out / r["dir"]) for r in results}
    for result in results:
        manifest = json.loads((out / result["dir"] / "manifest.json").read_text())["stages"]
        assert manifest["train"]["shared_model"] == str(model)
    assert [c["status"] for c in data["cells"]] == ["finished", "finished"]
    assert set(data["cells"][0]["arms"]) == {"baseline", "prompt_only", "finetune_only",
                                             "combined"}
