"""Prediction responses. Radii are in 1/255 units. What each figure means and does not mean:
docs/prediction.md."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.services.prediction import WARNINGS


class Robustness(BaseModel):
    """How far the model's prediction for this image survives L-inf attacks (PGD against the
    predicted class, docs/dpaat.md "Robustness score"). It measures the model's stability around
    this image, not whether the prediction is correct, and not a probability."""

    eps_star: float | None = Field(
        description=(
            "Smallest L-inf radius (1/255 units) at which our PGD search found an image that "
            "changes the predicted class; an upper bound on the true minimum (a stronger attack "
            "may flip at less). null: nothing up to `cap` flipped it, which is not a proof that "
            "nothing can."
        ),
        examples=[2.5],
    )
    stable_at: dict[str, bool] = Field(
        description=(
            "Per requested radius: true when PGD at that radius did not flip the prediction "
            "(and no flip was found at a smaller radius). Radii above `cap` are tested too."
        ),
        examples=[{"0.5": True, "1": True, "2": False}],
    )
    score: float = Field(
        ge=0,
        le=1,
        description=(
            "min(eps_star / cap, 1); 1.0 when nothing up to `cap` flipped the prediction. Relative "
            "to `cap` (compare scores only at the same cap); not a confidence, not a reliability "
            "of the diagnosis: read `warnings`."
        ),
        examples=[0.16],
    )
    cap: float = Field(description="Largest radius searched for eps_star.", examples=[16.0])


_WARNING_DOC = "; ".join(f"`{k}`: {v}" for k, v in WARNINGS.items())


class Prediction(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    index: int = Field(ge=0, description="Position of the image in the request.")
    class_: str = Field(alias="class", description="The predicted class.", examples=["mel"])
    probabilities: dict[str, float] = Field(examples=[{"mel": 0.71, "nv": 0.22, "bkl": 0.07}])
    top_probability: float = Field(
        ge=0, le=1, description="The probability of the predicted class.", examples=[0.71]
    )
    warnings: list[str] = Field(
        description=(
            "Reasons to distrust this answer whatever its score, empty when none applies: "
            + _WARNING_DOC
        ),
        examples=[["low_confidence"]],
    )
    robustness: Robustness
    gradcam_png: str | None = Field(
        default=None, description="Base64 PNG of the Grad-CAM heat map (when asked for)."
    )


class PredictionOut(Prediction):
    model_id: str


class BatchPredictionOut(BaseModel):
    model_id: str
    predictions: list[Prediction]
