"""Reading threshold rules written on a command line: ``"accuracy@2>=0.4"`` (standard library
only, like the rest of the client)."""

from __future__ import annotations

import re
from typing import Any

_RULE = re.compile(r"^\s*([A-Za-z_][\w.\-]*?)(?:@([0-9]*\.?[0-9]+))?\s*(>=|<=|==|!=)\s*(\S+)\s*$")


def parse_threshold(text: str) -> dict[str, Any]:
    """``METRIC[@EPS] OP VALUE`` -> ``{"metric", "eps", "op", "value"}`` (the API's threshold).

    ``accuracy@2>=0.4``: robust accuracy at 2/255 at least 0.4; no ``@EPS`` means clean;
    ``verdict!=fail``: the validity checks must not fail. Raises ``ValueError`` when unreadable.
    """
    m = _RULE.match(text)
    if m is None:
        raise ValueError(
            f"cannot read threshold {text!r}: expected METRIC[@EPS] OP VALUE, "
            "e.g. 'accuracy@2>=0.4', 'recall.mel@1>=0.5' or 'verdict!=fail'"
        )
    metric, eps, op, raw = m.groups()
    if metric == "verdict":
        return {"metric": metric, "eps": None, "op": op, "value": raw}
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"threshold {text!r}: {raw!r} is not a number") from None
    return {"metric": metric, "eps": float(eps) if eps else None, "op": op, "value": value}
