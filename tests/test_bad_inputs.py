"""Malformed and hostile inputs: each is rejected by `copa validate` with exit 2 and one line per
problem naming the file and the key, never a traceback.

Each case starts from a small valid recipe and changes one thing. Read a case as: "a recipe with
<change> makes copa say <expected>".
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from copa.cli import cli

REPO = Path(__file__).resolve().parent.parent

BASE: dict[str, Any] = {
    "name": "bad",
    "model": {"base": "smollm2-135m-instruct"},
    "task": {"signature": "text -> label", "instructions": "Classify.",
             "choices": ["pos", "neg"]},
    "data": {"source": "data.jsonl", "splits": {"train": 6, "val": 2, "test": 2}},
    "prompt": {"template": "prompts/default.jinja"},
    "finetune": {"num_epochs": 1},
    "evaluate": {"metric": "label_accuracy"},
}

ROWS = [{"text": f"row {i}", "label": "pos" if i % 2 else "neg"} for i in range(12)]

GOOD_TEMPLATE = ("{% block system %}{{ instructions }}{% endblock %}"
                 "{% block user %}{{ text }}{% endblock %}"
                 "{% block assistant %}{{ label }}{% endblock %}")


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def _delete(tree: dict[str, Any], dotted: str) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        tree = tree[key]
    del tree[keys[-1]]


# (case id, {"set": {dotted: value}, "delete": [...], "raw": text, "files": {name: content}},
#  expected substring of the message, which must name the key path)
CASES: list[tuple[str, dict[str, Any], str]] = [
    # --- typos and unknown keys
    ("typo-lora_r", {"set": {"finetune.lora_rr": 8}},
     "finetune.lora_rr: unknown key (did you mean 'lora_r'?)"),
    ("typo-learning_rate", {"set": {"finetune.learnin_rate": 1e-4}},
     "finetune.learnin_rate: unknown key (did you mean 'learning_rate'?)"),
    ("typo-section", {"set": {"finetun": {"lora_r": 8}}},
     "finetun: unknown key (did you mean 'finetune'?)"),
    ("typo-task-key", {"set": {"task.signatur": "a -> b"}},
     "task.signatur: unknown key (did you mean 'signature'?)"),
    ("typo-splits", {"set": {"data.splits.tran": 5}},
     "data.splits.tran: unknown key (did you mean 'train'?)"),
    ("unknown-evaluate-key", {"set": {"evaluate.arm": ["baseline"]}},
     "evaluate.arm: unknown key (did you mean 'arms'?)"),
    ("unknown-model-key", {"set": {"model.trust_remote": True}},
     "model.trust_remote: unknown key (did you mean 'trust_remote_code'?)"),
    # --- other trainers' names for a key (no spelling distance to copa's)
    ("other-name-lr", {"set": {"finetune.lr": 1e-4}},
     "finetune.lr: unknown key (did you mean 'learning_rate'?)"),
    ("other-name-epochs", {"set": {"finetune.epochs": 2}},
     "finetune.epochs: unknown key (did you mean 'num_epochs'?)"),
    ("other-name-batch_size", {"set": {"finetune.batch_size": 8}},
     "finetune.batch_size: unknown key (did you mean 'micro_batch_size'?)"),
    ("other-name-max_seq_length", {"set": {"finetune.max_seq_length": 256}},
     "finetune.max_seq_length: unknown key (did you mean 'sequence_len'?)"),
    ("other-name-model_name", {"set": {"model.model_name": "x"}},
     "model.model_name: unknown key (did you mean 'base'?)"),
    # --- wrong types
    ("lr-string", {"set": {"finetune.learning_rate": "fast"}}, "finetune.learning_rate:"),
    ("batch-list", {"set": {"finetune.micro_batch_size": [8]}}, "finetune.micro_batch_size:"),
    ("choices-string", {"set": {"task.choices": "pos,neg"}}, "task.choices:"),
    ("splits-string", {"set": {"data.splits": "80/10/10"}}, "data.splits:"),
    ("name-number-list", {"set": {"name": ["a"]}}, "name:"),
    ("epochs-bool-string", {"set": {"finetune.num_epochs": "many"}}, "finetune.num_epochs:"),
    # --- bad values
    ("lr-zero", {"set": {"finetune.learning_rate": 0}}, "finetune.learning_rate: must be > 0"),
    ("lr-negative", {"set": {"finetune.learning_rate": -1}},
     "finetune.learning_rate: must be > 0"),
    ("batch-zero", {"set": {"finetune.micro_batch_size": 0}},
     "finetune.micro_batch_size: must be at least 1"),
    ("grad-accum-zero", {"set": {"finetune.gradient_accumulation_steps": 0}},
     "finetune.gradient_accumulation_steps: must be at least 1"),
    ("qlora-without-4bit", {"set": {"finetune.adapter": "qlora", "finetune.load_in_4bit": False}},
     "finetune: adapter 'qlora' needs 4-bit loading"),
    ("lora-with-4bit", {"set": {"finetune.adapter": "lora", "finetune.load_in_4bit": True}},
     "finetune: 'load_in_4bit: true' with 'adapter: lora' is QLoRA"),
    ("adapter-unknown", {"set": {"finetune.adapter": "dora"}}, "finetune.adapter:"),
    ("dropout-one", {"set": {"finetune.lora_dropout": 1.5}}, "finetune.lora_dropout: must be in"),
    ("no-epochs-no-steps", {"set": {"finetune.num_epochs": None}},
     "finetune: set num_epochs or max_steps"),
    ("seq-len-tiny", {"set": {"finetune.sequence_len": 4}}, "finetune.sequence_len:"),
    ("signature-no-arrow", {"set": {"task.signature": "text label"}},
     "task.signature: write it as 'input1, input2 -> output'"),
    ("signature-bad-field", {"set": {"task.signature": "text -> 1label"}},
     "task.signature: field name '1label' is not an identifier"),
    ("signature-duplicate", {"set": {"task.signature": "text -> text"}},
     "task.signature: field names must be unique"),
    ("signature-empty-field", {"set": {"task.signature": "text,, context -> label"}},
     "task.signature: 'text,, context': an empty field between commas"),
    ("signature-trailing-comma", {"set": {"task.signature": "text -> label,"}},
     "task.signature: 'label,': an empty field between commas"),
    ("module-unknown", {"set": {"task.module": "react!"}}, "task.module:"),
    ("one-choice", {"set": {"task.choices": ["pos"]}}, "task.choices: needs at least two"),
    ("choices-by-case", {"set": {"task.choices": ["pos", "neg", "Pos"]}},
     "task.choices: 'pos' and 'Pos' are one label to the scorer"),
    ("choices-by-punctuation", {"set": {"task.choices": ["pos", "neg", "neg."]}},
     "task.choices: 'neg' and 'neg.' are one label to the scorer"),
    ("metric-unknown", {"set": {"evaluate.metric": "bleu"}}, "evaluate.metric: unknown metric"),
    ("arm-unknown", {"set": {"evaluate.arms": ["baseline", "magic"]}}, "evaluate.arms[1]:"),
    ("arms-empty", {"set": {"evaluate.arms": []}}, "evaluate.arms: name at least one arm"),
    ("order-unknown", {"set": {"optimize.order": "p->p"}}, "optimize.order:"),
    ("optimizer-name-code", {"set": {"optimize.optimizer": "__import__('os')"}},
     "optimize.optimizer:"),
    ("split-negative", {"set": {"data.splits.train": -3}}, "data.splits.train: must be > 0"),
    ("split-one-point-zero", {"set": {"data.splits.train": 1.0}},
     "data.splits.train: 1.0 reads as one row"),
    ("name-path", {"set": {"name": "../../etc"}}, "name: use letters"),
    ("missing-task", {"delete": ["task"]}, "task: required key is missing"),
    ("missing-signature", {"delete": ["task.signature"]}, "task.signature: required key"),
    ("missing-data-source", {"delete": ["data.source"]}, "data.source: required key"),
    ("env-unset", {"set": {"data.source": "${COPA_TEST_SURELY_UNSET}/x.csv"}},
     "data.source: environment variable COPA_TEST_SURELY_UNSET is not set"),
    # --- files the recipe names
    ("missing-data-file", {"set": {"data.source": "nope.csv"}}, "data.source: no such file"),
    ("missing-column", {"set": {"data.columns": {"text": "sentence"}}},
     "data.columns.text: field 'text' maps to column 'sentence', which the data lacks; "
     "columns present: text, label"),
    ("column-not-a-field", {"set": {"data.columns": {"txt": "text"}}},
     "data.columns.txt: 'txt' is not a field of the signature"),
    ("label-not-in-choices", {"set": {"task.choices": ["pos", "neutral"]}},
     "task.choices: 1 label value(s) in data.source are not among the choices: 'neg'"),
    ("too-many-rows", {"set": {"data.splits.train": 500}},
     "data.splits: asks for 504 rows"),
    ("binary-data", {"set": {"data.source": "blob.csv"},
                     "files": {"blob.csv": b"\x00\x01\x02binary\x00"}},
     "data.source: blob.csv: looks like a binary file"),
    ("non-utf8-data", {"set": {"data.source": "latin.csv"},
                       "files": {"latin.csv": "text,label\ncaf\xe9,pos\n".encode("latin-1")}},
     "data.source: latin.csv: not UTF-8 text"),
    ("empty-data", {"set": {"data.source": "empty.jsonl"}, "files": {"empty.jsonl": ""}},
     "data.source: no rows in the data"),
    ("bad-jsonl", {"set": {"data.source": "bad.jsonl"}, "files": {"bad.jsonl": "{not json}\n"}},
     "data.source: bad.jsonl: line 1: invalid JSON"),
    ("huge-data", {"set": {"data.source": "data.jsonl", "data.max_file_mb": 0}},
     "data.source: data.jsonl: file is 0 MB, over data.max_file_mb=0"),
    ("unknown-extension", {"set": {"data.source": "data.xyz"}, "files": {"data.xyz": "a"}},
     "data.source: data.xyz: cannot tell the format"),
    ("data-source-device", {"set": {"data.source": "/dev/zero"}},
     "data.source: /dev/zero: not a regular file (a character device)"),
    ("data-source-directory", {"set": {"data.source": "."}},
     "data.source: .: not a regular file (a directory)"),
    # the hint named data.source on a line about data.test_source
    ("test-source-directory", {"set": {"data.test_source": "."}},
     "data.test_source: .: not a regular file (a directory); point it at a CSV, JSONL"),
    ("template-device", {"set": {"prompt.template": "/dev/zero"}},
     "prompt.template: /dev/zero: not a regular file (a character device), not a template"),
    ("missing-template", {"set": {"prompt.template": "prompts/none.jinja"}},
     "prompt.template: template file not found"),
    ("missing-model-dir", {"set": {"model.base": "./no-such-model.gguf"}},
     "model.base: no such GGUF file"),
    ("model-nonsense", {"set": {"model.base": "not a model"}}, "model.base: 'not a model' is"),
    # offline (conftest sets HF_HUB_OFFLINE), a hub id must be in the local cache already
    ("model-hub-id-not-cached", {"set": {"model.base": "nosuch-org/nosuch-model"}},
     "model.base: 'nosuch-org/nosuch-model' is not in the local Hugging Face cache"),
    ("model-folder-config-not-json", {"set": {"model.base": "./broken-model"},
                                      "files": {"broken-model/config.json": "{not json"}},
     "model.base: the model folder's config.json is not valid JSON"),
    # weights: none there, or one cut short (header says 16 bytes of data, none follow)
    ("model-folder-without-weights", {"set": {"model.base": "./no-weights"},
                                      "files": {"no-weights/config.json": "{}"}},
     "no-weights has no model weights (model.safetensors or pytorch_model.bin)"),
    ("model-folder-weights-cut-short", {"set": {"model.base": "./cut"}, "files": {
        "cut/config.json": "{}", "cut/model.safetensors": "\x3e" + "\x00" * 7 +
        '{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'}},
     "cut/model.safetensors: damaged, truncated (70 bytes where its header needs 86)"),
    # --- the user's own code, imported by validate (module names unique per case: one process)
    ("user-metric-no-such-function",
     {"set": {"evaluate.metric": "case_metrics_a:f1"},
      "files": {"case_metrics_a.py": "def accuracy(example, prediction, trace=None):\n"
                                     "    return 1.0\n"}},
     "evaluate.metric: cannot import 'case_metrics_a:f1': module 'case_metrics_a'"),
    ("user-metric-no-such-module", {"set": {"evaluate.metric": "case_no_such_module:f1"}},
     "evaluate.metric: cannot import 'case_no_such_module:f1': ModuleNotFoundError"),
    ("user-metric-not-callable",
     {"set": {"evaluate.metric": "case_metrics_b:THRESHOLD"},
      "files": {"case_metrics_b.py": "THRESHOLD = 0.5\n"}},
     "evaluate.metric: cannot import 'case_metrics_b:THRESHOLD': case_metrics_b:THRESHOLD is a "
     "float, not callable"),
    ("user-module-typo",
     {"set": {"task.module": "case_modules:MyModul"},
      "files": {"case_modules.py": "class MyModule:\n    pass\n"}},
     "task.module: cannot import 'case_modules:MyModul': module 'case_modules'"),
    ("user-optimizer-raises-on-import",
     {"set": {"optimize.optimizer": "case_optimizers:Mine"},
      "files": {"case_optimizers.py": "raise RuntimeError('boom')\n"}},
     "optimize.optimizer: cannot import 'case_optimizers:Mine': importing case_optimizers "
     "raised RuntimeError: boom"),
    # --- templates: syntax, undefined variables, sandbox escapes
    ("template-syntax", {"set": {"prompt.template": "t.jinja"},
                         "files": {"t.jinja": "{% block user %}{{ text }{% endblock %}"}},
     "prompt.template: line 1"),
    ("template-undefined", {"set": {"prompt.template": "t.jinja"},
                            "files": {"t.jinja": GOOD_TEMPLATE.replace("{{ text }}",
                                                                       "{{ txet }}")}},
     "prompt.template: block user: 'txet' is undefined"),
    ("template-no-blocks", {"set": {"prompt.template": "t.jinja"},
                            "files": {"t.jinja": "{{ text }}"}},
     "prompt.template: missing block(s) user, assistant"),
    ("template-globals", {"set": {"prompt.template": "t.jinja"},
                          "files": {"t.jinja": GOOD_TEMPLATE.replace(
                              "{{ text }}", "{{ cycler.__init__.__globals__.os }}")}},
     "prompt.template: block user:"),
    ("template-subclasses", {"set": {"prompt.template": "t.jinja"},
                             "files": {"t.jinja": GOOD_TEMPLATE.replace(
                                 "{{ text }}", "{{ ''.__class__.__mro__[1].__subclasses__() }}")}},
     "prompt.template: block user:"),
    ("template-mutation", {"set": {"prompt.template": "t.jinja"},
                           "files": {"t.jinja": GOOD_TEMPLATE.replace(
                               "{{ text }}", "{{ inputs.update({'x': 1}) }}")}},
     "prompt.template: block user: refused by the sandbox"),
    # a template's own arithmetic: computed while compiling it (a traceback), or huge
    ("template-huge-power", {"set": {"prompt.template": "t.jinja"},
                             "files": {"t.jinja": GOOD_TEMPLATE.replace(
                                 "{{ text }}", "{{ 2**20000 }}{{ text }}")}},
     "prompt.template: block user: refused by the sandbox: 2 ** 20000 is too large"),
    ("template-huge-repeat", {"set": {"prompt.template": "t.jinja"},
                              "files": {"t.jinja": GOOD_TEMPLATE.replace(
                                  "{{ text }}", "{{ 'x' * 2000000000 }}{{ text }}")}},
     "prompt.template: block user: refused by the sandbox: a repetition over 1000000"),
    ("template-nested-loops", {"set": {"prompt.template": "t.jinja"},
                               "files": {"t.jinja": GOOD_TEMPLATE.replace(
                                   "{{ text }}", "{% for i in range(100000) %}{% for j in "
                                   "range(100000) %}{% endfor %}{% endfor %}{{ text }}")}},
     "prompt.template: block user: refused by the sandbox: range() of 100000 items"),
    ("template-include", {"set": {"prompt.template": "t.jinja"},
                          "files": {"other.jinja": "{{ text }}",
                                    "t.jinja": GOOD_TEMPLATE.replace(
                                        "{{ text }}", "{% include 'other.jinja' %}")}},
     "prompt.template: line 1: {% include %} is not allowed: a prompt template is one file"),
    ("template-extends", {"set": {"prompt.template": "t.jinja"},
                          "files": {"base.jinja": GOOD_TEMPLATE,
                                    "t.jinja": "{% extends 'base.jinja' %}" + GOOD_TEMPLATE}},
     "prompt.template: line 1: {% extends %} is not allowed"),
    ("template-import", {"set": {"prompt.template": "t.jinja"},
                         "files": {"m.jinja": "{% macro f() %}x{% endmacro %}",
                                   "t.jinja": "{% from 'm.jinja' import f %}" + GOOD_TEMPLATE}},
     "prompt.template: line 1: {% import %} is not allowed"),
    ("template-binary", {"set": {"prompt.template": "t.jinja"},
                         "files": {"t.jinja": b"\xff\xfe\x00bad"}},
     "prompt.template: template is not UTF-8 text"),
    # --- the YAML itself
    ("yaml-syntax", {"raw": "name: x\ntask: [unclosed\n"}, "line"),
    ("yaml-not-mapping", {"raw": "- just\n- a list\n"}, "a recipe is a YAML mapping"),
    ("yaml-python-tag", {"raw": "name: !!python/object/apply:os.system ['echo pwned']\n"},
     "could not determine a constructor"),
    ("yaml-empty", {"raw": ""}, "a recipe is a YAML mapping"),
]

# Round 2 (issue 26): recipes that exhaust the machine before any check, duplicate keys, numbers
# and names that validate but break training or evaluation later, data files that crash the
# readers. Each must be refused by `copa validate`, one line naming the file and key.
ALIAS_BOMB = "\n".join(
    ['a0: &a0 ["lol"]']
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    + ["name: bomb"]) + "\n"  # ~400 bytes; 9**9 strings once expanded
MAX_SEED = 2**32 - 1
CASES += [
    # --- YAML that costs work and memory before any check (copa.recipe.yamlread)
    ("yaml-alias-bomb", {"raw": ALIAS_BOMB}, "expands to more than 100000 values"),
    ("yaml-alias-bomb-in-axolotl",
     {"raw": "x: &x [a, a, a, a, a, a, a, a, a, a]\ny: &y [*x, *x, *x, *x, *x, *x, *x, *x, *x]\n"
             "z: &z [*y, *y, *y, *y, *y, *y, *y, *y, *y]\nw: &w [*z, *z, *z, *z, *z, *z, *z, *z]\n"
             "v: &v [*w, *w, *w, *w, *w, *w, *w, *w, *w]\nfinetune: {axolotl: {k: *v}}\n"},
     "expands to more than 100000 values"),
    ("yaml-recursive-alias", {"raw": "name: x\nfinetune:\n  axolotl: &a {loop: *a}\n"},
     "finetune.axolotl.loop: line 3: an alias refers to a node that contains it"),
    ("yaml-deep-nesting", {"raw": "name: " + "[" * 3000 + "]" * 3000 + "\n"},
     "nested more than 40 levels deep"),
    ("yaml-deep-mapping", {"raw": "finetune:\n  axolotl: " + "{a: " * 60 + "1" + "}" * 60 + "\n"},
     "nested more than 40 levels deep"),
    ("yaml-duplicate-key", {"raw": "name: dup\nfinetune:\n  lora_r: 8\n  num_epochs: 1\n"
                                   "  lora_r: 16\n"},
     "finetune.lora_r: line 5: duplicate key 'lora_r' (first on line 3)"),
    ("yaml-duplicate-section", {"raw": "name: a\ntask: {signature: 'a -> b'}\nname: b\n"},
     "name: line 3: duplicate key 'name' (first on line 1)"),
    ("yaml-huge-integer", {"raw": "name: x\nfinetune:\n  seed: " + "9" * 5000 + "\n"},
     "finetune.seed: line 3: integer of 5000 digits, over the 64-bit range"),
    ("yaml-lone-surrogate", {"raw": 'name: x\ntask:\n  instructions: "Classify \\ud800."\n'},
     "task.instructions: line 3: a lone surrogate (U+D800) is not text"),
    ("yaml-integer-past-64-bit", {"raw": f"name: x\nfinetune: {{max_steps: {2**64}}}\n"},
     "finetune.max_steps: line 2: integer of 20 digits, over the 64-bit range"),
    # --- numbers: finite, in range, with what to write instead
    ("seed-negative", {"set": {"finetune.seed": -1}},
     f"finetune.seed: must be a whole number from 0 to {MAX_SEED} (got -1)"),
    ("seed-too-large", {"set": {"finetune.seed": 2**40}}, "finetune.seed: must be a whole number"),
    ("split-seed-negative", {"set": {"data.splits.seed": -7}},
     f"data.splits.seed: must be a whole number from 0 to {MAX_SEED} (got -7)"),
    ("epochs-nan", {"set": {"finetune.num_epochs": float("nan")}},
     "finetune.num_epochs: must be a finite number of epochs"),
    ("epochs-infinite", {"set": {"finetune.num_epochs": float("inf")}},
     "finetune.num_epochs: must be a finite number of epochs"),
    ("lr-nan", {"set": {"finetune.learning_rate": float("nan")}},
     "finetune.learning_rate: must be a finite number in (0, 1] (got nan)"),
    ("lr-infinite", {"set": {"finetune.learning_rate": float("inf")}},
     "finetune.learning_rate: must be a finite number in (0, 1]"),
    ("lr-too-large", {"set": {"finetune.learning_rate": 5.0}},
     "finetune.learning_rate: must be a finite number in (0, 1] (got 5.0); a typical LoRA"),
    ("weight-decay-nan", {"set": {"finetune.weight_decay": float("nan")}},
     "finetune.weight_decay: must be a finite number"),
    ("grad-norm-infinite", {"set": {"finetune.max_grad_norm": float("inf")}},
     "finetune.max_grad_norm: must be a finite number"),
    ("optimizer-unknown", {"set": {"optimize.optimizer": "MIPROV2"}},
     "optimize.optimizer: DSPy has no optimizer named 'MIPROV2'"),
    ("optimizer-param-typo", {"set": {"optimize.params": {"max_bootstraped_demos": 2}}},
     "optimize.params: BootstrapFewShotWithRandomSearch takes none of ['max_bootstraped_demos']"),
    ("optimizer-param-of-another-optimizer",
     {"set": {"optimize.optimizer": "BootstrapFewShot", "optimize.params": {"auto": "light"}}},
     "optimize.params: BootstrapFewShot takes none of ['auto']"),
    ("optimizer-param-copa-sets", {"set": {"optimize.params": {"metric": "exact_match"}}},
     "optimize.params: metric is set by copa (from evaluate.metric): remove it here"),
    ("optimizer-param-a-model-by-name",
     {"set": {"optimize.optimizer": "MIPROv2", "optimize.params": {"prompt_model": "gpt-4o"}}},
     "optimize.params: prompt_model is set by copa (from optimize.proposer)"),
    ("optimizer-param-wrong-kind", {"set": {"optimize.params": {"max_bootstrapped_demos": "3"}}},
     "optimize.params: max_bootstrapped_demos: '3' is not a whole number (its default is 4)"),
    ("optimizer-param-flag-as-word",
     {"set": {"optimize.optimizer": "MIPROv2", "optimize.params": {"minibatch": "no"}}},
     "optimize.params: minibatch: 'no' is not true or false (its default is True)"),
    ("user-optimizer-not-a-class",
     {"set": {"optimize.optimizer": "case_optimizer_factory:make"},
      "files": {"case_optimizer_factory.py": "def make():\n    return None\n"}},
     "optimize.optimizer: 'case_optimizer_factory:make' is not a class"),
    ("optimizer-seed-negative", {"set": {"optimize.params": {"seed": -1}}},
     f"optimize.params: seed must be a whole number from 0 to {MAX_SEED} (got -1)"),
    ("max-steps-zero", {"set": {"finetune.max_steps": 0}},
     "finetune.max_steps: must be at least 1 (got 0); for no step limit leave it out"),
    ("max-steps-minus-one", {"set": {"finetune.max_steps": -1}},
     "finetune.max_steps: must be at least 1 (got -1)"),
    ("lora-rank-a-flag", {"set": {"finetune.lora_r": True}},
     "finetune.lora_r: true is a yes/no value; this key takes a number"),
    ("split-size-a-flag", {"set": {"data.splits.train": False}},
     "data.splits.train: false is a yes/no value; this key takes a number"),
    ("early-stopping-min-delta-infinite",
     {"set": {"finetune.eval": {"every": 2},
              "finetune.early_stopping": {"min_delta": float("inf")}}},
     "finetune.early_stopping.min_delta: must be a finite number"),
    ("guard-margin-nan", {"set": {"optimize.guard_margin": float("nan")}},
     "optimize.guard_margin: must be a finite number in [0, 1] (got nan)"),
    ("api-base-not-a-url", {"set": {"serve": {"engine": "openai", "api_base": "not a url at all",
                                              "model": "m"}, "finetune.enabled": False}},
     "serve.api_base: 'not a url at all' is not a server URL"),
    ("max-steps-huge", {"set": {"finetune.max_steps": 2**40}},
     "finetune.max_steps: must be a whole number from 1 to"),
    ("split-size-nan", {"set": {"data.splits.train": float("nan")}},
     "data.splits.train: must be a finite row count or fraction"),
    ("bootstrap-zero", {"set": {"evaluate.bootstrap": 0}},
     "evaluate.bootstrap: must be a whole number from 10 to 1000000 (got 0); 1000 resamples"),
    ("bootstrap-negative", {"set": {"evaluate.bootstrap": -100}}, "evaluate.bootstrap: must be"),
    ("eval-threads-zero", {"set": {"evaluate.num_threads": 0}},
     "evaluate.num_threads: must be a whole number from 1 to 256 (got 0)"),
    ("optimize-threads-huge", {"set": {"optimize.num_threads": 100000}},
     "optimize.num_threads: must be a whole number from 1 to 256"),
    ("answer-tokens-zero", {"set": {"evaluate.max_tokens": 0}},
     "evaluate.max_tokens: must be a whole number from 1 to"),
    ("optimizer-tokens-huge", {"set": {"optimize.max_tokens": 10**9}},
     "optimize.max_tokens: must be a whole number from 16 to"),
    ("seq-len-huge", {"set": {"finetune.sequence_len": 10**9}}, "finetune.sequence_len: must be"),
    ("processes-huge", {"set": {"finetune.distributed": {"processes": 10**6}}},
     "finetune.distributed.processes: must be a whole number from 1 to 1024"),
    ("serve-batch-zero", {"set": {"serve.max_batch_size": 0}},
     "serve.max_batch_size: must be a whole number from 1 to 1024"),
    ("serve-wait-nan", {"set": {"serve.batch_wait_ms": float("nan")}},
     "serve.batch_wait_ms: must be a finite number"),
    ("number-format-unknown", {"set": {"prompt.number_format": ".1q"}},
     "prompt.number_format: '.1q' is not a number format: write a Python format spec"),
    ("number-format-huge", {"set": {"prompt.number_format": ".100000000f"}},
     "prompt.number_format: '.100000000f': width and precision are at most 50"),
    ("number-format-int-only", {"set": {"prompt.number_format": "d"}},
     "prompt.number_format: 'd' is not a number format"),
    # --- signature field names: Python, pydantic, DSPy and the template's own variables
    ("field-python-keyword", {"set": {"task.signature": "class -> label"}},
     "task.signature: field name 'class' is a Python keyword: rename it"),
    ("field-soft-keyword", {"set": {"task.signature": "text -> match"}},
     "task.signature: field name 'match' is a Python keyword"),
    ("field-private", {"set": {"task.signature": "_text -> label"}},
     "task.signature: field name '_text' starts with '_'"),
    ("field-pydantic", {"set": {"task.signature": "model_input -> label"}},
     "task.signature: field name 'model_input' is in pydantic's reserved 'model_' namespace"),
    ("field-dspy-member", {"set": {"task.signature": "text -> keys"}},
     "task.signature: field name 'keys' is a member of DSPy's Example and Prediction"),
    ("field-typed", {"set": {"task.signature": "text -> label: int"}},
     "task.signature: 'label: int': copa's fields are text"),
    ("field-template-instructions", {"set": {"task.signature": "instructions -> label"}},
     "task.signature: field name 'instructions' is a variable the prompt template already has"),
    ("field-template-choices", {"set": {"task.signature": "text -> choices"}},
     "task.signature: field name 'choices' is a variable the prompt template already has"),
    ("field-template-inputs", {"set": {"task.signature": "inputs, text -> label"}},
     "task.signature: field name 'inputs' is a variable the prompt template already has"),
    # --- data files that crashed the readers
    ("csv-field-over-limit", {"set": {"data.source": "long.csv"},
                              "files": {"long.csv": "text,label\n" + "x" * 200_000 + ",pos\n"}},
     "data.source: long.csv: line 2: field larger than field limit"),
    ("json-nested-deep", {"set": {"data.source": "deep.json"},
                          "files": {"deep.json": "[" * 100_000 + "]" * 100_000}},
     "data.source: deep.json: JSON nested too deeply"),
    ("jsonl-nested-deep", {"set": {"data.source": "deep.jsonl"},
                           "files": {"deep.jsonl": '{"text": ' + "[" * 100_000 + "]" * 100_000
                                                   + "}\n"}},
     "data.source: deep.jsonl: line 1: JSON nested too deeply"),
    ("jsonl-huge-integer",
     {"set": {"data.source": "big.jsonl"},
      "files": {"big.jsonl": '{"text": ' + "7" * 6000 + ', "label": "pos"}\n'}},
     "data.source: big.jsonl: line 1: Exceeds the limit (4300 digits) for integer string"),
]

# Round 3: data whose rows a reader kept silently wrong. A table naming a column twice (the
# last one won), a CSV row with fewer cells (the rest empty) or more (the extra ones dropped).
CSV_HEAD = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS[:3])
CASES += [
    ("csv-repeated-header", {"set": {"data.source": "d.csv"},
                             "files": {"d.csv": "text,label,label\n" + "a,pos,neg\n" * 12}},
     "data.source: d.csv: line 1: column 'label' is named twice (columns 2 and 3): rename one"),
    ("tsv-repeated-header", {"set": {"data.source": "d.tsv"},
                             "files": {"d.tsv": "text\ttext\tlabel\n" + "a\tb\tpos\n" * 12}},
     "data.source: d.tsv: line 1: column 'text' is named twice (columns 1 and 2)"),
    ("csv-row-too-few-cells", {"set": {"data.source": "d.csv"},
                               "files": {"d.csv": CSV_HEAD + "only text\n" + CSV_HEAD[11:]}},
     "data.source: d.csv: row 4 (line 5) has 1 cell where the header has 2"),
    ("csv-row-too-many-cells", {"set": {"data.source": "d.csv"},
                                "files": {"d.csv": CSV_HEAD + "a, b,pos\n"}},
     "data.source: d.csv: row 4 (line 5) has 3 cells where the header has 2: quote a cell"),
    ("jsonl-repeated-key", {"set": {"data.source": "d.jsonl"},
                            "files": {"d.jsonl": '{"text": "a", "label": "pos"}\n{"text": '
                                                 '"b", "label": "pos", "label": "neg"}\n'}},
     "data.source: d.jsonl: line 2: an object names key 'label' twice: keep one"),
    ("json-repeated-key", {"set": {"data.source": "d.json"},
                           "files": {"d.json": '[{"text": "a", "text": "b", "label": "pos"}]'}},
     "data.source: d.json: an object names key 'text' twice"),
]


def _jsonl(changes: dict[int, dict[str, Any]], drop: dict[int, str] | None = None) -> str:
    """ROWS as JSONL, row n (from 1) updated with changes[n] and its key drop[n] left out."""
    rows = [dict(r) for r in ROWS]
    for n, change in changes.items():
        rows[n - 1].update(change)
    for n, key in (drop or {}).items():
        del rows[n - 1][key]
    return "".join(json.dumps(r) + "\n" for r in rows)


# A row without a value the recipe uses, or with a list / object where one text belongs: it
# became "" (or the list's Python repr) in the splits. Two fields on one column: the model saw
# its gold answer as input. A number past a float with number_format: an OverflowError.
CASES += [
    ("row-lacks-label", {"set": {"data.source": "d.jsonl"},
                         "files": {"d.jsonl": _jsonl({}, drop={5: "label"})}},
     "data.source: d.jsonl: row 5 lacks 'label'"),
    ("row-lacks-text", {"set": {"data.source": "d.jsonl"},
                        "files": {"d.jsonl": _jsonl({}, drop={1: "text", 9: "text"})}},
     "data.source: d.jsonl: row 1 lacks 'text' (and 1 more: row 9)"),
    ("row-label-null", {"set": {"data.source": "d.jsonl"},
                        "files": {"d.jsonl": _jsonl({3: {"label": None}})}},
     "data.source: d.jsonl: row 3 has null for 'label'"),
    ("row-text-null", {"set": {"data.source": "d.jsonl"},
                       "files": {"d.jsonl": _jsonl({2: {"text": None}})}},
     "data.source: d.jsonl: row 2 has null for 'text'"),
    ("row-text-list", {"set": {"data.source": "d.jsonl"},
                       "files": {"d.jsonl": _jsonl({4: {"text": ["a", "b"]}})}},
     "data.source: d.jsonl: row 4 has a list for 'text', where one text or number belongs"),
    ("row-label-object", {"set": {"data.source": "d.jsonl"},
                          "files": {"d.jsonl": _jsonl({6: {"label": {"name": "pos"}}})}},
     "data.source: d.jsonl: row 6 has an object for 'label', where one text or number"),
    ("row-label-empty", {"set": {"data.source": "d.jsonl"},
                         "files": {"d.jsonl": _jsonl({7: {"label": " "}})}},
     "data.source: d.jsonl: row 7 has an empty gold 'label'"),
    ("csv-label-cell-empty", {"set": {"data.source": "d.csv"},
                              "files": {"d.csv": CSV_HEAD + "a text,\n"}},
     "data.source: d.csv: row 4 has an empty gold 'label'"),
    ("mapped-label-column-missing", {"set": {"data.source": "d.jsonl",
                                             "data.columns": {"label": "category"}},
                                     "files": {"d.jsonl": _jsonl(
                                         {n: {"category": "pos"} for n in range(1, 12)})}},
     "data.source: d.jsonl: row 12 lacks 'category'"),
    ("test-source-row-lacks-label", {"set": {"data.test_source": "t.jsonl"},
                                     "files": {"t.jsonl": _jsonl({}, drop={2: "label"})}},
     "data.test_source: t.jsonl: row 2 lacks 'label'"),
    ("answers-null", {"set": {"data.source": "d.jsonl", "data.answers_column": "answers"},
                      "files": {"d.jsonl": _jsonl({n: {"answers": [r["label"]]}
                                                  for n, r in enumerate(ROWS, 1) if n != 8})}},
     "data.source: d.jsonl: row 8 lacks 'answers'"),
    ("answers-object", {"set": {"data.source": "d.jsonl", "data.answers_column": "answers"},
                        "files": {"d.jsonl": _jsonl({n: {"answers": {"text": ["pos"]}}
                                                    for n in range(1, 13)})}},
     "data.source: d.jsonl: row 1 has an object for 'answers', where a list of answer texts "
     "belongs (and 11 more: row 2, 3, 4, 5, 6, ...)"),
    ("answers-null-among", {"set": {"data.source": "d.jsonl", "data.answers_column": "answers"},
                            "files": {"d.jsonl": _jsonl({n: {"answers": ["pos", None]}
                                                        for n in range(1, 13)})}},
     "data.source: d.jsonl: row 1 has null among its 'answers'"),
    ("answers-empty-among", {"set": {"data.source": "d.jsonl", "data.answers_column": "answers"},
                             "files": {"d.jsonl": _jsonl({n: {"answers": ["pos", ""]}
                                                         for n in range(1, 13)})}},
     "data.source: d.jsonl: row 1 has an empty answer among its 'answers'"),
    ("group-by-null", {"set": {"data.source": "d.jsonl", "data.group_by": "g"},
                       "files": {"d.jsonl": _jsonl({n: {"g": None if n == 10 else str(n % 3)}
                                                   for n in range(1, 13)})}},
     "data.source: d.jsonl: row 10 has null for 'g'"),
    ("input-on-label-column", {"set": {"data.columns": {"text": "label"}}},
     "data.columns.text: fields 'text' and 'label' both map to column 'label' (the model would "
     "see its gold answer as input): give each field its own column"),
    ("label-on-input-column", {"set": {"data.columns": {"label": "text"}}},
     "data.columns.label: fields 'text' and 'label' both map to column 'text' (the model"),
    ("two-inputs-one-column", {"set": {"task.signature": "text, other -> label",
                                       "data.columns": {"other": "text"}}},
     "data.columns.other: fields 'text' and 'other' both map to column 'text': give each"),
    ("answers-on-input-column", {"set": {"data.answers_column": "text"}},
     "data.answers_column: 'text' is the column of input field 'text': the model would see the "
     "gold answers as input"),
    ("number-past-float-json", {"set": {"data.source": "d.jsonl", "prompt.number_format": ".1f"},
                                "files": {"d.jsonl": _jsonl({4: {"text": 10**400}})}},
     "data.source: d.jsonl: row 4 has a number too large for number_format '.1f' (a float "
     "stops at 1.8e308) for 'text'"),
    ("number-past-float-csv", {"set": {"data.source": "d.csv", "prompt.number_format": ".1f"},
                               "files": {"d.csv": CSV_HEAD + "1" + "0" * 400 + ",pos\n"}},
     "data.source: d.csv: row 4 has a number too large for number_format '.1f'"),
    # A "\ud800" escape parses to half a UTF-16 pair: validate passed, render's UTF-8 write
    # failed (UnicodeEncodeError, exit 1). Refused where data is read, the message escaped.
    ("jsonl-lone-surrogate", {"set": {"data.source": "d.jsonl"},
                              "files": {"d.jsonl": _jsonl({3: {"text": "bad \ud800 text"}})}},
     "data.source: d.jsonl: line 3: text: a lone surrogate \\ud800 (half of a UTF-16 pair) is "
     "not text: fix the \\u escape"),
    ("json-lone-surrogate-key", {"set": {"data.source": "d.json"},
                                 "files": {"d.json": json.dumps(ROWS[:2] + [{"\udc01": 1}])}},
     "data.source: d.json: [2] key '\\udc01': a lone surrogate \\udc01"),
    ("user-loader-lone-surrogate",
     {"set": {"data.loader": "case_loader_surrogate:load"},
      "files": {"case_loader_surrogate.py":
                "def load(path):\n"
                "    return [{'text': f'row {i}' + '\\ud800' * (i == 1), 'label': 'pos'}\n"
                "            for i in range(12)]\n"}},
     "data.source: data.jsonl: row 2 has a lone surrogate \\ud800 for 'text': half of a UTF-16 "
     "pair, which is not text"),
]


# Round 4: label text no answer can match. A blank choice, one with spaces around it (never the
# data's label), one over two lines, or a gold answer over two lines that label_accuracy (the
# answer's first line) never matches: every such row scored 0 without a word.
CASES += [
    ("choice-blank", {"set": {"task.choices": ["pos", "neg", ""]}},
     "task.choices: '' is blank: no answer can be scored as it"),
    ("choice-spaced", {"set": {"task.choices": ["pos ", "neg"]}},
     "task.choices: 'pos ' has spaces around it: write it without them"),
    ("choice-two-lines", {"set": {"task.choices": ["pos", "neg", "neg\nreally"]}},
     "task.choices: 'neg\\nreally' spans lines; a choice is one line"),
    ("label-two-lines", {"set": {"data.source": "d.jsonl", "task.choices": None},
                         "files": {"d.jsonl": _jsonl({3: {"label": "pos\nreally"}})}},
     "data.source: d.jsonl: row 3 has a gold 'label' of several lines, which label_accuracy "
     "never matches (it reads the answer's first line)"),
    ("label-spaced", {"set": {"data.source": "d.jsonl"},
                      "files": {"d.jsonl": _jsonl({2: {"label": " pos"}})}},
     "not among the choices: ' pos' (' pos' is the choice 'pos' with spaces around it: strip "
     "them in the data)"),
]

# Round 5: values that are not what they look like. YAML reads an unquoted yes/no/on/off as a
# boolean and 1.10 as a number (the error said "got True" and no more). Python's JSON parser
# takes NaN and Infinity (not JSON) and makes 1e999 inf; a user loader's pandas rows have NaN
# for an empty cell: each became the word "nan" / "inf" in the prompts without a word (copa
# predict and serve already refused such inputs).
CASES += [
    ("choice-yaml-boolean", {"set": {"task.choices": ["pos", "neg", True]}},
     "task.choices[2]: Input should be a valid string (got True); in YAML an unquoted "
     "yes/no/on/off/true/false is a boolean: write text in quotes ('yes')"),
    ("choice-yaml-number", {"set": {"task.choices": ["pos", "neg", 1.1]}},
     "task.choices[2]: Input should be a valid string (got 1.1); in YAML an unquoted 1.10 is a "
     "number: write text in quotes"),
    ("instructions-empty-value", {"set": {"task.instructions": None}},
     "task.instructions: Input should be a valid string (got None); in YAML a key with "
     "nothing after it (or null, ~) is null: write the text, in quotes if it is empty ('')"),
    # "$" matches before a final newline: the name "bad\n" passed and named a run folder
    ("name-trailing-newline", {"set": {"name": "bad\n"}},
     "name: use letters, digits, '-', '_' or '.' (it names the run folder)"),
    # a value with a line break, quoted raw by a message: the error ran over two lines
    ("source-with-line-break", {"set": {"data.source": "d\nx.jsonl"}},
     "data.source: no such file: "),
    ("jsonl-nan", {"set": {"data.source": "d.jsonl"},
                   "files": {"d.jsonl": _jsonl({}).replace('"row 3"', "NaN")}},
     "data.source: d.jsonl: row 4 has nan for 'text', not a finite number (a missing value, or "
     "past the float range): fill it in or drop the row"),
    ("jsonl-infinity", {"set": {"data.source": "d.jsonl"},
                        "files": {"d.jsonl": _jsonl({}).replace('"row 5"', "-Infinity")}},
     "data.source: d.jsonl: row 6 has -inf for 'text', not a finite number"),
    ("jsonl-past-float", {"set": {"data.source": "d.jsonl"},
                          "files": {"d.jsonl": _jsonl({}).replace('"row 2"', "1e999")}},
     "data.source: d.jsonl: row 3 has inf for 'text', not a finite number"),
    ("user-loader-nan",
     {"set": {"data.loader": "case_loader_nan:load"},
      "files": {"case_loader_nan.py":
                "def load(path):\n"
                "    return [{'text': float('nan') if i == 7 else f'row {i}', 'label': 'pos'}\n"
                "            for i in range(12)]\n"}},
     "data.source: data.jsonl: row 8 has nan for 'text', not a finite number"),
]


def _write_case(tmp_path: Path, case: dict[str, Any]) -> Path:
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for name, content in case.get("files", {}).items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    recipe_path = tmp_path / "recipe.yaml"
    if "raw" in case:
        recipe_path.write_text(case["raw"])
        return recipe_path
    recipe = copy.deepcopy(BASE)
    for dotted, value in case.get("set", {}).items():
        _set(recipe, dotted, value)
    for dotted in case.get("delete", []):
        _delete(recipe, dotted)
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return recipe_path


def test_the_base_case_is_valid(tmp_path: Path) -> None:
    path = _write_case(tmp_path, {})
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "ok (text -> label; train 6, val 2, test 2)" in result.output


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 110


@pytest.mark.parametrize("case, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_clearly(tmp_path: Path, case: dict[str, Any],
                                       expected: str) -> None:
    path = _write_case(tmp_path, case)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output  # one problem, one line
    assert output.startswith(str(tmp_path)), output  # names the file
    assert expected in output, output


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = _write_case(tmp_path, {"set": {"finetune.lora_rr": 8, "finetune.learning_rate": -1,
                                          "evaluate.metric": "bleu"}})
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 3
    assert any("finetune.lora_rr: unknown key" in line for line in lines)
    assert any("finetune.learning_rate: must be > 0" in line for line in lines)
    assert any("evaluate.metric: unknown metric" in line for line in lines)


@pytest.mark.parametrize("override, expected", [
    ("name.x=1", "name.x: 'name' is a value (str), not a section with keys; "
                 "write --set name=VALUE"),
    ("finetune.num_epochs.x=1", "finetune.num_epochs.x: 'finetune.num_epochs' is a value (int)"),
    ("finetune..lora_r=1", "finetune..lora_r: not a key path"),
    # validate took it (axolotl: passes any map through) and render died of RecursionError
    ("finetune.axolotl." + "a." * 3000 + "b=1",
     ("finetune.axolotl." + "a." * 3000)[:80] + "...: a key path of 3003 levels; a recipe nests "
     "at most 40"),
])
def test_a_set_through_a_value_is_a_recipe_problem(tmp_path: Path, override: str,
                                                   expected: str) -> None:
    path = _write_case(tmp_path, {})
    result = CliRunner().invoke(cli, ["validate", str(path), "--set", override])
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert len(output.splitlines()) == 1, output
    assert output.startswith(f"{path}: {expected}"), output


def test_a_recipe_that_is_not_a_regular_file() -> None:
    result = CliRunner().invoke(cli, ["validate", "/dev/zero"])
    assert result.exit_code == 2
    assert result.output.strip() == "/dev/zero: not a regular file (a character device), not a " \
                                    "recipe"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    """What a user sees in the terminal: one line and exit 2 without --debug; the traceback of
    the RecipeError with it (a real process, so nothing of click's test runner in between)."""
    path = _write_case(tmp_path, {"set": {"finetune.lora_rr": 8}})
    env = {**os.environ, "PYTHONPATH": str(REPO), "COPA_DEBUG": ""}
    runs = {flag: subprocess.run([sys.executable, "-m", "copa.cli", *flag, "validate", str(path)],
                                 capture_output=True, text=True, env=env, timeout=120)
            for flag in ((), ("--debug",))}
    plain, debug = runs[()], runs[("--debug",)]
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr
    assert plain.stderr.strip().endswith("finetune.lora_rr: unknown key (did you mean 'lora_r'?)")
    assert debug.returncode == 1  # an uncaught exception
    assert "Traceback (most recent call last)" in debug.stderr
    assert "RecipeError" in debug.stderr.strip().splitlines()[-1]


def test_missing_recipe_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "no such recipe file" in result.output


def test_a_user_metric_next_to_the_recipe_validates_and_is_the_one_the_run_uses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from copa.dspy.metrics import make_metric

    code = "def f1(example, prediction, trace=None):\n    return 0.25\n"
    path = _write_case(tmp_path, {"set": {"evaluate.metric": "case_good_metrics:f1"},
                                  "files": {"case_good_metrics.py": code}})
    monkeypatch.chdir(tmp_path.parent)  # found through the recipe's folder, not the cwd
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    metric = make_metric("case_good_metrics:f1", "label", base_dir=tmp_path)
    assert metric({}, {}) == 0.25


# --- round 2: the command line's own inputs, and output paths checked before any work ---------

def _one_line_exit_2(result: Any) -> str:
    import re

    output = result.output.strip()
    assert result.exit_code == 2, output
    assert len(output.splitlines()) == 1, output
    assert "Traceback" not in output and not re.search(r"\b[A-Z]\w*(Error|Exception)\b", output)
    return output


@pytest.mark.parametrize("args, expected", [
    (["validate", "{recipe}", "--set", "finetune.lora_r=["],
     "--set finetune.lora_r: the value is not valid YAML (line 1, column 2"),
    (["validate", "{recipe}", "--set", "finetune.axolotl={{a: 1, a: 2}}"],
     "--set finetune.axolotl: the value is not valid YAML (a: line 1: duplicate key 'a'"),
    (["validate", "{recipe}", "--set", f"finetune.seed={'9' * 5000}"],
     "--set finetune.seed: the value is not valid YAML (line 1: integer of 5000 digits"),
    (["validate", "{recipe}", "--set", "finetune.seed=-1"],
     "finetune.seed: must be a whole number from 0 to 4294967295 (got -1)"),
    (["predict", "{tmp}/no-run", "-i", "{tmp}/no-rows.csv", "-o", "{file}/out.jsonl"],
     "{file}/out.jsonl: {file} is not a folder (-o/--output)"),
    (["render", "{recipe}", "-o", "{file}"], "copa render: Invalid value for '-o' / '--output'"),
    (["render", "{recipe}", "--run-dir", "{file}/run"], "{file} is not a folder (--run-dir)"),
    (["render", "{recipe}", "--run-dir", "{tmp}/r", "-o", "{tmp}/o"],
     "give -o/--output (a folder of its own) or --run-dir (its rendered/ folder), not both"),
    (["run", "{recipe}", "--run-dir", "{file}/run"], "{file} is not a folder (--run-dir)"),
    (["train", "{recipe}", "--run-dir", "{file}/run"], "{file} is not a folder (--run-dir)"),
    (["export", "{tmp}/no-run", "{file}/out"], "{file} is not a folder (OUT_DIR)"),
    (["init", "x", "-o", "{file}/x.yaml"], "{file} is not a folder (-o/--output)"),
    (["init", "../../escape"], "NAME '../../escape': use letters, digits"),
    (["study", "{tmp}/s.yaml", "--out", "{file}/s"], "copa study: Invalid value for --out"),
    (["predict", "{tmp}/no-run"], "copa predict: Missing option '-i' / '--input'."),
    (["serve", "{tmp}/no-run", "--max-input-tokens", "0"], "copa serve: Invalid value for"),
    (["report", "{tmp}/no-run"], "copa report: Invalid value for 'RUN_DIR'"),
    (["report", "{tmp}"], "report.md does not exist: run `copa run` or `copa evaluate`"),
    (["study", "--report", "{tmp}"], "not a study folder"),
    (["nosuch"], "copa: No such command 'nosuch'."),
    # click raises "requires an argument" with no context: the line still names the command
    (["validate", "{recipe}", "--set"], "copa validate: Option '--set' requires an argument. "
                                        "(copa validate --help)"),
    # a file named as a folder was written as the file: "-o out/" made a file "out"
    (["init", "x", "-o", "{tmp}/sub/"], "{tmp}/sub/: ends in a slash, as a folder does; give a "
                                        "file name (-o/--output)"),
    (["predict", "{tmp}/no-run", "-i", "{tmp}/no-rows.csv", "-o", "{tmp}/out/"],
     "{tmp}/out/: ends in a slash"),
    (["compare", "{tmp}/a", "{tmp}/b", "--html", "{tmp}/page/"],
     "copa compare: Invalid value for --html: {tmp}/page/: ends in a slash"),
    (["compare", "{tmp}/a", "{tmp}/b", "--png", "{file}/x.png"],
     "copa compare: Invalid value for --png: {file}/x.png: {file} is not a folder"),
    # a symbolic link that loops: Path.resolve's RuntimeError, exit 1 (before Python 3.13)
    (["render", "{recipe}", "--run-dir", "{tmp}/loop"],
     "{tmp}/loop: a symbolic link that loops back to itself (--run-dir)"),
    (["predict", "{tmp}/loop", "-i", "{recipe}"], "{tmp}/loop: a symbolic link that loops back"),
    (["export", "{tmp}/loop", "{tmp}/out"], "{tmp}/loop: a symbolic link that loops back"),
    (["init", "x", "-o", "{tmp}/loop"], "{tmp}/loop: a symbolic link that loops back to itself "
                                        "(-o/--output)"),
], ids=["set-yaml", "set-duplicate", "set-huge-int", "set-bad-seed", "predict-output",
        "render-output", "render-run-dir", "render-both", "run-dir", "train-run-dir",
        "export-output", "init-output", "init-name",
        "study-out",
        "missing-option", "bad-option-value", "missing-dir", "report-missing", "not-a-study",
        "unknown-command", "option-without-value", "init-slash", "predict-slash",
        "compare-html-slash",
        "compare-png-in-a-file", "run-dir-loop", "predict-loop", "export-loop", "init-loop"])
def test_command_line_user_errors_are_one_line_with_exit_2(tmp_path: Path, args: list[str],
                                                           expected: str) -> None:
    recipe = _write_case(tmp_path, {})
    file = tmp_path / "a-file"
    file.write_text("not a folder\n")
    (tmp_path / "s.yaml").write_text("recipe: recipe.yaml\n")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    fill = {"recipe": str(recipe), "tmp": str(tmp_path), "file": str(file)}
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(cli, [a.format(**fill) for a in args])
    assert expected.format(**fill) in _one_line_exit_2(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_a_report_that_is_not_text_is_one_line(tmp_path: Path) -> None:
    """copa report on a report.md that is not UTF-8 (a damaged file): one line naming it,
    exit 2, not 'error: UnicodeDecodeError'."""
    (tmp_path / "report.md").write_bytes(b"| arm | score |\n| base \xff\xfe |\n")
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert f"{tmp_path / 'report.md'}: not UTF-8 text" in _one_line_exit_2(result)


def test_init_makes_the_folder_its_output_is_in(tmp_path: Path) -> None:
    """-o in a folder that does not exist yet: the check before any work allows it (its
    nearest existing folder is writable), and init wrote with no folder made (ENOENT)."""
    target = tmp_path / "new" / "deeper" / "task.yaml"
    result = CliRunner().invoke(cli, ["init", "task", "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert "name: task" in target.read_text()


def test_a_failed_render_leaves_none_of_its_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Rendering fails after the splits are written (every training row is over sequence_len,
    found with the model's tokenizer): the new folder is gone, a folder that existed keeps only
    what it had."""
    from conftest import write_tiny_recipe

    recipe = write_tiny_recipe(tmp_path / "recipe", tiny_model_dir)
    too_short = ["--set", "finetune.sequence_len=16"]
    new = tmp_path / "new" / "rendered"
    result = CliRunner().invoke(cli, ["render", str(recipe), "-o", str(new), *too_short])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "finetune.sequence_len: every training row is longer" in result.output.splitlines()[-1]
    assert not new.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("the user's\n")
    result = CliRunner().invoke(cli, ["render", str(recipe), "-o", str(kept), *too_short])
    assert result.exit_code == 2
    assert sorted(p.name for p in kept.iterdir()) == ["mine.txt"]
    result = CliRunner().invoke(cli, ["render", str(recipe), "-o", str(kept)])
    assert result.exit_code == 0, result.output
    assert {"mine.txt", "splits", "train.jsonl", "axolotl.yml"} <= {p.name for p in kept.iterdir()}


def test_a_model_folder_without_a_tokenizer_is_one_line_at_render(tmp_path: Path,
                                                                  tiny_model_dir: Path) -> None:
    """validate only reads config.json; render loads the tokenizer, which is not there (or, for
    a hub id, not reachable): one line naming model.base, exit 2, nothing left behind."""
    from conftest import write_tiny_recipe

    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    shutil.copy(tiny_model_dir / "model.safetensors", folder)  # weights: validate wants them
    recipe = write_tiny_recipe(tmp_path / "recipe", tiny_model_dir)
    out = tmp_path / "rendered"
    result = CliRunner().invoke(cli, ["render", str(recipe), "-o", str(out),
                                      "--set", f"model.base={folder}"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    line = result.output.strip().splitlines()[-1]  # after "resolving model ..."
    assert line.startswith(f"{recipe}: model.base: cannot load the tokenizer of {folder}"), line
    assert not out.exists()


def test_render_takes_the_run_dir_every_stage_takes(tmp_path: Path, tiny_model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`copa render R --run-dir D` renders into D/rendered, where `copa train R --run-dir D`
    looks (a study prints each cell's command with --run-dir)."""
    from conftest import write_tiny_recipe

    recipe = write_tiny_recipe(tmp_path / "recipe", tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["render", str(recipe), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "rendered" / "axolotl.yml").is_file()
    assert not (tmp_path / "runs").exists()  # not the default runs/tiny


@pytest.mark.slow
def test_render_and_validate_print_no_third_party_noise(tmp_path: Path,
                                                        tiny_model_dir: Path) -> None:
    """In a fresh process (bitsandbytes logs its kernels-community lookup once per process,
    when Axolotl is imported to validate the config)."""
    from conftest import write_tiny_recipe

    recipe = write_tiny_recipe(tmp_path / "recipe", tiny_model_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (["validate", str(recipe), "--full"],
                 ["render", str(recipe), "-o", str(tmp_path / "out")]):
        done = subprocess.run([sys.executable, "-m", "copa.cli", *args], capture_output=True,
                              text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        lines = (done.stdout + done.stderr).strip().splitlines()
        assert not [line for line in lines if not line.lstrip().startswith(
            (str(recipe), "resolving model", "wrote ", "note: data.source:"))], lines


def test_the_reserved_field_names_cover_dspys_own_members() -> None:
    """copa.recipe.schema lists DSPy's Example / Prediction members without importing DSPy (a
    light module): the list must still hold every public member of the installed DSPy."""
    import dspy

    from copa.recipe.schema import DSPY_MEMBERS, field_name_problem

    members = {n for cls in (dspy.Example, dspy.Prediction) for n in dir(cls)
               if not n.startswith("_")}
    assert members <= set(DSPY_MEMBERS), members - set(DSPY_MEMBERS)
    assert all(field_name_problem(n) for n in members)
    assert field_name_problem("petal_width") is None
