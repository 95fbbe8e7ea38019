"""The user's own code a recipe names as 'package.module:name' (task.module, evaluate.metric,
optimize.optimizer): imported by `copa validate` so a typo fails before anything trains, and by
the run itself, both the same way.

The recipe's folder is appended to sys.path (after installed packages, so a file there never
shadows one), so a `mymetrics.py` next to the recipe is found from any working directory. Two
recipes in one process (a notebook loading two runs, a test session) may each have a
`mymetrics.py`: the recipe being read gets its own, never the one another recipe's folder put in
sys.modules first (that would score silently with the wrong metric). Only the user's module is
imported here; copa's own recipe package stays free of dspy and torch.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# (recipe key, what it must be): keys whose value may name user code
USER_CODE_KEYS = (("task.module", "a dspy.Module class"),
                  ("evaluate.metric", "a function metric(example, prediction, trace=None)"),
                  ("finetune.eval.metric",
                   "a function metric(example, prediction, trace=None)"),
                  ("optimize.optimizer", "a DSPy optimizer class"))


# recipe folders this process put on sys.path (a folder the user put there is left where it is)
_RECIPE_DIRS: list[str] = []


def _is_under(file: str | None, folder: str) -> bool:
    return file is not None and Path(file).resolve().is_relative_to(Path(folder).resolve())


def _use_recipe_dir(base_dir: Path, module_name: str) -> None:
    """Put base_dir on sys.path after installed packages but before other recipes' folders, and
    forget module_name's top-level package if another recipe's folder supplied it while this
    folder has its own."""
    folder = str(base_dir)
    if folder in sys.path and folder not in _RECIPE_DIRS:
        return
    if folder in sys.path:
        sys.path.remove(folder)
    others = [i for i, p in enumerate(sys.path) if p in _RECIPE_DIRS]
    sys.path.insert(others[0] if others else len(sys.path), folder)
    if folder not in _RECIPE_DIRS:
        _RECIPE_DIRS.append(folder)
    top = module_name.split(".")[0]
    loaded = sys.modules.get(top)
    if loaded is None or not ((base_dir / f"{top}.py").is_file() or (base_dir / top).is_dir()):
        return
    file = getattr(loaded, "__file__", None)
    if any(_is_under(file, other) for other in _RECIPE_DIRS if other != folder):
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]


def import_object(spec: str, base_dir: Path | None = None) -> Any:
    """'package.module:name' -> that object. Raises ImportError with a one-line reason."""
    module_name, _, attr = spec.partition(":")
    if base_dir is not None:
        _use_recipe_dir(Path(base_dir), module_name)
    importlib.invalidate_caches()  # a module written since the last import is found too
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # the user's module failed while importing: say how
        raise ImportError(f"importing {module_name} raised {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, attr):
        raise ImportError(f"module {module_name!r} ({getattr(module, '__file__', '?')}) "
                          f"has no {attr!r}")
    found = getattr(module, attr)
    if not callable(found):
        raise ImportError(f"{spec} is a {type(found).__name__}, not callable")
    return found


def user_code_problems(values: dict[str, str], base_dir: Path | None) -> dict[str, str]:
    """{recipe key: message} for each 'package.module:name' value that cannot be imported."""
    problems = {}
    for key, kind in USER_CODE_KEYS:
        spec = values.get(key, "")
        if ":" not in spec:  # a built-in name, checked by the schema
            continue
        try:
            import_object(spec, base_dir)
        except ImportError as exc:
            problems[key] = f"cannot import {spec!r}: {exc}; name {kind} as 'package.module:name'"
    return problems


def optimizer_class(name: str, base_dir: Path | None = None) -> Any:
    """optimize.optimizer's class: DSPy's by name (dspy.<Name>, dspy is imported only here and
    only then) or a user's 'package.module:Class'. Raises ImportError with a one-line reason."""
    if ":" in name:
        return import_object(name, base_dir)
    import dspy

    cls = getattr(dspy, name, None) or getattr(dspy.teleprompt, name, None)
    if cls is None or not inspect.isclass(cls):
        raise ImportError(f"DSPy has no optimizer named '{name}' (e.g. BootstrapFewShot, "
                          "BootstrapFewShotWithRandomSearch, MIPROv2)")
    return cls


def takes(function: Callable[..., Any]) -> set[str]:
    """The names a function takes by keyword (self left out)."""
    return {name for name, p in inspect.signature(function).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}


def optimizer_params(cls: type) -> tuple[set[str], set[str]]:
    """The keys an optimizer's constructor takes and those its compile() takes (besides the
    student and trainset copa hands it)."""
    return takes(cls.__init__), takes(cls.compile) - {"student", "trainset"}


# optimize.params copa fills itself: the metric and the splits, and the models the recipe names
# (a string there would reach DSPy as a model only to fail after training)
COPA_SETS = {"metric": "evaluate.metric", "student": "the task's program",
             "trainset": "the train split", "valset": "the val split",
             "task_model": "model.base", "prompt_model": "optimize.proposer",
             "reflection_lm": "optimize.proposer", "teacher": "optimize.teacher",
             "teacher_settings": "optimize.teacher"}


def _kind_problem(name: str, value: Any, default: Any) -> str | None:
    """A value of another kind than the parameter's default (a word where a count goes), or None;
    a parameter without a default, or with None, is not checked, and null is always taken (it
    switches a feature off: MIPROv2's auto: null)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if value is None:
        return None
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif number(default):
        ok = number(value) and (not isinstance(default, int) or float(value).is_integer())
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        return None
    if ok:
        return None
    kind = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[
        type(default)]
    return f"{name}: {value!r} is not {kind} (its default is {default!r})"


def param_problem(cls: type, params: dict[str, Any]) -> str | None:
    """Why optimize.params do not fit the optimizer, or None: a key copa sets itself, a key
    neither its constructor nor its compile() takes (unless the constructor takes **kwargs), or
    a value of another kind than the parameter's default."""
    init, compile_ = optimizer_params(cls)
    ours = sorted(k for k in params if k in COPA_SETS)
    if ours:
        return "; ".join(f"{k} is set by copa (from {COPA_SETS[k]}): remove it here"
                         for k in ours)
    open_init = any(p.kind == p.VAR_KEYWORD
                    for p in inspect.signature(cls.__init__).parameters.values())
    unknown = sorted(k for k in params if k not in init and k not in compile_)
    if unknown and not open_init:
        return (f"{cls.__name__} takes none of {unknown} (constructor: "
                f"{', '.join(sorted(init - {'metric'}))}; compile: {', '.join(sorted(compile_))})")
    defaults = {name: p.default for fn in (cls.__init__, cls.compile)
                for name, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    kinds = [_kind_problem(k, v, defaults[k]) for k, v in params.items() if k in defaults]
    return "; ".join(k for k in kinds if k) or None
