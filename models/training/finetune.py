"""The initial model of a training run: fresh, or the weights of a registered model (fine-tuning).

A fine-tuned run starts from the given model's weights exactly (its first prediction equals the
source model's). When the dataset's classes differ from the model's, the run stops before
training unless ``replace_head`` asks for a fresh final layer of the dataset's width.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from models.nets import Classifier, build_model
from models.training.config import TrainConfig


def head_names(model: Classifier) -> list[str]:
    """State-dict names of the final layer (the last ``nn.Linear`` of the network)."""
    last = None
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"replace_head: {model.arch} has no final nn.Linear layer to replace")
    return [
        f"backbone.{last}.{p}" for p, _ in model.backbone.get_submodule(last).named_parameters()
    ]


def initial_model(cfg: TrainConfig, classes: list[str]) -> Classifier:
    """``build_model(cfg.arch, ...)``, then, with ``cfg.init_checkpoint``, its weights."""
    model = build_model(cfg.arch, len(classes), cfg.pretrained)
    if cfg.init_checkpoint is None:
        return model
    from models.api import load_model  # models.api imports the trainer

    info: dict[str, Any] | None = dict(cfg.init_model) if cfg.init_model else None
    source = load_model(cfg.init_checkpoint, info=info)
    if source.classes != list(classes) and not cfg.replace_head:
        raise ValueError(
            f"the dataset's classes {list(classes)} differ from the initial model's "
            f"{source.classes}; set replace_head to train a fresh final layer"
        )
    if getattr(source.model, "arch", None) != model.arch:
        raise ValueError(
            f"arch: the initial model is {getattr(source.model, 'arch', '?')}, not {model.arch}"
        )
    state = source.model.state_dict()
    skip = set(head_names(model)) if cfg.replace_head else set()
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k not in skip and k in own and own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"the initial weights do not fit {model.arch}: {wrong[:3]}")
    model.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)
    model.gradcam_layer = getattr(source.model, "gradcam_layer", None)
    return model
