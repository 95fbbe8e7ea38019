"""Training progress as the training process reports it: JSON lines written by the plugin's
TrainerCallback (copa.backends.axolotl_plugin.ProgressFile), read here while training runs:
each logging step, and each val evaluation (finetune.eval).

On a terminal a tqdm bar shows step, loss, learning rate and ETA; elsewhere (logs, tests, CI)
each logging step is one line through `emit`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Emit = Callable[[str], None]
PROGRESS_ENV = "COPA_PROGRESS_FILE"  # where the training process writes its events


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def eval_line(event: dict[str, Any]) -> str:
    """A finetune.eval evaluation as the progress display shows it."""
    score, best = 100 * event["score"], event.get("best_score")
    text = f"  val at step {event['step']}: {score:.1f}"
    if best is not None:
        text += f"  (best {100 * best:.1f} at step {event.get('best_step')})"
    if event.get("stop"):
        text += f"  no gain for {event.get('since_best')} evaluations: stopping"
    return text


class TrainingProgress:
    """Follows a progress file in a thread: `with TrainingProgress(path, emit, total): train()`.

    `events` keeps every record read, so a caller (or a test) can see what training reported.
    """

    POLL_S = 0.5

    def __init__(self, path: Path, emit: Emit, total_steps: int | None = None,
                 live: bool | None = None) -> None:
        self.path, self.emit, self.total = Path(path), emit, total_steps
        self.live = sys.stderr.isatty() if live is None else live
        self.events: list[dict[str, Any]] = []
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="copa-train-progress",
                                        daemon=True)
        self._bar: Any = None
        self._first_step: int | None = None
        self._start = time.time()

    def __enter__(self) -> TrainingProgress:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")  # this training's events only
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._read()  # whatever arrived after the last poll
        if self._bar is not None:
            self._bar.close()

    def _follow(self) -> None:
        while not self._stop.wait(self.POLL_S):
            self._read()

    def _read(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return
        complete = chunk[:chunk.rfind("\n") + 1]  # a line being written waits for next time
        self._offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            if line.strip():
                self._show(json.loads(line))

    def _say(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            self.emit(text)

    def _show(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        total = event.get("max_steps") or self.total
        step = int(event.get("step") or 0)
        if event["event"] == "begin":
            self._first_step, self._start = step, time.time()
            if self.live:
                from tqdm import tqdm

                self._bar = tqdm(total=total, initial=step, desc="  training", unit="step",
                                 dynamic_ncols=True)
            return
        if event["event"] == "eval":
            self._say(eval_line(event))
            return
        if event["event"] != "step":
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=_loss(event.get("loss")),
                                  lr=f"{event.get('learning_rate', 0):.2e}")
            return
        first = self._first_step or 0
        eta = ""
        if total and step > first:
            remaining = max(0, total - step) * (time.time() - self._start) / (step - first)
            eta = f"  eta {remaining:4.0f}s"
        of = f"/{total}" if total else ""
        lr = event.get("learning_rate")
        lr_text = f"  lr {lr:.2e}" if isinstance(lr, (int, float)) else ""
        self.emit(f"  step {step}{of}  loss {_loss(event.get('loss'))}{lr_text}  "
                  f"epoch {event.get('epoch') or 0:.2f}{eta}")
