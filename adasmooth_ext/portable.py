"""A complete mixed classifier in one file, and a plain logits module for RobustBench.

The file is a checkpoint of :mod:`~adasmooth_ext.checkpoint` (safetensors, written atomically,
SHA-256 checked, kind ``"mixed-classifier"``): the weights in the safetensors body, and in its
JSON header how to rebuild everything around them:

- each base model as a **factory name** and its keyword arguments (JSON values). Factories are
  looked up in an allow-list held in code (:data:`FACTORIES`, :func:`register_factory`, or
  ``builders`` passed to :func:`load_mixed`), never imported by a path read from the file, and
  nothing is unpickled: loading a file never runs code that came with it;
- the output maps (``g``'s hard prediction, ``h``'s temperature or MixedNUTS map);
- the weight: a fixed ``α``, or a :class:`~adasmooth_ext.policy.PolicyNetwork`'s ``config`` and
  weights with the ``α`` range; and the temperatures ``s_g``, ``s_h``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .mixed import MixedClassifier
from .mixednuts import HardPrediction, MappedModel
from .models import small_cnn
from .policy import PolicyNetwork

__all__ = [
    "FACTORIES",
    "KIND",
    "LogitsModule",
    "ModelRef",
    "export_logits_module",
    "load_mixed",
    "register_factory",
    "save_mixed",
]

KIND = "mixed-classifier"

# The allow-list of base-model builders a file may name.
FACTORIES: dict[str, Callable[..., nn.Module]] = {"small_cnn": small_cnn}


def register_factory(name: str, factory: Callable[..., nn.Module]) -> None:
    """Allow files to name ``factory`` (a builder in your code) as ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_factory: name must be a non-empty string, got {name!r}")
    FACTORIES[name] = factory


@dataclass(frozen=True)
class ModelRef:
    """How to rebuild a base model: a factory name and its JSON-able keyword arguments."""

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def _unwrap(mixed: MixedClassifier) -> tuple[nn.Module, dict, nn.Module, dict]:
    std, rob = mixed.std_model, mixed.rob_model
    std_map: dict[str, Any] = {"hard": False}
    if isinstance(std, HardPrediction):
        std, std_map = std.model, {"hard": True, "scale": std.scale}
    rob_map: dict[str, Any] = {"k": None, "s": 1.0, "p": 1.0, "c": 0.0}
    if isinstance(rob, MappedModel):
        rob, rob_map = rob.model, {"k": rob.k, "s": rob.s, "p": rob.p, "c": rob.c}
    return std, std_map, rob, rob_map


def save_mixed(
    path: str | os.PathLike,
    mixed: MixedClassifier,
    std: ModelRef,
    rob: ModelRef,
    *,
    builders: Mapping[str, Callable[..., nn.Module]] | None = None,
) -> None:
    """Save ``mixed`` (base weights, maps, ``α`` or policy, range, scales) to ``path``.

    ``std`` / ``rob`` say how ``g`` / ``h`` are built (the models themselves, under any
    :class:`HardPrediction` / :class:`MappedModel` wrapper); each factory is called once here
    to check that its model takes the weights, so a file that cannot load is never written.
    """
    if not isinstance(mixed, MixedClassifier):
        raise TypeError(f"save_mixed: expected a MixedClassifier, got {type(mixed).__name__}")
    std_model, std_map, rob_model, rob_map = _unwrap(mixed)
    factories = {**FACTORIES, **(builders or {})}
    for which, ref, model in (("std", std, std_model), ("rob", rob, rob_model)):
        _load_weights(_build(ref.factory, ref.kwargs, factories), model.state_dict(), which, path)
    policy = mixed.policy
    if policy is not None and type(policy) is not PolicyNetwork:
        raise TypeError(
            f"save_mixed: only a PolicyNetwork can be rebuilt from a file, got "
            f"{type(policy).__name__}"
        )
    state = {
        "std": {"factory": std.factory, "kwargs": dict(std.kwargs), "map": std_map},
        "rob": {"factory": rob.factory, "kwargs": dict(rob.kwargs), "map": rob_map},
        "std_weights": std_model.state_dict(),
        "rob_weights": rob_model.state_dict(),
        "mixing": mixed.mixing_config(),
        "policy": None
        if policy is None
        else {"config": policy.config, "weights": policy.state_dict()},
    }
    save_checkpoint(path, state, KIND)


def _build(name: Any, kwargs: Any, factories: Mapping[str, Callable[..., nn.Module]]) -> nn.Module:
    if not isinstance(name, str) or name not in factories:
        raise CheckpointError(
            f"unknown model factory {name!r}; known: {sorted(factories)} (register yours with "
            "register_factory or pass builders=)"
        )
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"the kwargs of factory {name!r} must be a dict, got {kwargs!r}")
    try:
        return factories[name](**kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"factory {name!r} rejects its kwargs {kwargs}: {err}") from err


def _load_weights(module: nn.Module, weights: Any, what: str, path: Any) -> None:
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{path}: the {what} weights do not fit the model its factory builds: {err}"
        ) from err


def load_mixed(
    path: str | os.PathLike,
    *,
    builders: Mapping[str, Callable[..., nn.Module]] | None = None,
    device: str | torch.device = "cpu",
) -> MixedClassifier:
    """The :class:`MixedClassifier` saved by :func:`save_mixed`, in eval mode, on ``device``.

    ``builders`` extend :data:`FACTORIES` for this call. Raises :class:`CheckpointError` for a
    tampered, foreign or mismatched file (another kind, an unknown factory, weights that do not
    fit), without running anything from it.
    """
    path = os.fspath(path)
    state = load_checkpoint(
        path, KIND, required=("std", "rob", "std_weights", "rob_weights", "mixing", "policy")
    )
    factories = {**FACTORIES, **(builders or {})}
    try:
        std_spec, rob_spec, mixing = state["std"], state["rob"], state["mixing"]
        g = _build(std_spec["factory"], std_spec["kwargs"], factories)
        h = _build(rob_spec["factory"], rob_spec["kwargs"], factories)
        _load_weights(g, state["std_weights"], "std", path)
        _load_weights(h, state["rob_weights"], "rob", path)
        std_map, rob_map = std_spec["map"], rob_spec["map"]
        if std_map["hard"]:
            g = HardPrediction(g, std_map["scale"])
        if (rob_map["k"], rob_map["s"], rob_map["p"], rob_map["c"]) != (None, 1.0, 1.0, 0.0):
            h = MappedModel(h, rob_map["k"], rob_map["s"], rob_map["p"], rob_map["c"])
        policy = None
        if state["policy"] is not None:
            policy = PolicyNetwork(**state["policy"]["config"])
            _load_weights(policy, state["policy"]["weights"], "policy", path)
        range_ = mixing["alpha_range"]
        mixed = MixedClassifier(
            g,
            h,
            alpha=mixing["alpha"],
            policy=policy,
            std_scale=mixing["std_scale"],
            rob_scale=mixing["rob_scale"],
            alpha_range=None if range_ is None else tuple(range_),
        )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the mixed classifier cannot be rebuilt: {err!r}") from err
    return mixed.to(device).eval()


class LogitsModule(nn.Module):
    """``forward(x) → logits`` and nothing else; always in eval mode, nothing to train."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LogitsModule:
        """Stays in eval mode: a stray ``.train()`` must not switch batch norm to batch stats."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def export_logits_module(mixed: MixedClassifier) -> LogitsModule:
    """A plain logits-only module for RobustBench-style evaluation (the mix's log-probs)."""
    if not isinstance(mixed, MixedClassifier):
        raise TypeError(
            f"export_logits_module: expected a MixedClassifier, got {type(mixed).__name__}"
        )
    return LogitsModule(mixed)
