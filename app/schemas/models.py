"""Model requests and responses."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.schemas.common import Label, Name, ORMModel
from app.schemas.jobs import Architecture, Method


class ModelDescription(BaseModel):
    """The JSON that accompanies an uploaded safetensors file."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "architecture": "small_cnn",
                    "classes": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
                    "image_size": 64,
                    "name": "external-cnn",
                }
            ]
        },
    )

    architecture: Architecture
    classes: list[Label] = Field(min_length=2, max_length=1000)
    image_size: int = Field(ge=16, le=1024, description="Input size the model expects (pixels).")
    name: Name | None = None
    training_method: Method | None = Field(
        default=None, description="How it was trained, if known."
    )
    notes: str | None = Field(default=None, max_length=2000)

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: list[str]) -> list[str]:
        cleaned = [c.strip() for c in classes]
        if any(not c or len(c) > 100 for c in cleaned):
            raise ValueError("class names must be 1-100 characters")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("class names must be distinct")
        return cleaned


class ModelOut(ORMModel):
    """A registered model."""

    id: str
    name: str
    source: Literal["trained", "uploaded"]
    weights_format: Literal["checkpoint", "safetensors"]
    architecture: str
    classes: list[str]
    image_size: int
    training_method: str | None
    checkpoint_sha256: str
    job_id: str | None
    dataset_id: str | None
    info: dict[str, Any]
    created_at: datetime
    has_report: bool = False


class EvaluationOut(ORMModel):
    """A model's latest robustness report (the report contract of docs/dpaat.md)."""

    id: str
    model_id: str
    dataset_id: str | None
    job_id: str | None
    verdict: str = Field(examples=["pass"])
    report: dict[str, Any]
    created_at: datetime
