"""Intermediate features of any ``nn.Module``, recorded by layer name during its normal forward.

The policy network reads features of both base models; recording them with forward hooks
means each base model runs once per input, and the features and the logits come from the same
pass (and the same autograd graph, so white-box attacks see the policy's gradient path).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import partial
from typing import Any

from torch import Tensor, nn

__all__ = ["FeatureTap"]


class FeatureTap:
    """Records the outputs of ``model``'s layers named ``layers`` on every forward of ``model``.

    Example::

        tap = FeatureTap(g, ["stage1", "stage2"])
        logits, (shallow, deep) = tap(x)     # or: logits = g(x); tap.features

    Names are those of ``model.named_modules()`` (``"layer1"``, ``"features.4"``, ``"0"``).
    The record is cleared when ``model`` starts a forward, so :attr:`features` always belong
    to its latest input. The hooks stay on ``model`` until :meth:`remove` (or the end of a
    ``with`` block). A layer that runs more than once per forward keeps its last output.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        if isinstance(layers, str) or not layers:
            raise ValueError("layers must be a non-empty sequence of layer names")
        modules = dict(model.named_modules())
        for name in layers:
            if name not in modules or name == "":
                raise ValueError(_unknown_layer_message(model, name, modules))
        self.model = model
        self.layers = tuple(layers)
        self._outputs: dict[str, Tensor] = {}
        self._handles = [model.register_forward_pre_hook(lambda *_: self._outputs.clear())]
        self._handles += [
            modules[name].register_forward_hook(partial(self._record, name))
            for name in dict.fromkeys(self.layers)
        ]

    def _record(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"layer '{name}' ({type(module).__name__}) returned {type(output).__name__}, "
                "not a Tensor: tap a layer whose output is a feature map"
            )
        self._outputs[name] = output

    @property
    def features(self) -> list[Tensor]:
        """The recorded outputs, in the order of :attr:`layers`, from the latest forward."""
        missing = [name for name in self.layers if name not in self._outputs]
        if missing:
            raise RuntimeError(
                f"layers {missing} of {type(self.model).__name__} did not run in its latest "
                "forward (or it has not run yet): run the model before reading its features"
            )
        return [self._outputs[name] for name in self.layers]

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, list[Tensor]]:
        """One forward of the model: its output and the recorded features."""
        output = self.model(*args, **kwargs)
        return output, self.features

    def remove(self) -> None:
        """Detach the hooks from the model and drop the record."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _unknown_layer_message(model: nn.Module, name: str, modules: dict[str, nn.Module]) -> str:
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if close:
        hint = f"closest: {', '.join(close)}"
    else:
        hint = f"available: {', '.join(names[:20])}"
        hint += f", ... ({len(names)} in all, see model.named_modules())" if len(names) > 20 else ""
    return f"unknown layer {name!r} in {type(model).__name__}; {hint}"
