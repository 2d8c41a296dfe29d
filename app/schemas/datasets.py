"""Dataset requests and responses."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import Name, ORMModel


class RegisterDatasetRequest(BaseModel):
    """Register a directory already on the server (under an admin-configured data root)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"path": "/data/ham10000", "name": "ham10000"}]},
    )

    path: str = Field(min_length=1, max_length=1000, description="Absolute server path.")
    name: Name | None = None


class DatasetOut(ORMModel):
    """A validated dataset: layout, classes and per-class counts, and its fixed split."""

    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": "8c0f6f0e2b5c4f0e9d7a1b2c3d4e5f60",
                    "name": "ham10000",
                    "source": "registered",
                    "layout": "ham10000",
                    "classes": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
                    "class_counts": {
                        "akiec": 283,
                        "bcc": 444,
                        "bkl": 967,
                        "df": 87,
                        "mel": 986,
                        "nv": 6044,
                        "vasc": 113,
                    },
                    "num_samples": 8924,
                    "has_masks": True,
                    "manifest_sha256": "5e1b...",
                    "archive_sha256": None,
                    "size_bytes": 0,
                    "created_at": "2026-01-01T00:00:00Z",
                }
            ]
        },
    )

    id: str
    name: str
    source: Literal["upload", "registered"]
    layout: Literal["ham10000", "isic2019", "isic2020", "class_folders"]
    classes: list[str]
    class_counts: dict[str, int]
    num_samples: int
    has_masks: bool
    manifest_sha256: str = Field(description="sha256 of the split manifest every job reuses.")
    archive_sha256: str | None
    size_bytes: int
    created_at: datetime
