"""PolicyNetwork: shapes, wiring with FeatureTap and mix_gamma, BN/affine on γ, errors, α range."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from adasmooth_ext import MixedClassifier, mix, mix_gamma
from adasmooth_ext.features import FeatureTap
from adasmooth_ext.models import SMALL_CNN_TAPS, small_cnn
from adasmooth_ext.policy import PolicyNetwork


def frozen_pair(in_channels=1, width=4, num_classes=10):
    torch.manual_seed(1)
    models = [small_cnn(num_classes, in_channels, width) for _ in range(2)]
    return [FeatureTap(m.eval().requires_grad_(False), SMALL_CNN_TAPS) for m in models]


@pytest.mark.parametrize("size, channels", [(8, 1), (32, 3)], ids=["digits", "cifar"])
def test_policy_sizes_itself_and_returns_one_gamma_per_input(size, channels):
    g, h = frozen_pair(channels)
    x = torch.rand(5, channels, size, size)
    (_, g_features), (_, h_features) = g(x), h(x)
    policy = PolicyNetwork.from_features(g_features, h_features, width=8, blocks=(2, 1))
    assert policy.config == dict(
        std_channels=(4, 8),
        rob_channels=(4, 8),
        width=8,
        blocks=(2, 1),
        shallow_stride=2,
        std_layers=SMALL_CNN_TAPS,
        rob_layers=SMALL_CNN_TAPS,
    )
    assert policy(g_features, h_features).shape == (5,)
    assert sum(p.numel() for p in PolicyNetwork((16, 32), (16, 32)).parameters()) < 100_000


def test_policy_on_torchvision_features():
    g, h = (FeatureTap(resnet18(weights=None).eval(), ["layer1", "layer2"]) for _ in range(2))
    x = torch.rand(2, 3, 32, 32)
    (_, g_features), (_, h_features) = g(x), h(x)
    policy = PolicyNetwork.from_features(g_features, h_features, width=8).eval()
    assert policy.config["std_channels"] == (64, 128)
    assert policy(g_features, h_features).shape == (2,)


def test_wiring_trains_the_policy_only_and_keeps_the_input_gradient():
    g, h = frozen_pair()
    x = torch.rand(8, 1, 8, 8, requires_grad=True)
    y = torch.randint(0, 10, (8,))
    (g_logits, g_features), (h_logits, h_features) = g(x), h(x)
    policy = PolicyNetwork.from_features(g_features, h_features, width=8)
    gamma = policy(g_features, h_features)
    loss = F.nll_loss(mix_gamma(g_logits, h_logits, gamma), y)
    loss.backward()
    for name, param in policy.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    for tap in (g, h):
        assert all(p.grad is None for p in tap.model.parameters())
    # The white-box path: the loss reaches the input through the features and the policy too.
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gamma_is_batch_normalised_then_scaled_and_shifted():
    g, h = frozen_pair()
    x = torch.rand(64, 1, 8, 8)
    (_, g_features), (_, h_features) = g(x), h(x)
    policy = PolicyNetwork.from_features(g_features, h_features, width=8)
    gamma = policy(g_features, h_features)  # training mode: batch statistics
    torch.testing.assert_close(gamma.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(gamma.var(unbiased=False), torch.tensor(1.0), atol=1e-3, rtol=0)
    with torch.no_grad():
        policy.scale.fill_(2.0)
        policy.bias.fill_(-3.0)
    gamma = policy(g_features, h_features)
    torch.testing.assert_close(gamma.mean(), torch.tensor(-3.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(gamma.std(unbiased=False), torch.tensor(2.0), atol=2e-3, rtol=0)
    assert policy.gamma_norm.running_mean.item() != 0  # the running statistics moved


def test_eval_mode_gamma_does_not_depend_on_the_batch():
    g, h = frozen_pair()
    x = torch.rand(6, 1, 8, 8)
    (_, g_features), (_, h_features) = g(x), h(x)
    policy = PolicyNetwork.from_features(g_features, h_features, width=8)
    policy(g_features, h_features)  # one training step's worth of running statistics
    policy.eval()
    whole = policy(g_features, h_features)
    one_by_one = torch.cat(
        [
            policy([f[i : i + 1] for f in g_features], [f[i : i + 1] for f in h_features])
            for i in range(6)
        ]
    )
    torch.testing.assert_close(whole, one_by_one)
    assert whole.std() > 0


def example_features(batch=2, channels=(4, 8), sizes=(8, 4)):
    return [torch.rand(batch, c, s, s) for c, s in zip(channels, sizes, strict=True)]


@pytest.mark.parametrize(
    "std, rob, match",
    [
        (example_features()[:1], example_features(), r"std features must be \[shallow, deep\]"),
        (torch.rand(2, 4, 8, 8), example_features(), "got one tensor"),
        (example_features(), [torch.rand(2, 4, 8), torch.rand(2, 8, 4, 4)], "rob shallow"),
        (example_features(), example_features(channels=(4, 6)), r"rob features have .* \(4, 6\)"),
        (example_features(batch=3), example_features(), "batch sizes differ"),
        (example_features(), example_features(sizes=(6, 3)), "one spatial size"),
        (
            example_features(sizes=(8, 2)),
            example_features(sizes=(8, 2)),
            r"stride-2 stage: shallow 8×8 → 4×4, but deep are 2×2",
        ),
    ],
    ids=["one-map", "tensor", "not-4d", "channels", "batch", "std-vs-rob", "depths"],
)
def test_feature_mismatches_are_named(std, rob, match):
    policy = PolicyNetwork((4, 8), (4, 8), width=4)
    with pytest.raises(ValueError, match=match):
        policy(std, rob)


def test_from_features_infers_the_stride_and_checks_the_depths():
    same = example_features(sizes=(4, 4))
    assert PolicyNetwork.from_features(same, same).config["shallow_stride"] == 1
    odd = example_features(sizes=(7, 4))
    assert PolicyNetwork.from_features(odd, odd).config["shallow_stride"] == 2
    far = example_features(sizes=(8, 2))
    with pytest.raises(ValueError, match="deep are 2×2; tap other layers or set shallow_stride"):
        PolicyNetwork.from_features(far, far)
    assert PolicyNetwork.from_features(far, far, shallow_stride=4).config["shallow_stride"] == 4
    inverted = example_features(sizes=(4, 8))
    with pytest.raises(ValueError, match="stride-1 stage"):
        PolicyNetwork.from_features(inverted, inverted)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(width=0),
        dict(blocks=(1, 0)),
        dict(blocks=(1,)),
        dict(std_channels=(4,)),
        dict(shallow_stride=0),
    ],
)
def test_bad_configuration(kwargs):
    with pytest.raises(ValueError):
        PolicyNetwork(**{"std_channels": (4, 8), "rob_channels": (4, 8), **kwargs})


def bare_pair():
    torch.manual_seed(1)
    return [small_cnn(width=4).eval() for _ in range(2)]


def test_from_models_plugs_into_mixed_classifier_and_records_one_pass():
    g, h = bare_pair()
    x = torch.rand(6, 1, 8, 8)
    policy = PolicyNetwork.from_models(g, h, x, SMALL_CNN_TAPS, width=8).eval()
    assert (policy.std_layers, policy.rob_layers) == (SMALL_CNN_TAPS, SMALL_CNN_TAPS)
    calls = []
    g.register_forward_hook(lambda *_: calls.append("g"))
    out = MixedClassifier(g, h, policy=policy).forward_details(x)
    assert calls == ["g"], "g runs once per forward: features and logits from one pass"
    with FeatureTap(g, SMALL_CNN_TAPS) as gt, FeatureTap(h, SMALL_CNN_TAPS) as ht:
        g_logits, g_features = gt(x)
        h_logits, h_features = ht(x)
    gamma = policy(g_features, h_features)
    torch.testing.assert_close(out.gamma, gamma)
    torch.testing.assert_close(out.logits, mix_gamma(g_logits, h_logits, gamma))
    taps_left = [m for m in (g.stage1, g.stage2) if m._forward_hooks] + list(g._forward_pre_hooks)
    assert not taps_left, "the taps are removed after the pass"


def test_unknown_layers_and_shape_mismatch_are_named():
    g, h = bare_pair()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown layer 'stage9' in Sequential; closest: .*stage1"):
        PolicyNetwork.from_models(g, h, x, ["stage1", "stage9"])
    policy = PolicyNetwork.from_models(g, h, x, SMALL_CNN_TAPS)
    wide = small_cnn(width=6).eval()
    with pytest.raises(ValueError, match=r"rob features have .* \(6, 12\), but the policy was"):
        MixedClassifier(g, wide, policy=policy)(x)
    with pytest.raises(ValueError, match="rob_layers must name two layers"):
        PolicyNetwork((4, 8), (4, 8), rob_layers=["stage1"])


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (0.2, 0.9), (0.0, 0.5), (0.5, 1.0)])
def test_alpha_range_is_exact_and_finite_at_extreme_gammas(lo, hi):
    """The range lives in MixedClassifier only: α = lo + (hi − lo)·σ(γ), in log space."""

    class Fixed(nn.Module):
        def forward(self, x):
            return torch.tensor([-1e4, -50.0, -3.0, 0.0, 3.0, 50.0, 1e4], dtype=x.dtype)

    g, h = (nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).double() for _ in range(2))
    mixed = MixedClassifier(g, h, policy=Fixed(), alpha_range=(lo, hi))
    x = torch.rand(7, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    out = mixed.forward_details(x)
    alpha = lo + (hi - lo) * torch.sigmoid(out.gamma)
    torch.testing.assert_close(out.alpha, alpha)
    torch.testing.assert_close(out.logits, mix(g(x), h(x), alpha))
    out.logits.sum().backward()
    assert torch.isfinite(x.grad).all()
