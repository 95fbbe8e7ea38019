"""A run's predictions/<arm>.jsonl: one JSON object per test row, {"inputs": {...}, "gold":
..., "prediction": ..., "score": <number>} (and "error": true for a failed call). Written by
the evaluate stage; read back, checked, by everything that uses them (the stage's cache, the
HTML report, copa compare, a study's aggregate, the GGUF round trip): one writer, one reader."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from copa.files import DamagedFile, jsonl_lines, missing_file_reason, sha256_json
from copa.registry import ARMS


def write_predictions(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """An arm's rows (PREDICTION_KEYS and prediction), written whole or not at all."""
    from copa.data import write_jsonl

    write_jsonl(path, rows)


class PredictionsError(DamagedFile):
    """A run's predictions/<arm>.jsonl (or the report.json naming them) is not as copa writes
    it (cut short, edited by hand): one line naming the file and line (the CLI exits 2)."""


PREDICTION_KEYS = ("inputs", "gold", "score")  # what every row of predictions/<arm>.jsonl has


def finite_number(value: Any) -> bool:
    """A score as JSON holds one: a finite int or float (not true/false, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def row_key(row: Mapping[str, Any]) -> str:
    """A test row's identity: its inputs and gold answer (not its prediction or score)."""
    return sha256_json([row.get("inputs"), row.get("gold")])


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """An arm's predictions/<arm>.jsonl as _score_on_test writes it, checked line by line: a
    JSON object with inputs (a mapping), gold and a finite number as score. The one reader of
    these files (compare, the study's aggregate, the HTML report, the cache): a file cut
    mid-line or a hand-edited score is a PredictionsError naming file and line, never a
    traceback or a silently wrong mean."""
    reason = missing_file_reason(Path(path))
    if reason:
        raise PredictionsError(f"{path}: {'missing' if reason == 'no such file' else reason}: "
                               "an arm's per-row scores (re-run `copa evaluate` on the run)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PredictionsError(f"{path}: not UTF-8 text: not a predictions file as copa "
                               "writes it (re-run `copa evaluate`)") from None
    rows = []
    for number, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except ValueError:
            raise PredictionsError(f"{where}: not a JSON line (the file was cut short or "
                                   "edited; re-run `copa evaluate`)") from None
        if not isinstance(row, dict):
            raise PredictionsError(f"{where}: not a JSON object (re-run `copa evaluate`)")
        missing = [k for k in PREDICTION_KEYS if k not in row]
        if missing:
            raise PredictionsError(f"{where}: no {', '.join(missing)} (a predictions row has "
                                   f"{', '.join(PREDICTION_KEYS)}; re-run `copa evaluate`)")
        if not isinstance(row["inputs"], dict):
            raise PredictionsError(f"{where}: inputs is not a mapping (re-run `copa evaluate`)")
        score = row["score"]
        if not finite_number(score):
            raise PredictionsError(f"{where}: score {json.dumps(score)} is not a finite number "
                                   "(re-run `copa evaluate`)")
        rows.append(row)
    return rows


def read_scored_arms(run_dir: Path, report: Any) -> dict[str, list[dict[str, Any]]]:
    """Per arm of report.json that scored (failed arms left out), its checked predictions;
    every arm must hold the rows its report counts (arms' `n`) and the same test rows as the
    others (by row_key): an arm cut at a line boundary would otherwise pair wrong rows."""
    report_path = Path(run_dir) / "report.json"
    arms = report.get("arms") if isinstance(report, dict) else None
    if not isinstance(arms, dict) or not all(isinstance(d, dict) for d in arms.values()):
        raise PredictionsError(f"{report_path}: no 'arms' mapping: not a report copa wrote "
                               "(re-run `copa evaluate`)")
    unknown = [a for a in arms if a not in ARMS]  # an arm names a file: only copa's own
    if unknown:
        raise PredictionsError(f"{report_path}: arms: {unknown[0]!r} is not an arm of copa's "
                               f"({', '.join(ARMS)}): not a report copa wrote")
    out: dict[str, list[dict[str, Any]]] = {}
    first: tuple[Path, Counter[str]] | None = None
    for arm, data in arms.items():
        if data.get("failed"):
            continue
        path = Path(run_dir) / "predictions" / f"{arm}.jsonl"
        rows = read_predictions(path)
        counted = data.get("n")
        if isinstance(counted, int) and not isinstance(counted, bool) and counted != len(rows):
            raise PredictionsError(f"{path}: {len(rows)} rows, but {report_path} scored the "
                                   f"arm on {counted}: the file was cut short or edited (re-run "
                                   "`copa evaluate`)")
        keys = Counter(row_key(r) for r in rows)
        if first is None:
            first = (path, keys)
        elif keys != first[1]:
            raise PredictionsError(f"{path}: its test rows differ from {first[0].name}'s "
                                   f"({len(rows)} vs {first[1].total()} rows): every arm is "
                                   "scored on the same rows (re-run `copa evaluate`)")
        out[arm] = rows
    return out
