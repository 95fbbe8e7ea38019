"""Keeping libraries quiet on the command line: environment defaults set before torch, DSPy or
Axolotl load, their loggers and import-time prints silenced, so a command's output is copa's."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # Batch-size-independent float32 matmuls, so batched greedy outputs equal one-at-a-time
    # ones; MKL reads it once, before torch's first matmul (see copa.inference.engine).
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    # DSPy warns per call (e.g. an answer cut at max_tokens): thousands of lines for a file of
    # rows or a server's traffic. The stages keep DSPy's chatter in their logs instead.
    logging.getLogger("dspy").setLevel(logging.ERROR)
    # bitsandbytes (imported with Axolotl, to validate a config) looks for a kernels-community
    # CPU kernel and logs a warning when offline; torchao logs its CUDA kernels' absence.
    for name in ("bitsandbytes", "torchao"):
        logging.getLogger(name).setLevel(logging.ERROR)


def preload_noisy_modules() -> None:
    """torchao prints load failures of its CUDA kernels on import (harmless on CPU); import it
    once here with those prints silenced, before a model load pulls it in loudly."""
    import importlib.util

    from copa.files import quiet_fds

    if importlib.util.find_spec("torchao") is not None:
        with quiet_fds():
            import torchao  # noqa: F401

            try:  # its prototype formats register enums with torch's pytree, loudly
                importlib.import_module("torchao.prototype.mx_formats")
            except Exception:  # an optional, experimental module: never fail a run on it
                pass


def quiet_dspy() -> None:
    """DSPy sets its logger to INFO when imported (after quiet_libraries ran): a warning per
    call (an answer cut at max_tokens) would flood a server's or a file's output."""
    import logging

    logging.getLogger("dspy").setLevel(logging.ERROR)
