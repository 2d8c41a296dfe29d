"""The Jinja2 environment of the dashboard (autoescaping on: every value is escaped unless a
template says otherwise, and none does)."""

from __future__ import annotations

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


def interval(section: Any, key: str) -> str:
    """``[low, high]``: the 95 % interval the report holds for ``key`` (computed once, by the
    evaluation); empty for reports made before intervals existed."""
    iv = ((section or {}).get("intervals") or {}).get(key) or {}
    if iv.get("low") is None or iv.get("high") is None:
        return ""
    return f"[{iv['low']:.3f}, {iv['high']:.3f}]"


templates.env.filters.update(num=num, when=when, pct=pct, interval=interval)
