"""A real S3 API server for the tests: moto's standalone server (``moto.server``, from the test
extra) in a process of its own on a free loopback port, and fresh buckets in it. The S3 backend is
always tested over HTTP against this process, never with a mocked client."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.core.settings import Settings

ACCESS_KEY = "dpaat-test"
SECRET_KEY = "dpaat-test-secret"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """One moto server process; ``env(bucket)`` is what a dpaat process needs to use it."""

    endpoint: str
    proc: subprocess.Popen[bytes]

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}),
        )

    def new_bucket(self) -> str:
        name = f"dpaat-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str, prefix: str = "artifacts") -> dict[str, str]:
        return {
            "DPAAT_ARTIFACTS": f"s3://{bucket}/{prefix}",
            "DPAAT_S3_ENDPOINT_URL": self.endpoint,
            "DPAAT_S3_REGION": REGION,
            "DPAAT_S3_ACCESS_KEY_ID": ACCESS_KEY,
            "DPAAT_S3_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def settings(self, bucket: str, tmp: Path, cache_mb: int = 64) -> Settings:
        """The ``Settings`` of one host on ``bucket`` (its cache and scratch under ``tmp``)."""
        from app.core.settings import Settings

        env = self.env(bucket)
        return Settings(
            artifacts=env["DPAAT_ARTIFACTS"],
            s3_endpoint_url=env["DPAAT_S3_ENDPOINT_URL"],
            s3_region=env["DPAAT_S3_REGION"],
            s3_access_key_id=env["DPAAT_S3_ACCESS_KEY_ID"],
            s3_secret_access_key=env["DPAAT_S3_SECRET_ACCESS_KEY"],
            cache_dir=tmp / "cache",
            cache_max_mb=cache_mb,
            scratch_dir=tmp / "scratch",
        )

    def objects(self, bucket: str) -> dict[str, int]:
        """Every key in the bucket and its size."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {o["Key"]: int(o["Size"]) for page in pages for o in page.get("Contents", [])}


@contextmanager
def moto_server(log: Path) -> Iterator[S3Server]:
    """Start ``python -m moto.server`` on loopback; stopped when the block ends."""
    port = _free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = S3Server(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("moto server did not start") from None
                time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
