"""Training backends, behind one front: code outside copa/backends/ imports this package
(get_backend, Backend, Hardware, TrainError) and never a backend's own module, so a second
backend plugs in as one more entry of BACKENDS. Light: a backend's module loads when asked for."""

from __future__ import annotations

from collections.abc import Callable

from copa.backends.base import Backend, Hardware, TrainError

__all__ = ["BACKENDS", "Backend", "Hardware", "TrainError", "get_backend"]


def _axolotl() -> Backend:
    from copa.backends.axolotl import AxolotlBackend

    return AxolotlBackend()

    # how many optimizer steps training on train_rows rows takes (the progress bar's total)
    def steps_for(self, recipe: Any, train_rows: int) -> int: ...


BACKENDS: dict[str, Callable[[], Backend]] = {"axolotl": _axolotl}

    def steps_for(self, recipe: Any, train_rows: int) -> int:
        from copa.backends import axolotl

        return axolotl.steps_for(recipe, train_rows)


def get_backend(name: str = "axolotl") -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown training backend {name!r} (known: {', '.join(BACKENDS)})")
    return BACKENDS[name]()
