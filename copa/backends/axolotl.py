"""Axolotl backend: render its config from a recipe, validate it, run `axolotl train` and
`axolotl merge-lora` as subprocesses. Knows nothing of DSPy.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment

from copa.backends import valcurve
from copa.backends.progress import PROGRESS_ENV, TrainingProgress
from copa.files import atomic_dir, atomic_write_text, quiet_fds
from copa.models import lora_targets
from copa.prompting import templates_dir
from copa.recipe import Problem, Recipe, RecipeError

CONFIG_TEMPLATE = "axolotl/config.yml.j2"
# An Axolotl plugin (copa/backends/axolotl_plugin.py) named in every rendered config: it seeds
# before the LoRA adapter exists (Axolotl seeds only when it builds the Trainer, after that) and
# reports progress from a TrainerCallback.
SEED_PLUGIN = "copa.backends.axolotl_plugin.CopaPlugin"
# Keys copa renders from the recipe's own sections: setting them under finetune.axolotl would
# make the recipe say two things at once.
OWNED_KEYS = {
    "base_model", "adapter", "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "sequence_len", "micro_batch_size", "gradient_accumulation_steps",
    "num_epochs", "max_steps", "learning_rate", "lr_scheduler", "warmup_steps", "weight_decay",
    "max_grad_norm", "seed", "val_set_size", "datasets", "output_dir", "trust_remote_code",
}


class TrainError(Exception):
    """Axolotl failed; `tail` holds its last meaningful lines, `log` the full log path."""

    def __init__(self, message: str, log: Path | None = None, tail: str = ""):
        self.log, self.tail = log, tail
        text = message
        if tail:
            text += "\n" + tail
        if log:
            text += f"\nfull log: {log}"
        super().__init__(text)


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    gpus: int = 0
    flash_attention: bool = False

    @classmethod
    def detect(cls) -> Hardware:
        forced = os.environ.get("COPA_DEVICE")
        if forced == "cpu":
            return cls(cuda=False)
        import torch

        if forced == "cuda" or torch.cuda.is_available():
            try:
                import flash_attn  # noqa: F401

                flash = True
            except ImportError:
                flash = False
            return cls(cuda=True, gpus=max(1, torch.cuda.device_count()), flash_attention=flash)
        return cls(cuda=False)


def adapter_kind(recipe: Recipe, hardware: Hardware) -> str:
    """`auto` is QLoRA where there is CUDA and plain LoRA on CPU."""
    ft = recipe.finetune
    if ft.adapter == "auto":
        return "qlora" if hardware.cuda and ft.load_in_4bit is not False else "lora"
    return ft.adapter


def training_bf16(recipe: Recipe, hardware: Hardware) -> str:
    """Axolotl's `bf16:` for the recipe's finetune.precision: 'auto' leaves it to Axolotl on a
    GPU (bf16 where the GPU has it); on a CPU copa.precision decides."""
    from copa import precision

    choice = recipe.finetune.precision
    if hardware.cuda and choice == "auto":
        return "auto"
    return "true" if precision.resolve(choice, hardware.cuda) == "bf16" else "false"


def render_config(recipe: Recipe, base_model: str, train_path: Path, work_dir: Path,
                  hardware: Hardware) -> dict[str, Any]:
    """The Axolotl config for a recipe, as data (also what gets written as axolotl.yml)."""
    ft = recipe.finetune
    values = {
        "recipe_name": recipe.name,
        "base_model": base_model,
        "trust_remote_code": recipe.model.trust_remote_code,
        "adapter": adapter_kind(recipe, hardware),
        "lora_r": ft.lora_r,
        "lora_alpha": ft.lora_alpha,
        "lora_dropout": ft.lora_dropout,
        "lora_target_modules": lora_targets(base_model, ft.lora_target_modules),
        "train_path": str(train_path),
        "prepared_path": str(work_dir / "prepared"),
        "output_dir": str(work_dir / "checkpoints"),
        "val_set_size": ft.val_set_size,
        "sequence_len": ft.sequence_len,
        "micro_batch_size": ft.micro_batch_size,
        "gradient_accumulation_steps": ft.gradient_accumulation_steps,
        "max_steps": ft.max_steps,
        "num_epochs": None if ft.max_steps else ft.num_epochs,
        "learning_rate": ft.learning_rate,
        "lr_scheduler": ft.lr_scheduler,
        "warmup_steps": ft.warmup_steps,
        "weight_decay": ft.weight_decay,
        "max_grad_norm": ft.max_grad_norm,
        "seed": ft.seed,
        "save_steps": ft.save_steps,
        "cuda": hardware.cuda,
        "bf16": training_bf16(recipe, hardware),
        "flash_attention": hardware.flash_attention,
        "distributed_backend": ft.distributed.backend,
        "deepspeed_config": str(templates_dir() / "axolotl" / "deepspeed"
                                / f"zero{ft.distributed.zero_stage}.json"),
    }
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined,
                                        trim_blocks=True, lstrip_blocks=True)
    text = env.from_string((templates_dir() / CONFIG_TEMPLATE).read_text()).render(values)
    config = yaml.safe_load(text)
    config.update(ft.axolotl)
    # Seeds LoRA's init; a recipe's own plugins come first.
    config["plugins"] = [p for p in config.get("plugins") or [] if p != SEED_PLUGIN] + [SEED_PLUGIN]
    if ft.distributed.backend == "fsdp":
        config.setdefault("fsdp_config", {})["offload_params"] = False
    return config


def relocated_config(config: dict[str, Any], train_path: Path, work_dir: Path
                     ) -> dict[str, Any]:
    """The same training done elsewhere: rows read from train_path, prepared data and
    checkpoints under work_dir (render_config's places), every other value as it was."""
    moved = copy.deepcopy(config)
    moved["datasets"] = [{**d, "path": str(train_path)} for d in moved["datasets"]]
    moved["dataset_prepared_path"] = str(Path(work_dir) / "prepared")
    moved["output_dir"] = str(Path(work_dir) / "checkpoints")
    return moved


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


def _axolotl_keys() -> set[str]:
    with quiet_fds():
        from axolotl.utils.schemas.config import AxolotlInputConfig

    keys = set()
    for name, field in AxolotlInputConfig.model_fields.items():
        keys.add(name)
        if field.alias:
            keys.add(field.alias)
    return keys


def check_passthrough(recipe: Recipe, label: str) -> list[Problem]:
    """finetune.axolotl keys Axolotl would silently drop, or that the recipe already sets."""
    problems = []
    if not recipe.finetune.axolotl:
        return problems
    known = _axolotl_keys()
    for key in recipe.finetune.axolotl:
        path = f"finetune.axolotl.{key}"
        if key in OWNED_KEYS:
            problems.append(Problem(file=label, path=path, message=(
                "set by copa from the recipe: write it in the finetune section instead")))
        elif key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(Problem(file=label, path=path,
                                    message=f"not an Axolotl config key{hint}"))
    return problems


def validate_config(config: dict[str, Any], label: str) -> None:
    """Run Axolotl's own validation on a rendered config; raise RecipeError on failure."""
    from pydantic import ValidationError

    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    with quiet_fds():
        from axolotl.utils.config import validate_config as axolotl_validate
        from axolotl.utils.dict import DictDefault

    try:
        axolotl_validate(DictDefault(copy.deepcopy(config)))
    except ValidationError as exc:
        problems = [Problem(file=label, path="finetune (axolotl: "
                            + ".".join(str(p) for p in e["loc"]) + ")", message=e["msg"])
                    for e in exc.errors()]
        raise RecipeError(problems) from None
    except (ValueError, TypeError) as exc:
        raise RecipeError([Problem(file=label, path="finetune",
                                   message=f"Axolotl rejects the config: {exc}")]) from None


def checked_config(recipe: Recipe, base_model: str, train_path: Path, work_dir: Path,
                   hardware: Hardware | None = None, label: str | None = None,
                   validate: bool = True) -> dict[str, Any]:
    """The Axolotl config for training `base_model` on the rows at train_path, checked as
    every copa config is (finetune.axolotl keys, then Axolotl's own validation)."""
    config = render_config(recipe, base_model, train_path, work_dir,
                           hardware or Hardware.detect())
    if validate:
        label = label or (str(recipe.source_path) if recipe.source_path else "<recipe>")
        problems = check_passthrough(recipe, label)
        if problems:
            raise RecipeError(problems)
        validate_config(config, label)
    return config


def steps_for(recipe: Recipe, train_rows: int) -> int:
    """How many optimizer steps training will take (for progress ETA and checkpoints)."""
    ft = recipe.finetune
    if ft.max_steps:
        return ft.max_steps
    per_step = ft.micro_batch_size * ft.gradient_accumulation_steps
    per_epoch = max(1, -(-train_rows // per_step))
    return max(1, int(per_epoch * (ft.num_epochs or 1)))


def write_config(config: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False, width=100))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Strict conditional numerical reproducibility: MKL picks the same float32 kernels whatever
    # the buffers' alignment or the batch size (as for inference, copa.inference.local), and is no
    # slower here (docs/performance.md). Not what made same-seed runs differ: that was LoRA's
    # unseeded init (SEED_PLUGIN).
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


# Set by copa.track around the train stage: {"uri", "experiment", "run_id"} of its MLflow run.
TRACK_ENV = "COPA_MLFLOW_TRAIN"


def tracked_config(config: dict[str, Any], config_path: Path, work_dir: Path,
                   env: dict[str, str]) -> Path:
    """With tracking on, Axolotl's own MLflow integration logs the training curves: its keys
    (mlflow_tracking_uri, mlflow_experiment_name) go into a copy of the config, and the stage's
    MLflow run id into the trainer's environment (MLFLOW_RUN_ID: HF's MLflowCallback resumes
    that run instead of starting its own). The rendered config, and the train key, stay as they
    were. Tracking off: the rendered config itself."""
    raw = env.pop(TRACK_ENV, None)
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
