"""The Axolotl backend: `axolotl train` and `axolotl merge-lora` as subprocesses (logged,
resumed from the last checkpoint, killed as a group), on a config from
copa.backends.axolotl_config. Knows nothing of DSPy. Code outside copa/backends/ reaches it
only through copa.backends.get_backend().
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from copa.backends import axolotl_config, valcurve
from copa.backends.axolotl_config import write_config
from copa.backends.base import Hardware, TrainError
from copa.backends.progress import PROGRESS_ENV, TrainingProgress
from copa.files import atomic_dir
from copa.recipe import Recipe
from copa.track import TRAIN_ENV


def launch_command(recipe: Recipe, config_path: Path) -> list[str]:
    """The `axolotl train` command line, with the launcher the recipe's scale asks for."""
    dist = recipe.finetune.distributed
    cmd = [sys.executable, "-m", "axolotl.cli.main", "train", str(config_path)]
    if dist.processes == 1:
        return [*cmd, "--launcher", "python"]
    cmd += ["--launcher", dist.launcher, "--"]
    if dist.launcher == "torchrun":
        return [*cmd, f"--nproc_per_node={dist.processes}"]
    return [*cmd, f"--num_processes={dist.processes}"]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Strict conditional numerical reproducibility: MKL picks the same float32 kernels whatever
    # the buffers' alignment or the batch size (as for inference, copa.inference.local), and is no
    # slower here (docs/performance.md). Not what made same-seed runs differ: that was LoRA's
    # unseeded init (axolotl_config.SEED_PLUGIN).
    env.setdefault("MKL_CBWR", "AUTO,STRICT")
    # `axolotl train` launches `accelerate` from PATH: put this interpreter's bin/ first.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


_NOISE = re.compile(r"warn|torchao|_C_mxfp8|kernels-community|FutureWarning|telemetry",
                    re.IGNORECASE)


OnProcess = Callable[[subprocess.Popen], None]


def run_logged(cmd: list[str], log_path: Path, on_line: Callable[[str], None] | None = None,
               what: str = "axolotl", env: dict[str, str] | None = None,
               on_process: OnProcess | None = None) -> None:
    """Run a command, teeing its output to a log; raise TrainError with the last useful lines.
    on_process gets the running process (its own session: kill its group to stop it all)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=400)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", env=env or subprocess_env(),
                                start_new_session=True)
        try:
            if on_process:
                on_process(proc)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                tail.append(line.rstrip())
                if on_line:
                    on_line(line)
            code = proc.wait()
        except BaseException:
            _kill(proc)
            raise
    if code != 0:
        raise TrainError(f"{what} failed (exit {code})", log=log_path, tail=meaningful_tail(tail))


def _kill(proc: subprocess.Popen[str]) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def meaningful_tail(lines: deque[str] | list[str], keep: int = 8) -> str:
    """The error lines of a Python failure, without warnings and progress bars."""
    lines = [ln for ln in lines if ln.strip() and not _NOISE.search(ln) and "it/s]" not in ln
             and "s/it]" not in ln]
    errors = [ln for ln in lines if re.match(r"^\s*[\w.]*(Error|Exception)\b", ln)
              or "Error:" in ln or "error:" in ln]
    chosen = errors[-3:] if errors else lines[-keep:]
    return "\n".join("  " + ln.strip()[:300] for ln in chosen)


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete `checkpoint-N` (one with its trainer state written)."""
    complete = [p for p in output_dir.glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def check_base_model(config: dict[str, Any], config_path: Path) -> None:
    """A rendered config outlives the local model folder it names (a conversion under
    $COPA_HOME/models deleted since render); Axolotl would then take the path for a hub id and
    fail offline deep in a traceback. Say so before launching it, with the way out."""
    base = str(config.get("base_model") or "")
    if Path(base).is_absolute() and not Path(base).is_dir():
        raise TrainError(f"{config_path} names base_model {base}, which is no longer on disk; "
                         "render it again: copa run RECIPE --force render")


def tracked_config(config: dict[str, Any], config_path: Path, work_dir: Path,
                   env: dict[str, str]) -> Path:
    """With tracking on, Axolotl's own MLflow integration logs the training curves: its keys
    (mlflow_tracking_uri, mlflow_experiment_name) go into a copy of the config, and the stage's
    MLflow run id into the trainer's environment (MLFLOW_RUN_ID: HF's MLflowCallback resumes
    that run instead of starting its own). The rendered config, and the train key, stay as they
    were. Tracking off: the rendered config itself."""
    raw = env.pop(TRAIN_ENV, None)  # {uri, experiment, run_id}, set by copa.track
    if not raw:
        return config_path
    info = json.loads(raw)
    tracked = {**config, "mlflow_tracking_uri": info["uri"],
               "mlflow_experiment_name": info["experiment"]}
    env["MLFLOW_RUN_ID"] = info["run_id"]
    env["MLFLOW_TRACKING_URI"] = info["uri"]
    path = work_dir / "axolotl-tracked.yml"
    write_config(tracked, path)
    return path


def train(recipe: Recipe, config_path: Path, work_dir: Path,
          emit: Callable[[str], None] = print, total_steps: int | None = None,
          on_process: OnProcess | None = None, val_eval: Path | None = None) -> Path:
    """Run `axolotl train`; resume from the last checkpoint if a previous run was killed.
    With val_eval (copa.backends.valcurve's spec), the training process scores val as it goes
    and, when it may stop early, the adapter returned is the best checkpoint's.

    Returns the adapter folder (adapter_config.json + adapter weights).
    """
    config = yaml.safe_load(config_path.read_text())
    check_base_model(config, config_path)
    output_dir = Path(config["output_dir"])
    log_path = work_dir / "axolotl-train.log"
    env = subprocess_env()
    config_path = tracked_config(config, config_path, work_dir, env)
    cmd = launch_command(recipe, config_path)
    resume = last_checkpoint(output_dir)
    if resume is not None:  # the config sets auto_resume_from_checkpoints
        emit(f"  resuming from {resume.name}")
    env[PROGRESS_ENV] = str(work_dir / "progress.jsonl")
    valcurve.curve_path(work_dir).unlink(missing_ok=True)  # this training's curve only
    if val_eval is not None:
        env[valcurve.VAL_EVAL_ENV] = str(val_eval)
    if not Hardware.detect().cuda:
        # Accelerate's shared state must know it runs on the CPU from its first use, or
        # several processes each train alone ("not parallel") instead of as one gloo group.
        env.setdefault("ACCELERATE_USE_CPU", "true")
    with TrainingProgress(work_dir / "progress.jsonl", emit, total_steps):
        run_logged(cmd, log_path, what="axolotl train", env=env, on_process=on_process)
    adapter = output_dir
    if not has_adapter(adapter):
        raise TrainError("axolotl train finished but wrote no adapter (config and weights)",
                         log=log_path, tail=meaningful_tail(
                             log_path.read_text(errors="replace").splitlines()))
    return best_adapter(work_dir, output_dir, log_path) if val_eval is not None else adapter


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def has_adapter(folder: Path) -> bool:
    """Whether `folder` holds a finished adapter: its weights, not only adapter_config.json,
    which Axolotl writes before the first step (a training killed at step 5 leaves one)."""
    return (folder / "adapter_config.json").is_file() and any(
        (folder / name).is_file() for name in ADAPTER_WEIGHTS)


def best_adapter(work_dir: Path, output_dir: Path, log_path: Path) -> Path:
    """The adapter to merge after an evaluated training: with early stopping, the checkpoint
    of the best val score (the Trainer keeps it from rotation); else the final one."""
    curve = valcurve.read_curve(work_dir)
    if curve is None:
        raise TrainError("axolotl train finished but the val evaluation left no "
                         f"{valcurve.CURVE_NAME}", log=log_path)
    if curve.get("patience") is None or curve.get("best_step") is None:
        return output_dir
    best = output_dir / f"checkpoint-{curve['best_step']}"
    if not has_adapter(best):
        raise TrainError(f"the best step on val is {curve['best_step']}, but {best} holds no "
                         "adapter (removed by a save_total_limit under finetune.axolotl?)",
                         log=log_path)
    return best


def merge(config_path: Path, adapter_dir: Path, merged_dir: Path, work_dir: Path,
          on_process: OnProcess | None = None) -> Path:
    """Run `axolotl merge-lora` and move its output to `merged_dir` (atomically)."""
    log_path = work_dir / "axolotl-merge.log"
    config = yaml.safe_load(config_path.read_text())
    check_base_model(config, config_path)
    scratch = work_dir / "merge-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    # merge-lora writes <output_dir>/merged; aim output_dir at scratch so checkpoints stay put.
    cmd = [sys.executable, "-m", "axolotl.cli.main", "merge-lora", str(config_path),
           f"--lora-model-dir={adapter_dir}", f"--output-dir={scratch}"]
    if config.get("load_in_4bit"):
        cmd.append("--dequant")
    run_logged(cmd, log_path, what="axolotl merge-lora", on_process=on_process)
    produced = scratch / "merged"
    if not (produced / "config.json").is_file():
        raise TrainError("axolotl merge-lora wrote no merged model", log=log_path)
    with atomic_dir(merged_dir) as tmp:
        for item in produced.iterdir():
            shutil.move(str(item), tmp / item.name)
    shutil.rmtree(scratch, ignore_errors=True)
    return merged_dir


class AxolotlBackend:
    """copa.backends.Backend for Axolotl: its config functions and its subprocesses."""

    name = "axolotl"
    checked_config = staticmethod(axolotl_config.checked_config)
    relocated_config = staticmethod(axolotl_config.relocated_config)
    write_config = staticmethod(write_config)
    steps_for = staticmethod(axolotl_config.steps_for)
    train = staticmethod(train)
    merge = staticmethod(merge)
    has_adapter = staticmethod(has_adapter)
