"""FeatureTap: features by layer name from the same forward pass that gives the logits."""

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from adasmooth_ext.features import FeatureTap
from adasmooth_ext.models import SMALL_CNN_TAPS, small_cnn


def test_small_cnn_features_are_the_layers_outputs():
    model = small_cnn(num_classes=10, in_channels=1, width=4).eval()
    x = torch.rand(3, 1, 8, 8)
    with FeatureTap(model, SMALL_CNN_TAPS) as tap:
        logits, (shallow, deep) = tap(x)
    assert torch.equal(logits, model(x))
    assert torch.equal(shallow, model.stage1(x))
    assert torch.equal(deep, model.stage2(model.stage1(x)))
    assert shallow.shape == (3, 4, 8, 8) and deep.shape == (3, 8, 4, 4)


def test_plain_sequential_and_plain_model_call():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 3, 1))
    tap = FeatureTap(model, ["2", "0"])  # any order; features come back in this order
    x = torch.rand(2, 1, 5, 5)
    out = model(x)  # the model's ordinary forward records the features too
    last, first = tap.features
    assert torch.equal(last, out) and torch.equal(first, model[0](x))


def test_torchvision_resnet_layers():
    model = resnet18(weights=None, num_classes=10).eval()
    with FeatureTap(model, ["layer1", "layer2"]) as tap:
        logits, (layer1, layer2) = tap(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert layer1.shape == (2, 64, 8, 8) and layer2.shape == (2, 128, 4, 4)


def test_features_follow_the_latest_forward_and_keep_the_graph():
    model = small_cnn(width=4).eval()
    tap = FeatureTap(model, ["stage1"])
    model(torch.zeros(1, 1, 8, 8))
    x = torch.rand(1, 1, 8, 8, requires_grad=True)
    model(x)
    (feature,) = tap.features
    assert torch.equal(feature, model.stage1(x))
    feature.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_layer_lists_closest_names():
    with pytest.raises(ValueError, match=r"unknown layer 'layr1' in ResNet; closest: layer1"):
        FeatureTap(resnet18(weights=None), ["layr1"])


def test_unknown_layer_without_close_match_lists_available():
    with pytest.raises(ValueError, match=r"'zzz' in Sequential; available: stage1, stage1\.0"):
        FeatureTap(small_cnn(), ["zzz"])


@pytest.mark.parametrize("layers", [[], "stage1", [""]], ids=["empty", "string", "root"])
def test_bad_layer_lists(layers):
    with pytest.raises(ValueError):
        FeatureTap(small_cnn(), layers)


def test_reading_before_a_forward_or_a_skipped_layer():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x, use_b=False):
            return self.b(x) if use_b else self.a(x)

    model = Branchy()
    tap = FeatureTap(model, ["a", "b"])
    with pytest.raises(RuntimeError, match="did not run"):
        _ = tap.features
    with pytest.raises(RuntimeError, match=r"\['a'\] of Branchy did not run"):
        tap(torch.rand(1, 2), use_b=True)


def test_non_tensor_output_is_refused():
    model = nn.Sequential()
    model.add_module("rnn", nn.GRU(2, 3, batch_first=True))
    FeatureTap(model, ["rnn"])
    with pytest.raises(TypeError, match="layer 'rnn' \\(GRU\\) returned tuple"):
        model(torch.rand(1, 4, 2))


def test_remove_detaches_every_hook():
    model = small_cnn(width=4)
    with FeatureTap(model, SMALL_CNN_TAPS) as tap:
        assert model._forward_pre_hooks and model.stage1._forward_hooks
    assert not model._forward_pre_hooks and not model.stage1._forward_hooks
    assert not model.stage2._forward_hooks
    model(torch.rand(2, 1, 8, 8))
    with pytest.raises(RuntimeError, match="did not run"):
        _ = tap.features
