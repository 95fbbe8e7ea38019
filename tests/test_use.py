"""Using what a run built: copa.load, copa predict, copa serve (a real uvicorn server on loopback,
real HTTP) and copa export, on one finished tiny run (real Axolotl training and DSPy, tiny
model). The fast tests at the end check the val rule and the input checks on plain data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import write_stub_model, write_tiny_recipe

from copa.data import read_jsonl

REPO = Path(__file__).resolve().parent.parent
FIELDS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
STARTUP_S = 300.0  # loading torch, dspy and the model on a shared CPU
slow = pytest.mark.slow  # they share one real tiny run (Axolotl training: minutes)


@pytest.fixture(scope="module")
def varied_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny Llama with larger random weights: it answers each input with different words
    (at the usual init scale it answers every input with newlines), so comparing answers
    between predict, serve and load compares something."""
    import torch
    import transformers

    out = tmp_path_factory.mktemp("varied-llama")
    config = transformers.AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, varied_model_dir: Path) -> Path:
    from copa import pipeline

    folder = tmp_path_factory.mktemp("use-run")
    recipe = write_tiny_recipe(folder, varied_model_dir)
    return pipeline.run(recipe, run_dir=folder / "run", emit=lambda _: None).dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, finished_run: Path) -> Path:
    """An export of a copy of the run, whose run directory is then deleted."""
    from copa.use.export import export

    scratch = tmp_path_factory.mktemp("export")
    copy = scratch / "run-copy"
    shutil.copytree(finished_run, copy)
    out = export(copy, scratch / "exported", emit=lambda _: None)
    shutil.rmtree(copy)
    return out


def iris_rows(n: int) -> list[dict[str, Any]]:
    """n Iris rows as numbers (not the run's formatted strings), gold label included."""
    from copa.data.sources import iris_rows as all_iris_rows

    return all_iris_rows()[:n]


@slow
def test_load_answers_with_the_arm_best_on_val(finished_run: Path) -> None:
    import copa

    report = json.loads((finished_run / "report.json").read_text())
    val = report["val"]
    assert set(val["scores"]) == {"baseline", "prompt_only", "finetune_only", "combined"}
    assert val["best_arm"] == max(val["scores"], key=lambda a: (
        val["scores"][a], -val["demos"][a], ["baseline", "prompt_only", "finetune_only",
                                             "combined"].index(a)))
    program = copa.load(str(finished_run))
    assert program.arm == val["best_arm"]
    # The evaluate stage's own test predictions for that arm, from the loaded program.
    expected = read_jsonl(finished_run / "predictions" / f"{program.arm}.jsonl")[:4]
    got = [program(**row["inputs"]).species for row in expected]
    assert got == [row["prediction"] for row in expected]
    assert len(set(got)) > 1  # the varied model: answers that can differ
    # Numbers are formatted as the training data's were ("5.5", from 5.5 or "5.50").
    first = {k: float(v) for k, v in expected[0]["inputs"].items()}
    assert program(**first).species == expected[0]["prediction"]
    padded = {k: f"{v:.2f}" for k, v in first.items()}
    assert [program(**padded).species, program(**first).species] == [
        expected[0]["prediction"]] * 2
    baseline = copa.load(str(finished_run), arm="baseline")
    rows = read_jsonl(finished_run / "predictions" / "baseline.jsonl")[:3]
    assert [baseline(**r["inputs"]).species for r in rows] == [r["prediction"] for r in rows]
    with pytest.raises(TypeError, match="missing petal_width"):
        program(**{k: v for k, v in first.items() if k != "petal_width"})


@slow
def test_load_refuses_an_unfinished_run(finished_run: Path, tmp_path: Path) -> None:
    import copa
    from copa.use.bundle import NotFinished

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    manifest = json.loads((finished_run / "manifest.json").read_text())
    manifest["stages"]["evaluate"]["status"] = "running"
    (unfinished / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NotFinished, match=r"not finished \(evaluate: running\)"):
        copa.load(str(unfinished))
    with pytest.raises(NotFinished, match="neither a copa run directory"):
        copa.load(str(tmp_path))


@slow
def test_a_stage_that_runs_again_leaves_the_stages_after_it_unfinished(finished_run: Path,
                                                                        tmp_path: Path) -> None:
    """merge re-run alone (`copa merge --force`): the program and report that were scored on
    the old merged model are not this run's any more. copa.load, copa report and copa compare
    say so (evaluate: stale) instead of pairing the new weights with the old numbers."""
    import copa
    from copa import pipeline
    from copa.cli import cli
    from copa.use.bundle import NotFinished

    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, symlinks=True)
    recipe = json.loads((copy / "manifest.json").read_text())["recipe"]
    pipeline.run(recipe, run_dir=copy, stages=["merge"], force=["merge"], emit=lambda _: None)
    stages = json.loads((copy / "manifest.json").read_text())["stages"]
    assert stages["merge"]["status"] == "done"
    assert {s: stages[s]["status"] for s in ("optimize", "evaluate")} == {
        "optimize": "stale", "evaluate": "stale"}
    said = r"not finished \(evaluate: stale \(merge ran again since\)\)"
    with pytest.raises(NotFinished, match=said):
        copa.load(str(copy))
    for args in (["report", str(copy)], ["compare", str(finished_run), str(copy)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert "evaluate: stale (merge ran again since)" in result.output
    result = CliRunner().invoke(cli, ["report", str(finished_run)])
    assert result.exit_code == 0 and "baseline" in result.output  # a finished run: its table


@slow
def test_a_forced_render_of_the_same_rows_trains_nothing_again(tmp_path: Path,
                                                               varied_model_dir: Path) -> None:
    """render re-run by --force makes every later stage stale while it runs; each whose key
    comes out unchanged (it hashes render's files) is done again as it was: no training. (In
    place: a copied run's rendered config names other folders, a new train key.)"""
    import copa
    from copa import pipeline

    recipe = write_tiny_recipe(tmp_path, varied_model_dir)
    copy = pipeline.run(recipe, run_dir=tmp_path / "run", emit=lambda _: None).dir
    messages: list[str] = []
    pipeline.run(recipe, run_dir=copy, force=["render"], emit=messages.append)
    assert "[render] running" in messages
    for stage in ("train", "merge", "optimize", "evaluate"):
        assert f"[{stage}] unchanged, skipped" in messages, messages
    stages = json.loads((copy / "manifest.json").read_text())["stages"]
    assert all(entry["status"] == "done" and "stale_since" not in entry
               for entry in stages.values())
    assert copa.load(str(copy)).arm


def run_cli(*args: str) -> Any:
    from copa.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@slow
def test_predict_writes_one_row_per_input_in_order(finished_run: Path, tmp_path: Path) -> None:
    rows = read_jsonl(finished_run / "predictions" / "combined.jsonl")
    source = tmp_path / "rows.csv"
    header = ["id", *FIELDS, "species"]
    lines = [",".join(header)] + [",".join([str(i), *(r["inputs"][f] for f in FIELDS),
                                            r["gold"]]) for i, r in enumerate(rows)]
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    result = run_cli("predict", str(finished_run), "--input", str(source), "-o", str(out),
                     "--arm", "combined")
    assert result.exit_code == 0, result.output
    written = read_jsonl(out)
    assert [w["id"] for w in written] == [str(i) for i in range(len(rows))]
    assert [w["species"] for w in written] == [r["gold"] for r in rows]  # input kept as is
    assert [w["prediction"]["species"] for w in written] == [r["prediction"] for r in rows]
    assert all(w["error"] is None for w in written)


@slow
def test_predict_refuses_a_missing_column_with_exit_2(finished_run: Path,
                                                      tmp_path: Path) -> None:
    source = tmp_path / "rows.csv"
    source.write_text("sepal_length,sepal_width,petal_len\n5.1,3.5,1.4\n")
    result = run_cli("predict", str(finished_run), "--input", str(source))
    assert result.exit_code == 2
    assert "missing column(s) petal_length, petal_width" in result.output
    assert "columns present: sepal_length, sepal_width, petal_len" in result.output


@slow
def test_predict_reports_a_failed_row_in_its_row(finished_run: Path, tmp_path: Path) -> None:
    rows = [dict(zip(FIELDS, (5.1, 3.5, 1.4, 0.2))), dict(zip(FIELDS[:3], (6.7, 3.0, 5.2))),
            dict(zip(FIELDS, (5.9, 3.0, 4.2, 1.5)))]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    result = run_cli("predict", str(finished_run), "-i", str(source), "-o", str(out))
    assert result.exit_code == 0, result.output
    written = read_jsonl(out)
    assert len(written) == 3
    assert written[1]["prediction"] is None and "petal_width" in written[1]["error"]
    assert written[0]["error"] is None and written[2]["error"] is None
    assert "3 rows predicted" in result.output and "1 failed" in result.output


@slow
def test_export_is_self_contained(exported: Path, finished_run: Path) -> None:
    info = json.loads((exported / "copa-export.json").read_text())
    assert info["arm"] == info["val"]["best_arm"]
    model = exported / "model"
    assert list(model.glob("*.safetensors")) and (model / "tokenizer.json").is_file()
    assert (model / "chat_template.jinja").is_file() or "chat_template" in (
        model / "tokenizer_config.json").read_text()
    program = json.loads((exported / "program.json").read_text())
    assert "dependency_versions" in program["metadata"]  # DSPy's own save format
    used = json.loads((finished_run / "recipe.json").read_text())
    assert (exported / "template.jinja").read_text() == used["template"]
    assert "{% block user -%}" in used["template"]
    card = (exported / "README.md").read_text()
    for label in ("baseline (base model", "prompt-only", "fine-tune-only", "combined (merged"):
        assert label in card
    assert "| arm | test score | 95% CI |" in card
    assert "## Licenses" in card and "Iris (R. A. Fisher, 1936)" in card
    assert f"copa serve {exported.name}" in card


@slow
def test_export_loads_from_another_directory_without_the_run(exported: Path,
                                                             finished_run: Path,
                                                             tmp_path: Path) -> None:
    info = json.loads((exported / "copa-export.json").read_text())
    expected = read_jsonl(finished_run / "predictions" / f"{info['arm']}.jsonl")[:3]
    code = ("import copa, json, sys\n"
            f"program = copa.load({str(exported)!r})\n"
            f"rows = {[r['inputs'] for r in expected]!r}\n"
            "print(json.dumps([program(**r).species for r in rows]))\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [
        r["prediction"] for r in expected]


def _http(method: str, url: str, body: dict | None = None,
          token: str | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def served(exported: Path, tmp_path_factory: pytest.TempPathFactory):
    """`copa serve` on the export, from another working directory, with a bearer token."""
    from copa.inference.servers import free_port

    port, token = free_port(), "s3cret-token"
    cwd = tmp_path_factory.mktemp("serve-cwd")
    log = open(cwd / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "copa.cli", "serve", str(exported),
                             "--port", str(port)], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO), "COPA_API_KEY": token})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_S
        while True:
            try:
                if _http("GET", f"{url}/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"copa serve did not come up: {(cwd / 'serve.log').read_text()}")
            time.sleep(0.5)
        yield url, token
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


@slow
def test_serve_answers_health_and_predict(served, exported: Path) -> None:
    url, token = served
    status, health = _http("GET", f"{url}/health")
    info = json.loads((exported / "copa-export.json").read_text())
    assert status == 200 and health["status"] == "ok" and health["arm"] == info["arm"]
    assert health["inputs"] == FIELDS and health["outputs"] == ["species"]
    row = dict(zip(FIELDS, (5.1, 3.5, 1.4, 0.2)))
    status, answer = _http("POST", f"{url}/predict", row, token)
    assert status == 200 and set(answer) == {"species"}
    schema = _http("GET", f"{url}/openapi.json")[1]["components"]["schemas"]["PredictRequest"]
    assert schema["required"] == FIELDS and schema["additionalProperties"] is False


@slow
def test_serve_refuses_bad_input_and_a_missing_token(served) -> None:
    url, token = served
    row = dict(zip(FIELDS, (5.1, 3.5, 1.4, 0.2)))
    status, body = _http("POST", f"{url}/predict", row)
    assert status == 401
    status, body = _http("POST", f"{url}/predict", row, "wrong")
    assert status == 401
    missing = {k: v for k, v in row.items() if k != "petal_width"}
    status, body = _http("POST", f"{url}/predict", missing, token)
    assert status == 422
    assert body["message"].startswith("petal_width: missing")
    status, body = _http("POST", f"{url}/predict", {**row, "petal_colour": "blue"}, token)
    assert status == 422 and "petal_colour: not an input field" in body["message"]
    status, body = _http("POST", f"{url}/predict", {**row, "sepal_length": None}, token)
    assert status == 422
    assert body["message"].startswith("sepal_length: must be a string or a number (got None)")


@slow
def test_serve_answers_32_concurrent_requests_as_predict_does(served, finished_run: Path,
                                                              tmp_path: Path) -> None:
    url, token = served
    rows = iris_rows(32)
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    result = run_cli("predict", str(finished_run), "-i", str(source), "-o", str(out))
    assert result.exit_code == 0, result.output
    predicted = [w["prediction"]["species"] for w in read_jsonl(out)]
    before = _http("GET", f"{url}/health")[1]["engine"]
    inputs = [{f: r[f] for f in FIELDS} for r in rows]
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(lambda r: _http("POST", f"{url}/predict", r, token), inputs))
    assert [status for status, _ in answers] == [200] * 32
    assert [body["species"] for _, body in answers] == predicted
    assert len(set(predicted)) > 1
    after = _http("GET", f"{url}/health")[1]["engine"]
    assert after["requests"] - before["requests"] == 32
    assert after["largest_batch"] > 1  # concurrent requests met in one engine batch


# --- fast: the val rule and the input checks, on plain data ------------------------------------

def test_best_arm_is_chosen_on_val_with_ties_to_fewer_demos() -> None:
    from copa.stages.val import best_arm, val_scores_from_optimize

    optimize = {"prompt_only": {"winner": "optimized",
                                "val_scores": {"plain": 0.4, "optimized": 0.5}},
                "combined": {"winner": "plain", "val_scores": {"plain": 0.9, "optimized": 0.8}}}
    scores = val_scores_from_optimize(optimize)
    assert scores == {"baseline": 0.4, "prompt_only": 0.5, "finetune_only": 0.9,
                      "combined": 0.9}
    assert best_arm(scores) == "combined"
    assert best_arm(scores, {"combined": 3}) == "finetune_only"
    assert best_arm({"baseline": 0.7, "combined": None}) == "baseline"
    assert val_scores_from_optimize({"prompt_only": {"winner": "plain", "val_scores": {}}}) == {}


def test_open_bundle_picks_the_val_winner_not_the_test_winner(tmp_path: Path) -> None:
    """A run whose test scores favour baseline and val scores favour fine-tune-only: best is
    fine-tune-only. (A run directory written as the stages write it; no model is loaded.)"""
    from copa.use.bundle import NotFinished, open_bundle

    recipe = write_tiny_recipe(tmp_path / "recipe", tmp_path / "no-model-is-loaded")
    run = tmp_path / "run"
    write_stub_model(run / "merged")
    (run / "manifest.json").write_text(json.dumps(
        {"recipe": str(recipe), "stages": {"evaluate": {"status": "done"}}}))
    arms = {"baseline": 0.9, "finetune_only": 0.2}
    (run / "report.json").write_text(json.dumps({
        "metric": "exact_match", "test_rows": 9,
        "arms": {a: {"score": s, "ci95": [s, s], "n": 9} for a, s in arms.items()},
        "val": {"scores": {"baseline": 0.1, "finetune_only": 0.8},
                "best_arm": "finetune_only"}}))
    bundle = open_bundle(run)
    assert (bundle.arm, bundle.model_role) == ("finetune_only", "merged")
    assert bundle.model_path == str((run / "merged").resolve())
    assert bundle.program_path is None  # the plain program
    with pytest.raises(NotFinished, match="arm 'combined' has no result"):
        open_bundle(run, "combined")


def test_columns_are_checked_against_the_signature() -> None:
    from copa.use.predict import InputError, check_columns

    rows = [{"sentence": "hi", "id": 1}]
    assert check_columns(rows, ["text"], {"text": "sentence"}, "f.csv") == {"text": "sentence"}
    with pytest.raises(InputError, match="missing column"):
        check_columns(rows, ["text"], {}, "f.csv")
    with pytest.raises(InputError, match="would be overwritten"):
        check_columns([{"text": "a", "prediction": "x"}], ["text"], {}, "f.csv")


def test_predict_input_is_read_as_data_is(tmp_path: Path) -> None:
    """copa predict reads its input with the data reader: a repeated header name, a ragged row
    or a lone surrogate is refused (exit 2), and its own output (raw U+2028 in a string) reads
    back."""
    from copa.data import write_jsonl
    from copa.use.predict import InputError, read_rows

    (tmp_path / "dup.csv").write_text("text,text\na,b\n")
    with pytest.raises(InputError, match="dup.csv: line 1: column 'text' is named twice"):
        read_rows(tmp_path / "dup.csv")
    (tmp_path / "ragged.csv").write_text("text,id\na,1\nb\n")
    with pytest.raises(InputError, match=r"ragged.csv: row 2 \(line 3\) has 1 cell where"):
        read_rows(tmp_path / "ragged.csv")
    (tmp_path / "surrogate.jsonl").write_text('{"text": "a"}\n{"text": "\\ud800"}\n')
    with pytest.raises(InputError, match="surrogate.jsonl: line 2: text: a lone surrogate"):
        read_rows(tmp_path / "surrogate.jsonl")
    rows = [{"text": "a\u2028b", "prediction": {"label": "x\x85y"}, "error": None}]
    write_jsonl(tmp_path / "out.jsonl", rows)
    assert read_rows(tmp_path / "out.jsonl") == rows


def test_a_server_key_is_never_written_down(tmp_path: Path) -> None:
    from copa.recipe import load_recipe, recipe_read_back, recipe_to_write
    from copa.use.export import shareable_recipe

    recipe_file = write_tiny_recipe(tmp_path, tmp_path / "model", extra=(
        "serve: {engine: openai, api_base: 'http://127.0.0.1:9/v1', api_key: sk-secret, "
        "models: {base: b, merged: m}}\n"))
    recipe = load_recipe(recipe_file)
    written = recipe_to_write(recipe)
    assert "sk-secret" not in json.dumps(written)
    assert "sk-secret" not in json.dumps(shareable_recipe(recipe, "template.jinja"))
    back = recipe_read_back(written, {"COPA_SERVER_API_KEY": "sk-secret"})
    assert back["serve"]["api_key"] == "sk-secret"


def test_predict_gives_a_null_or_list_input_its_own_row_error(tmp_path: Path) -> None:
    """A JSON input row whose field is null or a list: that row fails with why (it went to the
    model as "" or as the list's Python repr); the other rows are answered."""
    from contextlib import ExitStack
    from types import SimpleNamespace

    from copa.use.load import LoadedProgram
    from copa.use.predict import predict_rows

    bundle = SimpleNamespace(input_fields=["text"], output_fields=["label"],
                             recipe=SimpleNamespace(prompt=SimpleNamespace(number_format=None)))
    seen = []

    def program(**inputs: Any) -> Any:
        seen.append(inputs["text"])
        return SimpleNamespace(label="pos")

    loaded = LoadedProgram(bundle, program, None, None, ExitStack())  # type: ignore[arg-type]
    rows = [{"text": "fine"}, {"text": None}, {"text": ["a", "b"]}, {"text": 7}]
    out = predict_rows(loaded, rows, {"text": "text"}, threads=1)
    assert [r["error"] for r in out] == [
        None, "row 2: TypeError: text is null: give it one text or number",
        "row 3: TypeError: text is a list: give it one text or number", None]
    assert seen == ["fine", "7"] and out[0]["prediction"] == {"label": "pos"}


def test_predict_and_load_refuse_a_number_that_is_not_finite(tmp_path: Path) -> None:
    """NaN, Infinity and 1e400 (inf) in a JSON input row: its row fails naming the row and the
    field, as copa serve refuses it (one check); copa.load refuses it; the output is strict
    JSON (null, never the bare NaN / Infinity Python's json writes)."""
    from contextlib import ExitStack
    from types import SimpleNamespace

    from copa.use.limits import InputRefused
    from copa.use.load import LoadedProgram
    from copa.use.predict import output_line, predict_rows, read_rows

    bundle = SimpleNamespace(input_fields=["x"], output_fields=["label"],
                             recipe=SimpleNamespace(prompt=SimpleNamespace(number_format=".1f")))
    seen = []

    def program(**inputs: Any) -> Any:
        seen.append(inputs["x"])
        return SimpleNamespace(label="pos")

    loaded = LoadedProgram(bundle, program, None, None, ExitStack())  # type: ignore[arg-type]
    (tmp_path / "rows.jsonl").write_text('{"x": 1.25}\n{"x": NaN}\n{"x": Infinity}\n'
                                         '{"x": 1e400}\n{"x": 2, "extra": -Infinity}\n')
    out = predict_rows(loaded, read_rows(tmp_path / "rows.jsonl"), {"x": "x"}, threads=1)
    refused = "x: not a finite number (NaN, Infinity or past the float range)"
    assert [r["error"] for r in out] == [None, f"row 2: {refused}", f"row 3: {refused}",
                                         f"row 4: {refused}", None]
    assert seen == ["1.2", "2.0"]

    def no_constants(token: str) -> None:
        raise AssertionError(f"{token} is not JSON")

    lines = [json.loads(output_line(r), parse_constant=no_constants) for r in out]
    assert [line["x"] for line in lines] == [1.25, None, None, None, 2]
    assert lines[4]["extra"] is None and lines[4]["prediction"] == {"label": "pos"}
    with pytest.raises(InputRefused, match=refused.replace("(", r"\(").replace(")", r"\)")):
        loaded(x=float("nan"))


def _finished_run_with_a_program(tmp_path: Path) -> Path:
    """A run directory as the stages leave it, its combined arm best (a saved program, the
    merged model), with a stub model: whatever is refused before a model loads is refused on
    it."""
    recipe = write_tiny_recipe(tmp_path / "recipe", tmp_path / "no-model-is-loaded")
    run = tmp_path / "run"
    write_stub_model(run / "merged")
    (run / "merged" / "chat_template.jinja").write_text("{{ messages }}")  # export wants one
    (run / "optimize").mkdir()
    (run / "optimize" / "program_combined.json").write_text(json.dumps(
        {"predict": {"demos": [], "signature": {"instructions": "Classify."}}}, indent=1))
    (run / "manifest.json").write_text(json.dumps(
        {"recipe": str(recipe), "stages": {"evaluate": {"status": "done"}}}))
    (run / "report.json").write_text(json.dumps({
        "metric": "exact_match", "test_rows": 9,
        "arms": {a: {"score": s, "ci95": [s, s], "n": 9} for a, s in (("baseline", 0.5),
                                                                       ("combined", 0.9))},
        "val": {"scores": {"baseline": 0.4, "combined": 0.8}, "best_arm": "combined"}}))
    return run


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


RUN_DAMAGES = [
    ("manifest.json", lambda p: p.write_text("[]"), "damaged, holds an array where copa wrote"),
    ("recipe.json", lambda p: p.write_text('{"template": "x"}'), "damaged, no 'recipe'"),
    ("report.json", Path.unlink, "missing: re-run `copa evaluate RECIPE --force`"),
    ("report.json", lambda p: p.write_text('{"arms": {"combined": null}, "metric": "m", '
                                           '"test_rows": 9}'),
     "damaged, arm 'combined' is not an object"),
    ("report.json", lambda p: p.write_text('{"arms": {}, "metric": "m"}'),
     "damaged, no 'test_rows'"),
    ("optimize/program_combined.json", _truncate, "damaged, not valid JSON"),
    ("merged/model.safetensors", Path.unlink, "has no model weights"),
    ("merged/model.safetensors", _truncate, "damaged, truncated (81 bytes where its header "
                                            "needs 86)"),
]


@pytest.mark.parametrize("name, damage, expected", RUN_DAMAGES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(RUN_DAMAGES)])
def test_a_damaged_run_is_one_line_naming_the_file_before_a_model_loads(
        tmp_path: Path, name: str, damage: Any, expected: str) -> None:
    from copa.use.bundle import open_bundle

    run = _finished_run_with_a_program(tmp_path)
    assert open_bundle(run).arm == "combined"  # whole, it opens
    damage(run / name)
    rows = tmp_path / "rows.csv"
    rows.write_text(",".join(FIELDS) + "\n5.1,3.5,1.4,0.2\n")
    result = run_cli("predict", str(run), "-i", str(rows))
    output = result.output.strip()
    assert result.exit_code == 2 and len(output.splitlines()) == 1, output
    named = run / ("merged" if expected == "has no model weights" else name)
    assert output.startswith(f"{named.resolve()}") and expected in output, output


@pytest.mark.parametrize("name, damage, expected", [
    ("copa-export.json", lambda p: p.write_text('{"format": 1}'), "damaged, no 'arm'"),
    ("program.json", _truncate, "damaged, not valid JSON"),
    ("report.json", lambda p: p.write_text("[1]"), "damaged, holds an array"),
], ids=["manifest", "program", "report"])
def test_a_damaged_export_is_one_line_naming_the_file(tmp_path: Path, name: str, damage: Any,
                                                      expected: str) -> None:
    from copa.use.bundle import open_bundle
    from copa.use.export import export

    out = export(_finished_run_with_a_program(tmp_path), tmp_path / "exported",
                 emit=lambda _: None)
    assert open_bundle(out).arm == "combined"
    damage(out / name)
    result = run_cli("predict", str(out), "-i", str(tmp_path / "rows.csv"))
    output = result.output.strip()
    assert result.exit_code == 2 and len(output.splitlines()) == 1, output
    assert output.startswith(str((out / name).resolve())) and expected in output, output


def test_predict_never_writes_over_its_input(tmp_path: Path) -> None:
    """-o naming the -i file (as written, through "..", or a hard link to it): refused before
    any work, exit 2, the input untouched."""
    import os

    run = _finished_run_with_a_program(tmp_path)
    rows = tmp_path / "rows.csv"
    rows.write_text(",".join(FIELDS) + "\n5.1,3.5,1.4,0.2\n")
    os.link(rows, tmp_path / "linked.csv")
    for output in (rows, tmp_path / "recipe" / ".." / "rows.csv", tmp_path / "linked.csv"):
        result = run_cli("predict", str(run), "-i", str(rows), "-o", str(output))
        assert result.exit_code == 2, result.output
        assert result.output.strip() == (f"{output}: is the input file (-i {rows}); predictions "
                                         "would overwrite it: give -o another file")
        assert rows.read_text() == ",".join(FIELDS) + "\n5.1,3.5,1.4,0.2\n"


def test_predict_says_which_file_names_it_reads(tmp_path: Path) -> None:
    """predict has no data.format: an unknown extension is told with the ones it reads."""
    from copa.use.predict import InputError, read_rows

    (tmp_path / "rows.txt").write_text("x\n1\n")
    with pytest.raises(InputError) as refused:
        read_rows(tmp_path / "rows.txt")
    assert str(refused.value) == (
        f"{tmp_path / 'rows.txt'}: cannot tell the format of 'rows.txt': rename it to end in "
        ".csv, .tsv, .jsonl, .ndjson, .json or .parquet, whichever it holds")


def test_a_model_folder_without_weights_is_one_line_where_it_loads(tmp_path: Path,
                                                                   tiny_model_dir: Path) -> None:
    """Past the checks (the weights went after `copa validate`), transformers' OSError with no
    file name is one line naming the folder, exit 2; an OSError of copa's own with no file
    name is still one line, exit 1, with how to see the traceback."""
    import click

    from copa.cli_errors import errors
    from copa.inference.local import LocalModel
    from copa.models import ModelFolderError

    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelFolderError, match=f"^{folder}: the model does not load from this "
                                               "folder .*no file named model.safetensors"):
        LocalModel(str(folder))

    @click.command()
    @click.argument("kind")
    @errors
    def fails(kind: str) -> None:
        if kind == "model":
            LocalModel(str(folder))
        raise OSError("copa's own")

    result = CliRunner().invoke(fails, ["model"])
    assert result.exit_code == 2 and result.output.strip().startswith(f"{folder}: the model"), \
        result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    result = CliRunner().invoke(fails, ["own"])
    assert (result.exit_code, result.output.strip()) == (1, "error: OSError: copa's own (run "
                                                            "with --debug for the traceback)")


def test_export_refuses_a_folder_inside_the_arms_model(tmp_path: Path) -> None:
    """The baseline arm's model is the base model's own folder: an export into it became part
    of the model, so every later export of that arm copied it (export inside export)."""
    from types import SimpleNamespace

    from copa.use.export import ExportRefused, check_destination

    model = tmp_path / "base-model"
    model.mkdir()
    bundle = SimpleNamespace(root=tmp_path / "run", model_path=str(model), arm="baseline")
    for inside in (model / "exported", model / "a" / "b"):
        with pytest.raises(ExportRefused, match="is inside the baseline arm's model folder"):
            check_destination(inside, bundle)  # type: ignore[arg-type]
    assert check_destination(tmp_path / "elsewhere", bundle) == tmp_path / "elsewhere"
    hub = SimpleNamespace(root=tmp_path / "run", model_path="org/name", arm="baseline")
    assert check_destination(tmp_path / "x", hub) == tmp_path / "x"  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base-model"]


@pytest.mark.parametrize("path, arm, error, message", [
    (None, "best", TypeError, "path must be a run directory or export folder (a str or Path), "
                              "not NoneType"),
    (b"runs/x", "best", TypeError, "not bytes"),
    ("{run}", None, TypeError, "arm must be a str (best, baseline,"),
    ("{run}", ["combined"], TypeError, "arm must be a str"),
    ("{tmp}/loop", "best", "NotFinished", "{tmp}/loop: a symbolic link that loops back to itself"),
    ("{tmp}/loop/run", "best", "NotFinished", "not a usable path"),
    ("{tmp}/gone", "best", "NotFinished", "{tmp}/gone: a symbolic link to {tmp}/nowhere, which "
                                          "does not exist"),
    ("x" * 5000, "best", "NotFinished", "not a usable path (File name too long)"),
    ("a\0b", "best", "NotFinished", "not a usable path (embedded null byte)"),
    ("  ", "best", "NotFinished", "path '  ' is empty: give a run directory"),
], ids=["none", "bytes", "arm-none", "arm-list", "loop", "inside-a-loop", "dangling", "long",
        "nul", "blank"])
def test_load_names_a_path_or_arm_it_cannot_take(tmp_path: Path, path: Any, arm: Any,
                                                 error: Any, message: str) -> None:
    """copa.load's arguments as a Python caller may pass them: the wrong type is a TypeError
    naming the argument (it was pathlib's 'expected str, bytes or os.PathLike object'), a path
    that loops or cannot be a path is NotFinished naming it (a symlink loop was RuntimeError,
    'copa predict' exit 1)."""
    import re

    import copa
    from copa.use.bundle import NotFinished

    run = _finished_run_with_a_program(tmp_path)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    fill = {"run": str(run), "tmp": str(tmp_path)}
    path = path.format(**fill) if isinstance(path, str) and "{" in path else path
    expected = NotFinished if error == "NotFinished" else error
    with pytest.raises(expected, match=re.escape(message.format(**fill))):
        copa.load(path, arm=arm)
