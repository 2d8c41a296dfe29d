"""Prediction responses. Radii are in 1/255 units."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Robustness(BaseModel):
    """How far the prediction survives attacks (docs/dpaat.md, "Robustness score")."""

    eps_star: float | None = Field(
        description="Smallest L-inf radius that flips the prediction; null: none below the cap.",
        examples=[2.5],
    )
    stable_at: dict[str, bool] = Field(examples=[{"0.5": True, "1": True, "2": False}])
    score: float = Field(ge=0, le=1, description="min(eps_star / cap, 1).", examples=[0.16])
    cap: float = Field(examples=[16.0])


class Prediction(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    index: int = Field(ge=0, description="Position of the image in the request.")
    class_: str = Field(alias="class", description="The predicted class.", examples=["mel"])
    probabilities: dict[str, float] = Field(examples=[{"mel": 0.71, "nv": 0.22, "bkl": 0.07}])
    robustness: Robustness
    gradcam_png: str | None = Field(
        default=None, description="Base64 PNG of the Grad-CAM heat map (when asked for)."
    )


class PredictionOut(Prediction):
    model_id: str


class BatchPredictionOut(BaseModel):
    model_id: str
    predictions: list[Prediction]
