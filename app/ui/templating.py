"""The Jinja2 environment of the dashboard (autoescaping on: every value is escaped unless a
template says otherwise, and none does)."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi.templating import Jinja2Templates

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


def num(value: Any, digits: int = 3) -> str:
    """A metric for a table: 3 decimals, '–' when the report has none."""
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, int | float):
        return f"{value:.{digits}f}"
    return str(value)


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "–"


def pct(value: Any) -> str:
    return f"{100 * value:.0f}%" if isinstance(value, int | float) else "–"


def wilson(p: Any, n: Any, z: float = 1.96) -> str:
    """The Wilson score interval (95%) of a proportion ``p`` measured on ``n`` images: how far a
    test-set accuracy can be trusted, shown next to it."""
    if not isinstance(p, int | float) or not isinstance(n, int) or n <= 0:
        return ""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"[{max(0.0, centre - half):.3f}, {min(1.0, centre + half):.3f}]"


templates.env.filters.update(num=num, when=when, pct=pct, wilson=wilson)
