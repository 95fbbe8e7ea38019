"""matplotlib figures as PNG bytes, for report.png, val_curve.png, study.png and copa
compare's PNG: pyplot on the file-only Agg backend, and one way to lay a figure out and save
it. matplotlib loads only when a chart is drawn."""

from __future__ import annotations

import io
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed, none opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any) -> bytes:
    """The figure laid out tight, as PNG bytes; the figure is closed (pyplot keeps no handle)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    return buffer.getvalue()
