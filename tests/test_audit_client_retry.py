"""Issue 14, the CI client: a 429 or 503 is retried after its Retry-After for as long as the
overall timeout allows, and an audit that does not finish still leaves audit.json, audit.xml
(JUnit with an error case) and audit.md. Against httpx.MockTransport: no server needed."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import audit

CREATED = {"id": "a" * 32, "status": "queued", "model_id": "m"}


class Clock:
    """A fake clock that sleeping advances."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _client(answers: list[httpx.Response]) -> tuple[httpx.Client, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    return httpx.Client(base_url="http://dpaat", transport=httpx.MockTransport(handler)), seen


def _busy(status: int, retry_after: str) -> httpx.Response:
    return httpx.Response(status, json={"detail": "busy"}, headers={"Retry-After": retry_after})


def test_429_and_503_are_retried_after_retry_after() -> None:
    """Before: a 429 ended the client with exit 4."""
    client, seen = _client(
        [_busy(429, "30"), _busy(503, "5"), _busy(429, "7"), httpx.Response(201, json=CREATED)]
    )
    clock = Clock()
    got = audit.submit(client, {}, "key-1", deadline=100.0, clock=clock, sleep=clock.sleep)
    assert got == CREATED and clock.slept == [30.0, 5.0, 7.0]
    assert {r.headers["Idempotency-Key"] for r in seen} == {"key-1"}  # retries are safe


def test_a_retry_after_past_the_timeout_gives_up_in_time() -> None:
    client, _seen = _client([_busy(429, "30"), _busy(429, "3600")])
    clock = Clock()
    with pytest.raises(audit.SubmitTimeout, match="429"):
        audit.submit(client, {}, "k", deadline=100.0, clock=clock, sleep=clock.sleep)
    assert clock.slept == [30.0]


@pytest.mark.parametrize(("value", "expected"), [("12", 12.0), ("", 5.0), ("soon", 5.0)])
def test_retry_after_values(value: str, expected: float) -> None:
    assert audit.retry_after(httpx.Response(429, headers={"Retry-After": value})) == expected


def test_polling_waits_as_long_as_a_503_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    done = {**CREATED, "status": "succeeded", "progress": {}}
    client, _seen = _client([_busy(503, "4"), httpx.Response(200, json=done)])
    slept: list[float] = []
    monkeypatch.setattr(audit.time, "sleep", slept.append)
    assert audit.wait(client, dict(CREATED), timeout=60.0, poll=1.0)["status"] == "succeeded"
    assert slept == [1.0, 4.0]


@pytest.mark.parametrize("submitted", [True, False])
def test_a_timeout_writes_the_three_files(tmp_path: Path, submitted: bool) -> None:
    """Before: exit 3 and no files, so a CI JUnit step had nothing to read."""
    running: dict[str, Any] | None = {**CREATED, "status": "running"} if submitted else None
    audit.write_timeout_outputs(running, "timed out after 60 s", tmp_path)
    doc = json.loads((tmp_path / "audit.json").read_text())
    assert doc["finished"] is False and doc["reason"] == "timed out after 60 s"
    root = ET.parse(tmp_path / "audit.xml").getroot()
    assert root.get("errors") == "1"
    error = root.find(".//testcase/error")
    assert error is not None and error.get("type") == "timeout"
    assert "did not finish: timed out after 60 s" in (error.get("message") or "")
    md = (tmp_path / "audit.md").read_text()
    assert "did not finish" in md and (CREATED["id"] in md) == submitted
