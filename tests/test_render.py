"""`copa render`: the files, Axolotl's own validation, determinism, and scale-out rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import FIXTURE_SPLITS

from copa.backends import Hardware
from copa.backends.axolotl import launch_command
from copa.backends.axolotl_config import render_config
from copa.cli import cli
from copa.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_shipped_recipe_validates(recipe: Path) -> None:
    # Recipes on Banking77 / GSM8K read COPA_DATA = tests/fixtures/data (conftest), which holds
    # fewer rows than their splits ask for: validate them at sizes the fixtures hold.
    sizes = FIXTURE_SPLITS.get(recipe.stem)
    extra = ["--set", f"data.splits={json.dumps(sizes)}"] if sizes else []
    result = CliRunner().invoke(cli, ["validate", str(recipe), *extra])
    assert result.exit_code == 0, result.output
    assert ": ok (" in result.output


def test_init_writes_a_recipe_that_validates(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(cli, ["init", "starter"]).exit_code == 0
    result = runner.invoke(cli, ["validate", "starter.yaml"])
    assert result.exit_code == 0, result.output


def test_init_given_a_file_name_writes_that_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`copa init my-task.yaml` wrote my-task.yaml.yaml, a recipe named 'my-task.yaml'."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["init", "my-task.yaml"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-task.yaml"]
    assert yaml.safe_load((tmp_path / "my-task.yaml").read_text())["name"] == "my-task"
    assert CliRunner().invoke(cli, ["init", "other.yml"]).exit_code == 0  # the file as typed
    assert yaml.safe_load((tmp_path / "other.yml").read_text())["name"] == "other"


def test_render_iris_writes_valid_files_deterministically(tmp_path: Path) -> None:
    runner = CliRunner()
    outputs = []
    for _ in range(2):
        out = tmp_path / "same"
        result = runner.invoke(cli, ["render", str(REPO / "recipes" / "iris.yaml"), "-o",
                                     str(out)])
        assert result.exit_code == 0, result.output
        outputs.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*"))
                        if p.is_file()})
    assert outputs[0] == outputs[1]  # byte-identical
    files = {str(p) for p in outputs[0]}
    assert {"axolotl.yml", "train.jsonl", "val.jsonl", "prompt_preview.txt",
            "splits/train.jsonl", "splits/val.jsonl", "splits/test.jsonl"} <= files
    config = yaml.safe_load(outputs[0][Path("axolotl.yml")])
    assert config["datasets"][0]["type"] == "chat_template"
    assert config["datasets"][0]["message_field_training"] == "training"
    assert config["lora_mlp_kernel"] is False  # CPU switches
    assert config["plugins"] == ["copa.backends.axolotl_plugin.CopaPlugin"]
    preview = outputs[0][Path("prompt_preview.txt")].decode()
    assert preview.count("--- assistant ---") == 2


def test_passthrough_typos_are_caught_before_axolotl_drops_them(tmp_path: Path) -> None:
    recipe = (REPO / "recipes" / "iris.yaml").read_text().replace(
        "  seed: 0\n\noptimize", "  seed: 0\n  axolotl: {gradient_checkpointng: true}\n\noptimize")
    path = tmp_path / "iris.yaml"
    path.write_text(recipe)
    result = CliRunner().invoke(cli, ["validate", "--full", str(path)])
    assert result.exit_code == 2
    assert ("finetune.axolotl.gradient_checkpointng: not an Axolotl config key "
            "(did you mean 'gradient_checkpointing'?)") in result.output


@pytest.mark.parametrize("sequence_len, says", [
    (16, "finetune.sequence_len: every training row is longer than 16 tokens"),
    (87, "training rows are longer than finetune.sequence_len (87 tokens; longest 88)"),
])
def test_rows_longer_than_sequence_len_are_reported_before_axolotl_drops_them(
        tmp_path: Path, sequence_len: int, says: str) -> None:
    """Iris rows are 87 or 88 tokens: at 16 none fits (an error naming the key and a length
    that fits), at 87 some do not (a warning with the count; rendering goes on)."""
    text = (REPO / "recipes" / "iris.yaml").read_text()
    assert "  sequence_len: 256\n" in text
    path = tmp_path / "iris.yaml"
    path.write_text(text.replace("  sequence_len: 256\n", f"  sequence_len: {sequence_len}\n"))
    result = CliRunner().invoke(cli, ["render", str(path), "-o", str(tmp_path / "out")])
    assert says in result.output
    assert result.exit_code == (2 if sequence_len == 16 else 0), result.output
    assert (tmp_path / "out" / "axolotl.yml").is_file() == (sequence_len != 16)
    if sequence_len == 16:
        assert "write sequence_len: 128" in result.output


@pytest.mark.parametrize("max_tokens, says", [
    (1, "evaluate.max_tokens: 1 is too few tokens for the answer the model must write in 149 "
        "of 149 rows: the longest, 'virginica', is 3 tokens in the model's tokenizer"),
    (2, "evaluate.max_tokens: 2 is too few tokens for the answer the model must write in 99 "
        "of 149 rows"),
    (3, None),
])
def test_answers_longer_than_evaluate_max_tokens_are_refused_before_training(
        tmp_path: Path, max_tokens: int, says: str | None) -> None:
    """SmolLM2 writes setosa in 2 tokens, versicolor and virginica in 3: with fewer, every
    generation (arms, optimizer, finetune.eval) is cut before the label ends and scores 0."""
    result = CliRunner().invoke(cli, ["render", str(REPO / "recipes" / "iris.yaml"), "-o",
                                      str(tmp_path / "out"), "--set",
                                      f"evaluate.max_tokens={max_tokens}"])
    if says is None:
        assert result.exit_code == 0, result.output
        return
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2, result.output
    assert last.startswith(str(REPO / "recipes" / "iris.yaml")) and says in last, last
    assert last.endswith("write max_tokens: 3 or more"), last


@pytest.mark.parametrize("max_tokens, code, says", [
    (8, 2, "evaluate.max_tokens: 8 is too few tokens for the answer the model must write in 24 "
           "of 24 rows: the longest, 'reasoning: \\nanswer: 116' without its reasoning, is 11 "
           "tokens"),
    (12, 0, "warning: 24 of 24 gold answers with their reasoning are longer than "
            "evaluate.max_tokens (12 tokens; longest 39)"),
])
def test_chain_of_thought_needs_room_for_the_answer_line_not_the_gold_reasoning(
        tmp_path: Path, max_tokens: int, code: int, says: str) -> None:
    """GSM8K's model writes 'reasoning: ...\\nanswer: N': the parser needs the answer line
    (refused without room for it), and reasoning of the model's own length (a gold rationale
    longer than max_tokens is only a warning)."""
    sizes = json.dumps(FIXTURE_SPLITS["gsm8k"])
    result = CliRunner().invoke(cli, ["render", str(REPO / "recipes" / "gsm8k.yaml"), "-o",
                                      str(tmp_path / "out"), "--set", f"data.splits={sizes}",
                                      "--set", f"evaluate.max_tokens={max_tokens}"])
    assert result.exit_code == code, result.output
    assert says in result.output, result.output


def test_chain_of_thought_without_fine_tuning_renders(tmp_path: Path) -> None:
    """A chain-of-thought recipe with finetune.enabled: false (the prompt half only) renders:
    GSM8K keeps its worked solutions (labeled demos show them) and its training rows, and a
    recipe whose data has no reasoning column renders no training rows and previews prompts
    only (both ended in "example lacks output field(s) ['reasoning']", exit 2)."""
    sizes = json.dumps(FIXTURE_SPLITS["gsm8k"])
    out = tmp_path / "gsm8k"
    result = CliRunner().invoke(cli, ["render", str(REPO / "recipes" / "gsm8k.yaml"), "-o",
                                      str(out), "--set", f"data.splits={sizes}",
                                      "--set", "finetune.enabled=false"])
    assert result.exit_code == 0, result.output
    train = [json.loads(line) for line in (out / "splits" / "train.jsonl").open()]
    assert all(row["reasoning"] for row in train)
    assert (out / "train.jsonl").read_text().count("\n") == len(train)
    text = (REPO / "recipes" / "iris.yaml").read_text().replace(
        "  module: predict\n", "  module: chain_of_thought\n", 1).replace(
        "finetune:\n", "finetune:\n  enabled: false\n", 1)
    recipe = tmp_path / "iris_cot.yaml"
    recipe.write_text(text)
    for demos in ("none", "{k: [1, 2], pick: random}"):  # none, or drawn for every row
        out = tmp_path / f"iris-{len(demos)}"
        result = CliRunner().invoke(cli, ["render", str(recipe), "-o", str(out), "--set",
                                          "evaluate.max_tokens=64", "--set",
                                          f"finetune.demos={demos}"])
        assert result.exit_code == 0, result.output
        assert (out / "train.jsonl").read_text() == ""
        preview = (out / "prompt_preview.txt").read_text()
        assert "--- user ---" in preview and "--- assistant ---" not in preview


def test_no_tokenizer_skips_the_answer_check_only_where_nothing_trains(tmp_path: Path) -> None:
    from copa.recipe import RecipeError
    from copa.stages.render import load_tokenizer

    recipe = load_recipe(REPO / "recipes" / "iris.yaml")
    said: list[str] = []
    with pytest.raises(RecipeError, match="model.base: cannot load the tokenizer"):
        load_tokenizer(str(tmp_path / "none"), recipe, said.append)
    recipe.finetune.enabled = False  # a model only a server runs
    assert load_tokenizer(str(tmp_path / "none"), recipe, said.append) is None
    assert said and "answers are not checked against evaluate.max_tokens" in said[0]


def _recipe_with(tmp_path: Path, distributed: str) -> object:
    text = (REPO / "recipes" / "iris.yaml").read_text().replace(
        "  seed: 0\n\noptimize", f"  seed: 0\n  distributed: {distributed}\n\noptimize")
    path = tmp_path / "iris.yaml"
    path.write_text(text)
    return load_recipe(path)


def test_cpu_training_forks_no_dataloader_worker(tmp_path: Path) -> None:
    """Axolotl's default is one dataloader worker, forked each epoch from the trainer, which then
    grows toward a second copy of the trainer's memory (two ~6 GB processes for a 40-row
    Banking77 training). What Axolotl hands the trainer on CPU has none."""
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    recipe = load_recipe(REPO / "recipes" / "iris.yaml")
    config = render_config(recipe, "/models/x", tmp_path / "t.jsonl", tmp_path,
                           Hardware(cuda=False))
    trainer_config = validate_config(DictDefault(config))
    assert trainer_config.dataloader_num_workers == 0
    assert not trainer_config.dataloader_pin_memory


def test_cuda_renders_qlora_bf16_and_flash_attention(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / "iris.yaml")
    config = render_config(recipe, "/models/x", tmp_path / "t.jsonl", tmp_path,
                           Hardware(cuda=True, gpus=1, flash_attention=True))
    assert config["adapter"] == "qlora" and config["load_in_4bit"] is True
    assert config["bf16"] == "auto" and config["flash_attention"] is True
    assert "lora_mlp_kernel" not in config


def test_deepspeed_scale_out_renders_axolotl_keys_and_launcher(tmp_path: Path) -> None:
    recipe = _recipe_with(tmp_path, "{processes: 4, backend: deepspeed, zero_stage: 3}")
    config = render_config(recipe, "/m", tmp_path / "t.jsonl", tmp_path, Hardware(cuda=True))
    assert config["deepspeed"].endswith("deepspeed/zero3.json")
    assert Path(config["deepspeed"]).is_file()
    cmd = launch_command(recipe, tmp_path / "axolotl.yml")
    assert cmd[-3:] == ["accelerate", "--", "--num_processes=4"]


def test_fsdp_with_torchrun(tmp_path: Path) -> None:
    recipe = _recipe_with(tmp_path, "{processes: 2, backend: fsdp, launcher: torchrun}")
    config = render_config(recipe, "/m", tmp_path / "t.jsonl", tmp_path, Hardware(cuda=True))
    assert config["fsdp_version"] == 2 and "fsdp_config" in config
    assert launch_command(recipe, tmp_path / "a.yml")[-1] == "--nproc_per_node=2"


def test_single_process_uses_the_python_launcher(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / "iris.yaml")
    assert launch_command(recipe, tmp_path / "a.yml")[-2:] == ["--launcher", "python"]


def test_render_keeps_gold_as_the_data_writes_it_from_a_cr_only_csv(tmp_path: Path) -> None:
    """An old Mac CSV (rows end in \\r) with number_format: the weights are shown as '.1f', the
    gold counts stay '4' (they were '4.0'), and a misspelt filter label stops render with
    exit 2, one line naming the key."""
    rows = [f"how many items in box {i},{i * 1.25},{i % 5}" for i in range(20)]
    (tmp_path / "count.csv").write_bytes("\r".join(["question,weight,answer", *rows, ""])
                                         .encode())
    path = tmp_path / "count.yaml"
    path.write_text("name: count\nmodel: {base: smollm2-135m-instruct}\n"
                    "task: {signature: 'question, weight -> answer'}\n"
                    "data: {source: count.csv, splits: {train: 10, val: 5, test: 5}}\n"
                    "prompt: {number_format: '.1f'}\nevaluate: {max_tokens: 8}\n")
    result = CliRunner().invoke(cli, ["render", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for split in ("train", "val", "test") for line in
               (tmp_path / "out" / "splits" / f"{split}.jsonl").read_text().splitlines()]
    assert {r["answer"] for r in written} == {"0", "1", "2", "3", "4"}
    assert {r["weight"] for r in written if r["question"].endswith(" 3")} == {"3.8"}
    result = CliRunner().invoke(cli, ["render", str(path), "-o", str(tmp_path / "typo"),
                                      "--set", 'data.filter_labels=["0", "1", "2", "3", "44"]'])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].endswith(
        "data.filter_labels: no row has the label '44' (did you mean '4'?)")
    assert not (tmp_path / "typo").exists()
