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


BACKENDS: dict[str, Callable[[], Backend]] = {"axolotl": _axolotl}


def get_backend(name: str = "axolotl") -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown training backend {name!r} (known: {', '.join(BACKENDS)})")
    return BACKENDS[name]()
