"""One input policy for every text a client sends: path segments, query parameters, JSON bodies,
url-encoded and multipart form fields (and the JSON documents carried in form fields), and upload
file names. Refused with 422, in FastAPI's error format, naming the field:

- control characters (C0 including NUL, tab and line breaks, DEL, C1), Unicode line/paragraph
  separators, bidirectional controls (U+202A-U+202E, U+2066-U+2069, LRM/RLM/ALM) and lone
  surrogates. PostgreSQL cannot store NUL and a lone surrogate cannot be encoded; the others let
  a name display as something else in any list or page.
- texts over a length bound (see ``Limits``).

It is an ASGI middleware, so every route is covered, including routes added later, whatever their
parameters and however they read their body. Path and query are checked before the route runs.
Bodies are checked while the application reads them: the chunk that completes a bad field raises
a 422 ``HTTPException`` from ``receive`` (as the body limit does with its 413), so the route never
sees it. Bodies of other types (images, archives) pass untouched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import HTTPException
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.auth import flat_routes
from app.core.text_policy import LIMITS, problem


def _error(loc: Sequence[str | int], message: str) -> dict[str, Any]:
    return {"type": "text_policy", "loc": list(loc), "msg": f"{_where(loc)} {message}"}


def _where(loc: Sequence[str | int]) -> str:
    if len(loc) == 1:
        return "the request body" if loc[0] == "body" else f"the {loc[0]}"
    kind = {"path": "path parameter", "query": "query parameter", "body": "field"}.get(
        str(loc[0]), str(loc[0])
    )
    return f"{kind} {'.'.join(str(p) for p in loc[1:])!r}"


def json_problems(value: Any, loc: tuple[str | int, ...]) -> Iterator[dict[str, Any]]:
    """Every string (and object key) of a parsed JSON document that breaks the policy."""
    if isinstance(value, str):
        why = problem(value, LIMITS.body_string)
        if why:
            yield _error(loc, why)
    elif isinstance(value, dict):
        for key, item in value.items():
            why = problem(key, 200)
            if why:
                yield _error((*loc, key), f"(the key) {why}")
            yield from json_problems(item, (*loc, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from json_problems(item, (*loc, i))


def form_text_problems(name: str, text: str) -> list[dict[str, Any]]:
    """A form field: a JSON document (some fields carry one) is checked as JSON, anything else
    as a single-line text."""
    loc: tuple[str | int, ...] = ("body", name)
    document = text.strip()[:1] in ("{", "[")
    if document and len(text) <= LIMITS.form_text:
        try:
            return list(json_problems(json.loads(text), loc))
        except ValueError:
            pass
    if document:
        why = problem(text, LIMITS.form_text, multiline=True)
    else:
        why = problem(text, LIMITS.body_string)
    return [_error(loc, why)] if why else []


_JSON_TYPES = ("application/json",)


class PolicyViolation(HTTPException):
    """Raised inside ``receive``: FastAPI passes HTTP exceptions from body parsing through."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(422, errors)


def _content_type(scope: Scope) -> tuple[str, dict[bytes, bytes]]:
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            ctype, options = parse_options_header(value)
            return ctype.decode("latin-1").lower(), options
    return "", {}


class _JsonBody:
    """Collects a JSON body (bounded by the body limit outside) and checks it when complete."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def feed(self, data: bytes, more: bool) -> None:
        self.chunks.append(data)
        if more:
            return
        try:
            document = json.loads(b"".join(self.chunks))
        except ValueError:
            return  # not JSON: the route's own parser answers that
        errors = list(json_problems(document, ("body",)))
        if errors:
            raise PolicyViolation(errors)


class _UrlencodedBody:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def feed(self, data: bytes, more: bool) -> None:
        self.chunks.append(data)
        if more:
            return
        errors = []
        for key, value in QueryParams(b"".join(self.chunks).decode("latin-1")).multi_items():
            errors += form_text_problems(key, value)
        if errors:
            raise PolicyViolation(errors[:20])


class _MultipartBody:
    """Streams a multipart body through python-multipart: checks every text field and every file
    name as their parts end; file contents are only skipped over."""

    def __init__(self, boundary: bytes) -> None:
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
                "on_part_end": self._end,
            },
            # Larger than the application's parser allows (4 KB), so that an over-long file name
            # gets our clear 422 instead of its "Invalid multipart data".
            max_header_size=1 << 16,
            max_header_count=16,
        )
        self.broken = False
        self.errors: list[dict[str, Any]] = []
        self._field = self._value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._text = bytearray()

    def _begin(self) -> None:
        self._disposition, self._text, self._is_file = b"", bytearray(), False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._field.lower() == b"content-disposition":
            self._disposition = self._value
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._is_file = filename is not None
        if filename is not None:
            text = filename.decode("utf-8", "replace")
            why = problem(text, LIMITS.file_name)
            if why:
                message = f"(its file name) {why}; rename the file"
                self.errors.append(_error(("body", self._name), message))

    def _data(self, data: bytes, start: int, end: int) -> None:
        if not self._is_file and len(self._text) <= 4 * LIMITS.form_text:
            self._text += data[start:end]

    def _end(self) -> None:
        if not self._is_file:
            text = self._text.decode("utf-8", "replace")
            self.errors += form_text_problems(self._name, text)

    def feed(self, data: bytes, more: bool) -> None:
        if self.broken:
            return
        try:
            self.parser.write(data)
            if not more:
                self.parser.finalize()
        except Exception:  # malformed multipart: the route's parser answers that
            self.broken = True
            return
        if self.errors:
            raise PolicyViolation(self.errors[:20])


def _body_checker(scope: Scope) -> _JsonBody | _UrlencodedBody | _MultipartBody | None:
    ctype, options = _content_type(scope)
    if ctype in _JSON_TYPES or ctype.endswith("+json"):
        return _JsonBody()
    if ctype == "application/x-www-form-urlencoded":
        return _UrlencodedBody()
    if ctype == "multipart/form-data" and options.get(b"boundary"):
        try:
            return _MultipartBody(options[b"boundary"])
        except Exception:  # a bad boundary: the route's parser answers that
            return None
    return None


class InputPolicyMiddleware:
    """Applies the policy to every HTTP request (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._routes: list[BaseRoute] | None = None

    def _path_params(self, scope: Scope) -> dict[str, Any]:
        if self._routes is None:
            self._routes = flat_routes(scope["app"].routes)
        for route in self._routes:
            match, child = route.matches(scope)
            if match == Match.FULL:
                return dict(child.get("path_params", {}))
        return {}

    def _path_and_query_errors(self, scope: Scope) -> list[dict[str, Any]]:
        errors: list[dict[str, Any]] = []
        path: str = scope["path"]
        if any(problem(segment, LIMITS.path_segment) for segment in path.split("/")):
            params = self._path_params(scope)
            for name, value in params.items():
                why = problem(str(value), LIMITS.path_segment)
                if why:
                    errors.append(_error(("path", name), why))
            if not errors:
                for segment in path.split("/"):
                    why = problem(segment, LIMITS.path_segment)
                    if why:
                        errors.append(_error(("path",), f"(a segment) {why}"))
                        break
        query = scope.get("query_string", b"")
        if query:
            for key, value in QueryParams(query.decode("latin-1")).multi_items():
                why = problem(key, 200) or problem(value, LIMITS.query_value)
                if why:
                    errors.append(_error(("query", key), why))
        return errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        errors = self._path_and_query_errors(scope)
        if errors:
            # The body is not read: close the connection rather than drain it.
            response = JSONResponse(
                {"detail": errors[:20]}, status_code=422, headers={"Connection": "close"}
            )
            await response(scope, receive, send)
            return
        checker = _body_checker(scope)
        if checker is None:
            await self.app(scope, receive, send)
            return

        async def checked() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                checker.feed(message.get("body", b""), bool(message.get("more_body", False)))
            return message

        await self.app(scope, checked, send)
