"""PolicyNetwork: shapes, wiring with FeatureTap and mix_gamma, BN/affine on γ, errors, α range."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet18

from adasmooth_ext import mix, mix_gamma
from adasmooth_ext.features import FeatureTap
from adasmooth_ext.models import SMALL_CNN_TAPS, small_cnn
from adasmooth_ext.policy import PolicyNetwork, alpha_from_gamma, squeeze_gamma


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
        std_channels=(4, 8), rob_channels=(4, 8), width=8, blocks=(2, 1), shallow_stride=2
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


EXTREME = torch.tensor([-1e4, -50.0, -3.0, 0.0, 3.0, 50.0, 1e4])


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (0.2, 0.9), (0.0, 0.5), (0.5, 1.0)])
def test_alpha_stays_in_range_and_squeezed_gamma_matches(lo, hi):
    alpha = alpha_from_gamma(EXTREME, lo, hi)
    assert (alpha >= lo).all() and (alpha <= hi).all()
    assert alpha[0] == lo and alpha[-1] == hi
    squeezed = squeeze_gamma(EXTREME.double(), lo, hi)
    torch.testing.assert_close(torch.sigmoid(squeezed), alpha.double(), atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (0.2, 0.9), (0.0, 0.5), (0.5, 1.0)])
def test_mix_gamma_with_squeezed_gamma_is_mix_with_alpha(lo, hi):
    gamma = torch.linspace(-20, 20, 9, dtype=torch.float64)  # α not yet rounded to 0 or 1
    g_logits, h_logits = torch.randn(2, 9, 5, dtype=torch.float64)
    z = mix_gamma(g_logits, h_logits, squeeze_gamma(gamma, lo, hi))
    torch.testing.assert_close(z, mix(g_logits, h_logits, alpha_from_gamma(gamma, lo, hi)))


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (0.2, 0.9), (0.0, 0.5), (0.5, 1.0)])
def test_squeezed_gamma_has_finite_gradients_at_extremes(lo, hi):
    g_logits, h_logits = 100 * torch.randn(2, len(EXTREME), 5)
    gamma = EXTREME.clone().requires_grad_()
    z = mix_gamma(g_logits, h_logits, squeeze_gamma(gamma, lo, hi))
    assert torch.isfinite(z).all()
    z.sum().backward()
    assert torch.isfinite(gamma.grad).all()


def test_squeeze_gamma_identity_and_constants():
    assert squeeze_gamma(EXTREME) is EXTREME
    assert torch.all(squeeze_gamma(EXTREME, 0.0, 0.0) == -float("inf"))
    assert torch.all(squeeze_gamma(EXTREME, 1.0, 1.0) == float("inf"))
    g_logits, h_logits = torch.randn(len(EXTREME), 4), torch.randn(len(EXTREME), 4)
    z = mix_gamma(g_logits, h_logits, squeeze_gamma(EXTREME, 0.0, 0.0))
    torch.testing.assert_close(z, F.log_softmax(g_logits, -1))
    gamma = EXTREME.clone().requires_grad_()
    assert not squeeze_gamma(gamma, 0.3, 0.3).requires_grad  # a constant α has no γ to train


@pytest.mark.parametrize("lo, hi", [(-0.1, 0.5), (0.6, 0.5), (0.0, 1.5)])
def test_bad_alpha_range(lo, hi):
    with pytest.raises(ValueError, match="0 ≤ lo ≤ hi ≤ 1"):
        alpha_from_gamma(EXTREME, lo, hi)
    with pytest.raises(ValueError, match="0 ≤ lo ≤ hi ≤ 1"):
        squeeze_gamma(EXTREME, lo, hi)
