"""What a client may read about a failure: a short message it can act on, never SQL text, a
traceback or a server path. The details go to the server's log under a reference (a correlation
id) that the message quotes, so an operator can find them."""

from __future__ import annotations

import re
import uuid

from app.services.errors import ServiceError

MAX_MESSAGE = 300
# An absolute POSIX path of two or more components: replaced by its last component.
_PATH = re.compile(r"(?<![\w.:/-])/(?:[\w.@+-]+/)+([\w.@+-]*)")


def new_reference() -> str:
    """A short correlation id for one failure (quoted to the client, logged with the details)."""
    return uuid.uuid4().hex[:12]


def scrub(message: str) -> str:
    """``message`` without server paths (each becomes its last component), on one line, short."""
    text = _PATH.sub(lambda m: m.group(1) or ".", message)
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _user_facing(error: BaseException) -> bool:
    """Errors whose message is written for the client: the service's own, and the ``ValueError``s
    (``DataError`` included) that the ML core (``models``) raises about a configuration or a
    dataset, which name a setting or a file, not code. Anything else (a database error with its
    SQL, a bug) is not."""
    if isinstance(error, ServiceError):
        return True
    if not isinstance(error, ValueError):
        return False
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", "")) if tb is not None else ""
    return module == "models" or module.startswith("models.")


def job_error(error: BaseException, reference: str) -> str:
    """The ``error`` stored on a failed job: the scrubbed message of a user-facing error, else a
    generic line quoting ``reference``."""
    if _user_facing(error):
        text = error.message if isinstance(error, ServiceError) else str(error)
        return scrub(f"{text} (reference {reference})")
    return f"internal error while running the job (reference {reference}; see the worker log)"
