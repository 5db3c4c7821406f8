"""The policy network ``γ(x)`` of adaptive smoothing (DESIGN.md §3, paper Fig. 3), and ``α``.

Wiring: the policy names the layers it reads (``std_layers`` of ``g``, ``rob_layers`` of ``h``;
a shallow one and a deeper one at half the resolution) and :class:`~adasmooth_ext.mixed.
MixedClassifier` records them with :class:`~adasmooth_ext.features.FeatureTap` during the one
forward pass of each base model that also gives its logits, then mixes with ``α = σ(γ)``
(squeezed into its ``alpha_range``, which only the classifier applies)::

    policy = PolicyNetwork.from_models(g, h, x_example, ["stage1", "stage2"], width=16)
    mixed = MixedClassifier(g, h, policy=policy)   # calls policy(std_features, rob_features)

The features keep their autograd graph back to ``x``, so a white-box attack differentiates
through the policy; only the policy's parameters train.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import FeatureTap
from .models import SMALL_CNN_TAPS

__all__ = ["PolicyNetwork"]


class _ResBlock(nn.Module):
    """Pre-activation residual block (BN-ReLU-conv ×2); a 1×1 projection when shapes change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.project = None
        if stride != 1 or in_channels != out_channels:
            self.project = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.project is None else self.project(out)
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + shortcut


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` residual blocks, the first one changing the width and the resolution."""
    return nn.Sequential(
        _ResBlock(in_channels, out_channels, stride),
        *(_ResBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)),
    )


def _feature_pair(features: Sequence[Tensor], model: str) -> tuple[Tensor, Tensor]:
    if isinstance(features, Tensor) or len(features) != 2:
        got = "one tensor" if isinstance(features, Tensor) else f"{len(features)} items"
        raise ValueError(f"{model} features must be [shallow, deep], two tensors; got {got}")
    for depth, feature in zip(("shallow", "deep"), features, strict=True):
        if not isinstance(feature, Tensor) or feature.dim() != 4:
            shape = tuple(feature.shape) if isinstance(feature, Tensor) else type(feature).__name__
            raise ValueError(f"{model} {depth} features must be [B, C, H, W] maps, got {shape}")
    return features[0], features[1]


def _downsampled(size: Sequence[int], stride: int) -> tuple[int, ...]:
    """Spatial size after a 3×3, padding-1 convolution with ``stride``."""
    return tuple((s - 1) // stride + 1 for s in size)


class PolicyNetwork(nn.Module):
    """``γ`` from the features of ``g`` (std) and ``h`` (rob) at two depths (paper Fig. 3).

    The shallow maps of both models are concatenated and go through residual blocks whose
    first has stride ``shallow_stride``; the deep maps, concatenated, are batch-normalised,
    reduced by a 1×1 convolution and added; more residual blocks (stride 2, twice the
    width), global average pooling and a linear layer give one scalar per input. Finally
    ``BatchNorm1d(1, affine=False)`` standardises ``γ`` over the batch (running statistics
    in eval mode) and the learnable ``γ·scale + bias`` sets its spread and offset.

    Args:
        std_channels, rob_channels: channels of each model's (shallow, deep) feature maps.
        width: channels of the first stage (the second has ``2·width``).
        blocks: residual blocks in the stage before and the stage after the merge.
        shallow_stride: stride of the first stage; the deep maps must have the size of the
            shallow maps after it (2 for adjacent stages of most CNNs).
        std_layers, rob_layers: the (shallow, deep) layer names of ``g`` and ``h`` the policy
            reads (:class:`~adasmooth_ext.mixed.MixedClassifier`'s policy protocol).

    ``forward(std_features, rob_features)`` takes ``[shallow, deep]`` of each model and returns
    ``γ`` of shape ``[B]``. :meth:`from_models` / :meth:`from_features` size the network from
    example inputs / features;
    ``config`` holds the constructor's arguments (JSON-able), to save beside the weights and
    rebuild with ``PolicyNetwork(**config)``.
    """

    def __init__(
        self,
        std_channels: tuple[int, int],
        rob_channels: tuple[int, int],
        width: int = 32,
        blocks: tuple[int, int] = (1, 1),
        shallow_stride: int = 2,
        std_layers: Sequence[str] = SMALL_CNN_TAPS,
        rob_layers: Sequence[str] = SMALL_CNN_TAPS,
    ) -> None:
        super().__init__()
        std_channels, rob_channels, blocks = tuple(std_channels), tuple(rob_channels), tuple(blocks)
        self.std_layers, self.rob_layers = tuple(std_layers), tuple(rob_layers)
        for name, value in (("std_layers", self.std_layers), ("rob_layers", self.rob_layers)):
            if len(value) != 2 or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must name two layers (shallow, deep), got {value}")
        for name, value in (("std_channels", std_channels), ("rob_channels", rob_channels)):
            if len(value) != 2 or min(value) < 1:
                raise ValueError(f"{name} must be two positive channel counts, got {value}")
        if len(blocks) != 2 or min(blocks) < 1 or width < 1 or shallow_stride < 1:
            raise ValueError(
                "width, shallow_stride and both entries of blocks must be positive, got "
                f"width={width}, blocks={blocks}, shallow_stride={shallow_stride}"
            )
        self.config = dict(
            std_channels=std_channels,
            rob_channels=rob_channels,
            width=width,
            blocks=blocks,
            shallow_stride=shallow_stride,
            std_layers=self.std_layers,
            rob_layers=self.rob_layers,
        )
        deep = std_channels[1] + rob_channels[1]
        self.shallow = _stage(std_channels[0] + rob_channels[0], width, blocks[0], shallow_stride)
        self.deep = nn.Sequential(nn.BatchNorm2d(deep), nn.Conv2d(deep, width, 1, bias=False))
        self.merged = _stage(width, 2 * width, blocks[1], 2)
        self.head = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, 1, bias=False),  # a bias would be removed by the norm below
        )
        self.gamma_norm = nn.BatchNorm1d(1, affine=False)
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))

    @classmethod
    def from_models(
        cls,
        std_model: nn.Module,
        rob_model: nn.Module,
        x: Tensor,
        std_layers: Sequence[str] = SMALL_CNN_TAPS,
        rob_layers: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> PolicyNetwork:
        """A policy sized for the named layers of ``g`` and ``h``, from one example batch ``x``
        (``rob_layers`` default to ``std_layers``)."""
        rob_layers = std_layers if rob_layers is None else rob_layers
        features = []
        for model, layers in ((std_model, std_layers), (rob_model, rob_layers)):
            with FeatureTap(model, layers) as tap, torch.no_grad():
                features.append(tap(x)[1])
        return cls.from_features(*features, std_layers=std_layers, rob_layers=rob_layers, **kwargs)

    @classmethod
    def from_features(
        cls, std_features: Sequence[Tensor], rob_features: Sequence[Tensor], **kwargs: Any
    ) -> PolicyNetwork:
        """A policy sized for these example features: channels and ``shallow_stride``."""
        (std_shallow, std_deep), (rob_shallow, rob_deep) = (
            _feature_pair(std_features, "std"),
            _feature_pair(rob_features, "rob"),
        )
        # 1 for maps of one size, else 2 (7×7 → 4×4 included); larger strides only if asked.
        kwargs.setdefault("shallow_stride", 1 if std_shallow.shape[2] <= std_deep.shape[2] else 2)
        policy = cls(
            (std_shallow.shape[1], std_deep.shape[1]),
            (rob_shallow.shape[1], rob_deep.shape[1]),
            **kwargs,
        )
        policy.check_features(std_features, rob_features)
        return policy

    def check_features(
        self, std_features: Sequence[Tensor], rob_features: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Validate both models' ``[shallow, deep]`` maps; return the two concatenated pairs."""
        pairs = {
            "std": _feature_pair(std_features, "std"),
            "rob": _feature_pair(rob_features, "rob"),
        }
        for model, pair in pairs.items():
            got, built = tuple(m.shape[1] for m in pair), self.config[f"{model}_channels"]
            if got != built:
                raise ValueError(
                    f"{model} features have (shallow, deep) channels {got}, "
                    f"but the policy was built for {built}"
                )
        (std_shallow, std_deep), (rob_shallow, rob_deep) = pairs["std"], pairs["rob"]
        batches = [m.shape[0] for m in (std_shallow, std_deep, rob_shallow, rob_deep)]
        if len(set(batches)) > 1:
            raise ValueError(f"feature batch sizes differ: std {batches[:2]}, rob {batches[2:]}")
        for depth, std, rob in (
            ("shallow", std_shallow, rob_shallow),
            ("deep", std_deep, rob_deep),
        ):
            if std.shape[2:] != rob.shape[2:]:
                raise ValueError(
                    f"std and rob {depth} maps must have one spatial size to be concatenated, "
                    f"got {_hw(std.shape)} and {_hw(rob.shape)}"
                )
        stride = self.config["shallow_stride"]
        expected = _downsampled(std_shallow.shape[2:], stride)
        if tuple(std_deep.shape[2:]) != expected:
            raise ValueError(
                f"the deep maps must match the shallow maps after the stride-{stride} stage: "
                f"shallow {_hw(std_shallow.shape)} → {_hw(expected)}, but deep are "
                f"{_hw(std_deep.shape)}; tap other layers or set shallow_stride"
            )
        return torch.cat([std_shallow, rob_shallow], 1), torch.cat([std_deep, rob_deep], 1)

    def forward(self, std_features: Sequence[Tensor], rob_features: Sequence[Tensor]) -> Tensor:
        shallow, deep = self.check_features(std_features, rob_features)
        x = self.merged(self.shallow(shallow) + self.deep(deep))
        gamma = self.gamma_norm(self.head(x)).squeeze(1)
        return gamma * self.scale + self.bias


def _hw(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape[-2:])
