"""Formatting shared by the report's markdown tables and plots (kept apart so that every section's
module can render itself without importing the others)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: '-' for a missing figure, 'nan' for a failed one."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return str(value)


def per_rank(values: list[float], digits: int = 1) -> str:
    """One figure per rank in one cell: '1.0 / 1.2'."""
    return " / ".join(fmt(float(v), digits) for v in values)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
