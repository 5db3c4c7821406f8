"""MixedClassifier, PGD / APGD, evaluate and AutoAttack on small digits CNNs trained here.

The models (scikit-learn's bundled 8x8 digits, pixels in [0, 1]) train in seconds in a
module-scoped fixture; attack budgets are small where the point still holds.
"""

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from sklearn.datasets import load_digits
from torch import nn

from adasmooth_ext import MixedClassifier, mix
from adasmooth_ext.attacks import (
    APGD,
    PGD,
    ExternalAttack,
    autoattack,
    autoattack_backend,
    dlr_loss,
    evaluate,
)
from adasmooth_ext.reference import mix_gamma_reference, naive_mix

WIDTH = 8


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, WIDTH, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(WIDTH, 2 * WIDTH, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * WIDTH * 16, 10),
    )


def train(x, y, seed: int, noise: float = 0.0, epochs: int = 8) -> nn.Module:
    """Adam on cross-entropy; Gaussian input noise makes a (somewhat) more robust model."""
    torch.manual_seed(seed)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(128):
            xb = (x[idx] + noise * torch.randn_like(x[idx])).clamp(0, 1)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


@pytest.fixture(scope="module")
def models(digits):
    """(g, h): a standard CNN and one trained on noisy inputs."""
    x, y = digits[0], digits[1]
    return train(x, y, seed=0), train(x, y, seed=1, noise=0.3)


@pytest.fixture(scope="module")
def test_set(digits):
    return digits[2][:240], digits[3][:240]


def correct_subset(model, x, y):
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    return x[keep], y[keep]


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


class FeaturePolicy(nn.Module):
    """A tiny policy reading the first block of g and h through the feature protocol."""

    std_layers = ("1",)
    rob_layers = ("1",)

    def __init__(self, bias: float = 0.0, gain: float = 10.0):
        super().__init__()
        self.head = nn.Linear(2 * WIDTH * 64, 1)
        self.bias, self.gain = bias, gain  # gain: a policy whose α reacts to perturbations

    def forward(self, std_features, rob_features):
        features = torch.cat([std_features[0].flatten(1), rob_features[0].flatten(1)], 1)
        return self.gain * self.head(features) + self.bias  # [B, 1]


class InputPolicy(nn.Module):
    """A policy on the input alone (no layer attributes: called as policy(x))."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))

    def forward(self, x):
        return 3 * self.head(x).squeeze(1)


# ---------------------------------------------------------------------------------------------
# MixedClassifier


def test_fixed_alpha_forward_is_mix_of_base_logits(models, test_set):
    g, h = models
    x = test_set[0][:32]
    mixed = MixedClassifier(g, h, alpha=0.3, std_scale=2.0, rob_scale=0.5)
    with torch.no_grad():
        out = mixed.forward_details(x)
        expected = mix(g(x), h(x), 0.3, 2.0, 0.5)
    torch.testing.assert_close(mixed(x), expected)
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.std_logits, g(x))
    torch.testing.assert_close(out.rob_logits, h(x))
    assert out.gamma is None and out.alpha.shape == (32,) and (out.alpha == 0.3).all()
    torch.testing.assert_close(out.logits.logsumexp(1), torch.zeros(32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy_cls", [FeaturePolicy, InputPolicy])
def test_policy_forward_details_one_pass(models, test_set, policy_cls):
    g, h = models
    x = test_set[0][:16]
    mixed = MixedClassifier(g, h, policy=policy_cls(), rob_scale=1.5)
    calls = []
    hooks = [
        m.register_forward_hook(lambda *a, n=n: calls.append(n)) for n, m in (("g", g), ("h", h))
    ]
    try:
        out = mixed.forward_details(x)
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(calls) == ["g", "h"], "each base model runs once per forward"
    assert out.gamma.shape == (16,) and out.alpha.shape == (16,)
    torch.testing.assert_close(out.alpha, torch.sigmoid(out.gamma))
    with torch.no_grad():
        expected = mix_gamma_reference(g(x), h(x), out.gamma, 1.0, 1.5)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed(x), out.logits)


def test_feature_policy_gets_the_named_layers(models, test_set):
    g, h = models
    seen = {}

    class Spy(FeaturePolicy):
        def forward(self, std_features, rob_features):
            seen["std"], seen["rob"] = std_features[0], rob_features[0]
            return super().forward(std_features, rob_features)

    x = test_set[0][:4]
    MixedClassifier(g, h, policy=Spy())(x)
    with torch.no_grad():
        torch.testing.assert_close(seen["std"], g[:2](x))
        torch.testing.assert_close(seen["rob"], h[:2](x))


def test_base_models_frozen_and_eval_policy_trains(models, test_set):
    g, h = models
    drop_g = nn.Sequential(g, nn.Dropout(0.5))  # dropout would make a training-mode g random
    mixed = MixedClassifier(drop_g, h, policy=InputPolicy())
    assert not mixed.training, "constructed in eval mode"
    mixed.train()
    assert mixed.policy.training and not drop_g.training and not h.training
    assert not any(p.requires_grad for p in drop_g.parameters())
    assert not any(p.requires_grad for p in h.parameters())
    assert all(p.requires_grad for p in mixed.policy.parameters())
    x = test_set[0][:8]
    torch.testing.assert_close(mixed(x), mixed(x), rtol=0, atol=0)
    h.train()
    try:
        with pytest.raises(RuntimeError, match="rob_model is in training mode"):
            mixed(x)
    finally:
        h.eval()


def test_detach_alpha_cuts_the_policy_gradient(models, test_set):
    g, h = models
    mixed = MixedClassifier(g, h, policy=FeaturePolicy())
    x, y = test_set[0][:16].clone().requires_grad_(), test_set[1][:16]  # as in an attack
    for detach, expect_grad in ((False, True), (True, False)):
        mixed.zero_grad()
        out = mixed.forward_details(x, detach_alpha=detach)
        F.nll_loss(out.logits, y).backward(retain_graph=True)
        grad = mixed.policy.head.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == expect_grad
        assert out.gamma.requires_grad, "gamma keeps its graph for the adaptive term"


@pytest.mark.parametrize("lo,hi", [(0.2, 0.9), (0.0, 0.5), (0.5, 1.0)])
def test_alpha_range(models, test_set, lo, hi):
    g, h = models
    policy = InputPolicy()
    mixed = MixedClassifier(g, h, policy=policy, alpha_range=(lo, hi))
    x = test_set[0][:16]
    for scale in (1.0, 1e3, -1e3):  # moderate and saturated gammas
        with torch.no_grad():
            policy.head[1].weight.mul_(scale)
        out = mixed.forward_details(x)
        gamma = out.gamma.detach().double()
        torch.testing.assert_close(out.alpha.double(), lo + (hi - lo) * torch.sigmoid(gamma))
        assert ((out.alpha >= lo) & (out.alpha <= hi)).all()
        assert torch.isfinite(out.logits).all()
        grad = torch.autograd.grad(out.logits[:, 0].sum(), out.gamma)[0]
        assert torch.isfinite(grad).all()
        with torch.no_grad():
            policy.head[1].weight.div_(scale)


def test_mixed_bad_input(models):
    g, h = models
    for kwargs, match in [
        ({}, "exactly one"),
        ({"alpha": 0.5, "policy": InputPolicy()}, "exactly one"),
        ({"alpha": 1.5}, r"alpha must lie in \[0, 1\]"),
        ({"alpha": 0.5, "std_scale": 0.0}, "must be positive"),
        ({"alpha": 0.5, "alpha_range": (0.1, 0.9)}, "applies to a policy"),
        ({"policy": InputPolicy(), "alpha_range": (0.6, 0.4)}, "0 <= lo < hi <= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            MixedClassifier(g, h, **kwargs)

    class BadLayers(FeaturePolicy):
        rob_layers = ("features.3",)

    match = r"rob_layers \['features.3'\] do not fit rob_model: unknown layer 'features.3'"
    with pytest.raises(ValueError, match=match):
        MixedClassifier(g, h, policy=BadLayers())

    class WrongShape(InputPolicy):
        def forward(self, x):
            return torch.zeros(x.shape[0], 2)

    with pytest.raises(ValueError, match=r"\[B\] or \[B, 1\]"):
        MixedClassifier(g, h, policy=WrongShape())(torch.rand(3, 1, 8, 8))


# ---------------------------------------------------------------------------------------------
# PGD and APGD


SEEDS = 3
OURS_VS_TORCHATTACKS = {  # equal budgets: (ours(seed), theirs(model, seed))
    "PGD-Linf": (
        lambda s: PGD(eps=0.1, steps=10, step_size=0.025, seed=s),
        lambda m, s: torchattacks.PGD(m, eps=0.1, alpha=0.025, steps=10),
    ),
    "PGD-L2": (
        lambda s: PGD(eps=0.75, norm="L2", steps=10, step_size=0.2, seed=s),
        lambda m, s: torchattacks.PGDL2(m, eps=0.75, alpha=0.2, steps=10),
    ),
    "APGD-CE-Linf": (
        lambda s: APGD(eps=0.1, steps=10, seed=s),
        lambda m, s: torchattacks.APGD(m, eps=0.1, steps=10, loss="ce", seed=s),
    ),
    "APGD-CE-L2": (
        lambda s: APGD(eps=0.75, norm="L2", steps=10, seed=s),
        lambda m, s: torchattacks.APGD(m, norm="L2", eps=0.75, steps=10, loss="ce", seed=s),
    ),
    "APGD-DLR-Linf": (
        lambda s: APGD(eps=0.1, steps=10, loss="dlr", seed=s),
        lambda m, s: torchattacks.APGD(m, eps=0.1, steps=10, loss="dlr", seed=s),
    ),
}


@pytest.mark.parametrize("which", ["rob", "mixed"])
@pytest.mark.parametrize("name", list(OURS_VS_TORCHATTACKS))
def test_not_weaker_than_torchattacks(models, test_set, which, name):
    g, h = models
    model = h if which == "rob" else MixedClassifier(g, h, alpha=0.5)
    x, y = correct_subset(model, *test_set)
    ours, theirs = OURS_VS_TORCHATTACKS[name]
    ours_acc = theirs_acc = 0.0
    for seed in range(SEEDS):  # the mean over random starts: a single start varies by ~1 point
        ours_acc += accuracy(model, ours(seed)(model, x, y), y) / SEEDS
        torch.manual_seed(seed)  # torchattacks draws its random starts from the global generator
        theirs_acc += accuracy(model, theirs(model, seed)(x, y), y) / SEEDS
    assert 0.05 < theirs_acc < 0.95, "budget should leave the comparison informative"
    assert ours_acc <= theirs_acc + 0.01


@pytest.mark.parametrize("cls", [PGD, APGD])
@pytest.mark.parametrize("norm,eps", [("Linf", 0.08), ("L2", 0.6)])
def test_attacks_respect_ball_box_and_seed(models, test_set, cls, norm, eps):
    g, h = models
    mixed = MixedClassifier(g, h, alpha=0.5)
    x, y = test_set[0][:64], test_set[1][:64]
    per_sample = torch.linspace(0, 2 * eps, 64)
    for radius in (eps, per_sample):
        attack = cls(eps=radius, norm=norm, steps=8, restarts=2)
        x_adv = attack(mixed, x, y)
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
        assert (size <= torch.as_tensor(radius) + 1e-5).all()
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert accuracy(mixed, x_adv, y) < accuracy(mixed, x, y)
        torch.testing.assert_close(attack(mixed, x, y), x_adv, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [PGD, APGD])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_other_input_dtypes(models, test_set, cls, dtype):
    g, h = (copy.deepcopy(m).to(dtype) for m in models)
    mixed = MixedClassifier(g, h, alpha=0.5)
    x, y = test_set[0][:64].to(dtype), test_set[1][:64]
    x_adv = cls(eps=0.1, steps=5)(mixed, x, y)
    assert x_adv.dtype == dtype
    assert (x_adv - x).abs().max() <= 0.1 + torch.finfo(dtype).eps
    assert accuracy(mixed, x_adv, y) < accuracy(mixed, x, y)


def test_targeted_apgd_at_least_as_strong_as_one_target(models, test_set):
    g, h = models
    x, y = correct_subset(h, *test_set)
    one = accuracy(h, APGD(eps=0.1, steps=10, loss="dlr-targeted", n_targets=1)(h, x, y), y)
    three = accuracy(h, APGD(eps=0.1, steps=10, loss="dlr-targeted", n_targets=3)(h, x, y), y)
    assert three <= one and three < 0.9


def test_gradient_targets(models, test_set):
    g, h = models
    mixed = MixedClassifier(g, h, alpha=0.5)
    x, y = correct_subset(mixed, *test_set)

    def attack(target):
        return PGD(eps=0.2, steps=10, target=target)(mixed, x, y)

    on_g, on_h = attack("std"), attack("rob")
    assert accuracy(g, on_g, y) < 0.1, "a transfer attack on g alone breaks g"
    assert accuracy(h, on_h, y) < accuracy(h, on_g, y) - 0.2, "attacking h hurts h more"
    # With a fixed α there is no policy: gray-box and white-box are the same attack.
    torch.testing.assert_close(attack("mix-graybox"), attack("mix"), rtol=0, atol=0)


def test_surrogate_target_attacks_a_model_without_gradients(models, test_set):
    """A piecewise-constant model gives no gradient; a surrogate's gradient still breaks it,
    with success judged on the true model."""
    g, _ = models

    class HardPrediction(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return F.one_hot(self.model(x).argmax(1), 10).float()

    hard = HardPrediction(g).eval()
    x, y = correct_subset(hard, *test_set)
    direct = accuracy(hard, PGD(eps=0.15, steps=10)(hard, x, y), y)
    via_g = accuracy(hard, PGD(eps=0.15, steps=10, target=g)(hard, x, y), y)
    assert direct > 0.8 and via_g < direct - 0.5


def test_adaptive_term_lowers_alpha(models, test_set):
    g, h = models
    torch.manual_seed(0)
    mixed = MixedClassifier(g, h, policy=FeaturePolicy())
    x, y = test_set[0][:128], test_set[1][:128]

    def mean_alpha(**kwargs):
        x_adv = PGD(eps=0.1, steps=10, **kwargs)(mixed, x, y)
        with torch.no_grad():
            return mixed.forward_details(x_adv).alpha.mean().item()

    plain = mean_alpha(w=0.0)
    assert mean_alpha(w=0.5) < plain - 0.1
    assert mean_alpha(w=0.5, target="mix-graybox") < plain - 0.1


def test_non_saturating_term_beats_bce_on_a_confident_policy(models, test_set):
    """BCE(γ, 1)'s gradient vanishes at large γ; −γ keeps pushing α toward g."""
    g, h = models
    torch.manual_seed(0)
    mixed = MixedClassifier(g, h, policy=FeaturePolicy(bias=6.0))
    x, y = test_set[0][:128], test_set[1][:128]

    def mean_gamma(form):
        x_adv = PGD(eps=0.1, steps=10, w=0.5, alpha_loss=form)(mixed, x, y)
        with torch.no_grad():
            return mixed.forward_details(x_adv).gamma.mean().item()

    assert mean_gamma("neg-gamma") < mean_gamma("bce") - 0.5


class NaiveMixed(nn.Module):
    """The same mixture as ``log`` of summed softmaxes: underflows on large logit gaps."""

    def __init__(self, g, h, alpha, scale):
        super().__init__()
        self.g, self.h, self.alpha, self.scale = g, h, alpha, scale

    def forward(self, x):
        return naive_mix(self.g(x), self.h(x), self.alpha, self.scale, self.scale)


def test_no_gradient_masking_on_large_logit_gaps(models, test_set):
    """Temperatures of 10 make logit gaps of ~100: the summed probabilities underflow, the naive
    model's gradients turn NaN and APGD-CE stalls; through the fused op it still breaks most of
    the inputs where g alone is breakable."""
    g, h = models
    stable = MixedClassifier(g, h, alpha=0.2, std_scale=10.0, rob_scale=10.0)
    naive = NaiveMixed(g, h, 0.2, 10.0).eval()
    x, y = correct_subset(stable, *test_set)
    with torch.no_grad():
        assert torch.isinf(naive(x)).any(1).float().mean() > 0.5, "premise: underflow"
        torch.testing.assert_close(naive(x).argmax(1), stable(x).argmax(1))
    attack = APGD(eps=0.1, steps=20)
    g_breakable = g(attack(g, x, y)).argmax(1) != y
    assert g_breakable.float().mean() > 0.2

    broken_stable = stable(attack(stable, x, y)).argmax(1) != y
    with pytest.warns(UserWarning, match="non-finite gradients"):
        x_naive = attack(naive, x, y)
    broken_naive = naive(x_naive).argmax(1) != y
    assert broken_stable[g_breakable].float().mean() > 0.5
    assert broken_naive.float().mean() < 0.1


def test_dlr_loss_matches_definition():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 5.0]])
    y = torch.tensor([0, 1])
    expected = torch.tensor([-(3.0 - 1.0) / (3.0 - 0.0), -(2.0 - 5.0) / (5.0 - 1.0)])
    torch.testing.assert_close(dlr_loss(logits, y), expected)


def test_attack_bad_input(models, test_set):
    g, h = models
    mixed = MixedClassifier(g, h, alpha=0.5)
    x, y = test_set[0][:8], test_set[1][:8]
    for kwargs, match in [
        ({"eps": -0.1}, "eps must be finite and >= 0"),
        ({"eps": float("nan")}, "eps must be finite and >= 0"),
        ({"eps": 0.1, "norm": "L1"}, "norm must be one of"),
        ({"eps": 0.1, "loss": "hinge"}, "loss must be one of"),
        ({"eps": 0.1, "target": "policy"}, "target must be one of"),
        ({"eps": 0.1, "alpha_loss": "mse"}, "alpha_loss must be one of"),
        ({"eps": 0.1, "w": 1.5}, r"w must lie in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            PGD(**kwargs)
    for model, attack, args, match in [
        (mixed, PGD(eps=0.1), (x, y + 10), r"labels must lie in \[0, 10\)"),
        (mixed, PGD(eps=0.1), (x, y[:4]), "y must be"),
        (mixed, PGD(eps=0.1), (x, y.float()), "y must be"),
        (mixed, PGD(eps=0.1), (x * 2, y), r"inputs must lie in the box"),
        (mixed, PGD(eps=torch.full((3,), 0.1)), (x, y), r"\[B\] tensor with B = 8"),
        (mixed, PGD(eps=-torch.ones(8)), (x, y), "eps must be finite and >= 0"),
        (g, PGD(eps=0.1, target="std"), (x, y), "needs a MixedClassifier"),
        (mixed, PGD(eps=0.1, w=0.5), (x, y), "needs a MixedClassifier with a policy"),
    ]:
        with pytest.raises(ValueError, match=match):
            attack(model, *args)
    g.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            APGD(eps=0.1)(g, x, y)
    finally:
        g.eval()


# ---------------------------------------------------------------------------------------------
# evaluate and AutoAttack


def batches(x, y, size):
    return list(zip(x.split(size), y.split(size), strict=True))


def test_evaluate_table(models, test_set):
    g, h = models
    mixed = MixedClassifier(g, h, alpha=0.5)
    x, y = test_set
    attacks = [PGD(eps=0.1, steps=5), APGD(eps=0.1, steps=5, target="std")]
    table = evaluate(mixed, batches(x, y, 100), attacks, progress=False)
    names = [row.attack for row in table.rows]
    assert names == ["clean", attacks[0].name, attacks[1].name, "worst case"]
    clean = table["clean"]
    assert clean.total == len(y) and clean.correct == round(accuracy(mixed, x, y) * len(y))
    per_attack = [table[a.name] for a in attacks]
    assert all(r.correct < clean.correct and r.backend == "adasmooth" for r in per_attack)
    worst = table["worst case"]
    assert torch.equal(
        worst.per_sample, clean.per_sample & per_attack[0].per_sample & per_attack[1].per_sample
    )
    assert worst.correct <= min(r.correct for r in per_attack)
    markdown = table.to_markdown()
    assert all(name in markdown for name in names) and "adasmooth" in markdown
    assert table.to_dicts()[0]["accuracy"] == clean.accuracy

    cascade = evaluate(mixed, batches(x, y, 100), attacks, cascade=True, progress=False)
    counts = [row.correct for row in cascade.rows]
    assert counts == sorted(counts, reverse=True) and counts[-2] == counts[-1]
    # The first attack sees the same samples either way; the second only the survivors.
    assert torch.equal(cascade.rows[1].per_sample, table.rows[1].per_sample)


def test_evaluate_rejects_an_attack_that_leaves_its_ball(models, test_set):
    g, _ = models

    class Cheat:
        name, backend, eps, norm = "cheat", "test", 0.05, "Linf"

        def __call__(self, model, x, y):
            return (x + 0.1).clamp(0, 1)

    with pytest.raises(RuntimeError, match="perturbation of Linf size"):
        evaluate(g, batches(*test_set, 120), [Cheat()], progress=False)


def test_autoattack_official_settings_in_fallback(models):
    g, _ = models
    assert autoattack_backend() == (
        "autoattack" if importlib.util.find_spec("autoattack") else "torchattacks"
    )
    fallback = {k: ExternalAttack(k, eps=0.1, backend="torchattacks") for k in ExternalAttack.KINDS}
    apgd = fallback["apgd-ce"]._torchattacks(g, 9)
    assert (apgd.steps, apgd.loss, apgd.n_restarts, apgd.thr_decr) == (100, "ce", 1, 0.75)
    apgdt = fallback["apgd-t"]._torchattacks(g, 9)
    assert (apgdt.steps, apgdt.n_target_classes, apgdt.n_restarts) == (100, 9, 1)
    fab = fallback["fab-t"]._torchattacks(g, 9)
    assert (fab.steps, fab.n_target_classes, fab.multi_targeted, fab.n_restarts) == (
        100,
        9,
        True,
        1,
    )
    square = fallback["square"]._torchattacks(g, 9)
    assert (square.n_queries, square.rescale_schedule, square.p_init) == (5000, False, 0.8)


def test_autoattack_and_adaptive_autoattack(models, test_set):
    g, h = models
    torch.manual_seed(0)
    mixed = MixedClassifier(g, h, policy=FeaturePolicy())
    x, y = test_set[0][:100], test_set[1][:100]
    budget = dict(eps=0.1, steps=5, n_targets=2, square_queries=20, progress=False)
    table = autoattack(mixed, batches(x, y, 50), adaptive_w=0.5, **budget)
    rows = table.rows
    assert table.cascade and [r.attack.split(" ")[0] for r in rows[1:5]] == [
        "APGD-CE",
        "APGD-T",
        "FAB-T",
        "SQUARE",
    ]
    assert all(r.backend == autoattack_backend() for r in rows[1:5])
    assert [r.attack.split(" ")[0] for r in rows[5:7]] == ["APGD-CE", "APGD-T"]
    assert all(r.backend == "adasmooth" and "w=0.5" in r.attack for r in rows[5:7])
    counts = [r.correct for r in rows]
    assert counts == sorted(counts, reverse=True) and counts[1] < counts[0]
    standard = autoattack(mixed, batches(x, y, 50), **budget)
    assert len(standard.rows) == 6
    assert table["worst case"].correct <= standard["worst case"].correct
