"""Grad-CAM (Selvaraju et al. 2017) on a classifier's ``cam_layer`` and the lesion-focus score.

The model runs in eval mode (BatchNorm statistics untouched) with frozen parameters, the hook is
removed and the model's mode restored afterwards, whatever happens in between.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from models.attacks.base import attack_mode

# Layers found automatically, by model (a module attribute would register the layer a second time
# in the model's state dict): its name in the backbone, or None and the reason.
_FOUND: weakref.WeakKeyDictionary[nn.Module, tuple[str | None, str]] = weakref.WeakKeyDictionary()


def find_cam_layer(net: nn.Module, x: torch.Tensor) -> tuple[str | None, str]:
    """The last module of ``net`` with a spatial (N, C, h, w) output before the features are
    pooled or flattened, found by running ``x`` once; ``(None, reason)`` when the classifier is
    not fed by a feature map (a vision transformer's tokens, an MLP)."""
    order: list[tuple[str, int, bool]] = []  # (name, output ndim, is a pooling layer)
    names = {id(m): n for n, m in net.named_modules() if n}

    def record(m: nn.Module, _inp: object, out: object) -> None:
        if id(m) in names and isinstance(out, torch.Tensor):
            order.append((names[id(m)], out.ndim, _is_global_pool(m, out)))

    handles = [m.register_forward_hook(record) for n, m in net.named_modules() if n]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    candidate: str | None = None
    for name, ndim, pool in order:
        if ndim != 4 or pool:
            if ndim == 3 and candidate is not None:
                return None, "the classifier reads a token sequence, not a spatial feature map"
            break
        candidate = name
    if candidate is None:
        return None, "the model has no convolutional feature map (no (N, C, h, w) activation)"
    return candidate, "found automatically"


def _is_global_pool(m: nn.Module, out: torch.Tensor) -> bool:
    """An adaptive/global pooling to 1 x 1 (a strided pooling inside a block does not count)."""
    kind = type(m).__name__.lower()
    return ("adaptive" in kind or "global" in kind) and out.ndim == 4 and out.shape[-2:] == (1, 1)


def cam_unavailable(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why Grad-CAM cannot explain this model (None when it can); ``x``: a sample input."""
    try:
        _cam_layer(model, x)
    except ValueError as e:
        return str(e)
    return None


def _cam_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model.cam_layer`` (native architectures), the description's ``gradcam_layer``, or the
    layer :func:`find_cam_layer` finds in ``model.backbone``."""
    layer = getattr(model, "cam_layer", None)
    if isinstance(layer, nn.Module):
        return layer
    net = getattr(model, "backbone", model)
    name = getattr(model, "gradcam_layer", None)
    if name is None:
        if model not in _FOUND:
            was = model.training
            model.eval()
            try:
                _FOUND[model] = find_cam_layer(net, _normalized(model, x[:1].detach()))
            finally:
                model.train(was)
        name, reason = _FOUND[model]
        if name is None:
            raise ValueError(f"no Grad-CAM layer: {reason}")
    try:
        return net.get_submodule(name)
    except AttributeError:
        raise ValueError(f"gradcam_layer: the model has no module named {name!r}") from None


# The smallest Grad-CAM map side with a cell at the image's centre, where dermoscopy puts the
# lesion: a map with fewer cells a side cannot localise it, and lesion focus compares nothing.
CENTRED_GRID = 3


def cam_grid(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """The (h, w) of the Grad-CAM layer's own map for inputs shaped like ``x``: how finely the map
    can place its mass (the upsampling to the image adds no detail). ResNet-18's last block is
    2 x 2 at 64 px, where every cell touches a corner and none can single out the image's centre."""
    layer = _cam_layer(model, x)
    shape: list[int] = []

    def keep(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        shape[:] = out.shape[-2:]

    handle = layer.register_forward_hook(keep)
    try:
        with attack_mode(model), torch.no_grad():
            model(x[:1].detach())
    finally:
        handle.remove()
    return shape[0], shape[1]


def _normalized(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
        return (x - mean) / std
    return x


def _cam_chunk(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, class_idx: torch.Tensor | None
) -> torch.Tensor:
    store: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        store["act"] = out

    handle = layer.register_forward_hook(keep)
    try:
        # parameters are frozen, so the input must require grad for the activations to have a graph
        logits = model(x.detach().requires_grad_(True))
    finally:
        handle.remove()
    act = store.get("act")
    if not isinstance(act, torch.Tensor) or act.ndim != 4:
        raise ValueError("the Grad-CAM layer must output a (N, C, h, w) feature map")
    target = logits.argmax(1) if class_idx is None else class_idx
    score = logits.gather(1, target.view(-1, 1)).sum()  # samples are independent in eval mode
    (grad,) = torch.autograd.grad(score, act)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # global-average-pooled gradients per channel
    cam = F.relu((weights * act.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    peak = cam.flatten(1).amax(dim=1).view(-1, 1, 1)
    # divide by the peak (not min-max) so the shares of CAM mass, which lesion focus uses, are kept
    # no epsilon clamp: activations of an untrained net can be ~1e-13 and still carry a valid map
    return (cam / torch.where(peak > 0, peak, torch.ones_like(peak))).detach()


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    class_idx: int | torch.Tensor | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) in [0, 1] of images ``x`` (N, C, H, W) in [0, 1].

    ``class_idx``: the class to explain, one int for all images or a tensor (N,); None explains each
    image's predicted class. Each map is upsampled to the input size and divided by its maximum; a
    map with no positive evidence is all zeros.
    """
    layer = _cam_layer(model, x)
    n = len(x)
    targets: torch.Tensor | None = None
    if class_idx is not None:
        targets = torch.as_tensor(class_idx, dtype=torch.long, device=x.device)
        targets = targets.expand(n) if targets.ndim == 0 else targets
        if targets.shape != (n,):
            raise ValueError(f"class_idx must be an int or have shape ({n},)")
    out = torch.empty(n, *x.shape[-2:], dtype=torch.float32, device=x.device)
    with attack_mode(model), torch.enable_grad():
        for s in range(0, n, batch_size):
            sl = slice(s, s + batch_size)
            t = targets[sl] if targets is not None else None
            out[sl] = _cam_chunk(model, layer, x[sl], t).float()
    return out


def lesion_focus(cam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of each map's mass inside the lesion mask, (N,) in [0, 1].

    A map with no mass has no focus: NaN, which callers leave out of averages. A uniform map scores
    the mask's area fraction; a map equal to the mask scores 1.
    """
    if cam.shape != mask.shape:
        raise ValueError(f"cam {tuple(cam.shape)} and mask {tuple(mask.shape)} differ in shape")
    c = cam.double().clamp_min(0).flatten(1)
    m = mask.to(c.device).bool().flatten(1)
    total = c.sum(dim=1)
    inside = (c * m).sum(dim=1)
    share = inside / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, share, torch.full_like(share, float("nan"))).float()
