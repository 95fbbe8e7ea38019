"""The user's own code a recipe names as 'package.module:name' (task.module, evaluate.metric,
optimize.optimizer): imported by `copa validate` so a typo fails before anything trains, and by
the run itself, both the same way.

The recipe's folder is appended to sys.path (after installed packages, so a file there never
shadows one), so a `mymetrics.py` next to the recipe is found from any working directory. Only the
user's module is imported here; copa's own recipe package stays free of dspy and torch.
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


def import_object(spec: str, base_dir: Path | None = None) -> Any:
    """'package.module:name' -> that object. Raises ImportError with a one-line reason."""
    module_name, _, attr = spec.partition(":")
    if base_dir is not None and str(base_dir) not in sys.path:
        sys.path.append(str(base_dir))
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


def param_problem(cls: type, params: dict[str, Any]) -> str | None:
    """Why optimize.params do not fit the optimizer (a key neither its constructor nor its
    compile() takes, unless the constructor takes **kwargs), or None."""
    init, compile_ = optimizer_params(cls)
    open_init = any(p.kind == p.VAR_KEYWORD
                    for p in inspect.signature(cls.__init__).parameters.values())
    unknown = sorted(k for k in params if k not in init and k not in compile_)
    if not unknown or open_init:
        return None
    return (f"{cls.__name__} takes none of {unknown} (constructor: "
            f"{', '.join(sorted(init - {'metric'}))}; compile: {', '.join(sorted(compile_))})")
