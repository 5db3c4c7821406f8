"""Small base models with obvious layer names, for the demo, the tests and quick experiments."""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["SMALL_CNN_TAPS", "load_small_cnn", "save_small_cnn", "small_cnn"]

# The two depths of small_cnn the policy reads: full and half resolution.
SMALL_CNN_TAPS = ("stage1", "stage2")


def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Sequential:
    """A three-stage CNN for small images (digits 8×8, CIFAR 32×32): ``[B, C, H, W] → [B, K]``.

    Layers: ``stage1`` (``width`` channels, H×W), ``stage2`` (``2·width``, H/2), ``stage3``
    (``4·width``, H/4), each conv-BN-ReLU; then ``pool`` and the linear ``head``. Inputs are
    images in ``[0, 1]``; :data:`SMALL_CNN_TAPS` are the layers to hand to the policy.
    """
    if min(num_classes, in_channels, width) < 1:
        raise ValueError(
            f"num_classes, in_channels and width must be positive, "
            f"got {num_classes}, {in_channels}, {width}"
        )

    def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),  # not in place: any tapped output must stay as recorded
        )

    return nn.Sequential(
        OrderedDict(
            stage1=stage(in_channels, width, 1),
            stage2=stage(width, 2 * width, 2),
            stage3=stage(2 * width, 4 * width, 2),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            head=nn.Linear(4 * width, num_classes),
        )
    )


def save_small_cnn(path: str | os.PathLike, model: nn.Module, config: dict) -> None:
    """Save a :func:`small_cnn` built with ``config`` (its keyword arguments), atomically."""
    save_checkpoint(path, {"config": dict(config), "model": model.state_dict()}, "small-cnn")


def load_small_cnn(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Sequential:
    """The :func:`small_cnn` saved at ``path``, in eval mode, on ``device``."""
    state = load_checkpoint(path, "small-cnn", required=("config", "model"), device=device)
    model = small_cnn(**state["config"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit its config ({err})") from None
    return model.to(device).eval()
