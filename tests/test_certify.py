"""Certified robustness: the fused lipschitz_certify op, its guarantee under attack, and the
randomized-smoothing certificates of adasmooth_ext.certify."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, TOLERANCES
from scipy.stats import norm

from adasmooth_ext import lipschitz_certify, mix
from adasmooth_ext.certify import (
    ABSTAIN,
    certified_accuracy,
    plot_certified_accuracy,
    policy_lipschitz_certify,
    randomized_smoothing_radius,
    smoothed_certify,
    smoothed_predict,
    smoothing_curves,
)
from adasmooth_ext.reference import lipschitz_certify_reference

SHAPES = [(0, 10), (1, 1), (7, 1), (7, 2), (9, 10), (33, 100), (5, 1000), (3, 3000)]


def make_inputs(batch, classes, dtype, device, lip_kind="per_class", alpha_shape="rows"):
    """Confident-enough logits and weights that many rows certify a positive radius."""
    logits = (4 * torch.randn(batch, classes, device=device)).to(dtype)
    alpha = 0.55 + 0.45 * torch.rand(batch, device=device)
    alpha[::5] = 1.0
    alpha[1::7] = 0.0
    alpha = {"rows": alpha, "rows1": alpha.unsqueeze(1), "scalar": alpha[:1].mean()}[alpha_shape]
    if lip_kind == "per_class":
        lip = 0.2 + torch.rand(classes, device=device)
    else:
        lip = torch.tensor(0.3, device=device)
    return logits, alpha.to(dtype), lip.to(dtype)


def assert_close(actual, expected, dtype):
    """Within the dtype's tolerance, relative to the largest finite expected value."""
    tol = TOLERANCES[dtype]
    finite = expected[expected.isfinite()]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * scale
    )


def test_reference_matches_definition():
    """The reference itself, against the formula of DESIGN.md §2 written as loops."""
    logits, alpha, lip = make_inputs(12, 6, torch.float64, "cpu")
    pred, margin, radius = lipschitz_certify_reference(logits, alpha, lip, 0.7)
    q = torch.softmax(0.7 * logits, -1)
    for row in range(12):
        order = sorted(range(6), key=lambda k: -q[row, k].item())
        i, j, a = order[0], order[1], alpha[row].item()
        pairs = [
            (a * (q[row, i] - q[row, k]) + a - 1) / (a * (lip[i] + lip[k])) if a > 0 else -1
            for k in range(6)
            if k != i
        ]
        assert pred[row] == i
        assert margin[row] == pytest.approx((q[row, i] - q[row, j]).item())
        assert radius[row] == pytest.approx(max(0.0, float(min(pairs))), abs=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,classes", SHAPES)
@pytest.mark.parametrize("lip_kind", ["per_class", "scalar"])
def test_forward_matches_reference(device, dtype, batch, classes, lip_kind):
    logits, alpha, lip = make_inputs(batch, classes, dtype, device, lip_kind)
    pred, margin, radius = lipschitz_certify(logits, alpha, lip, 1.3)
    assert pred.dtype == torch.int64 and margin.dtype == radius.dtype == dtype
    assert pred.shape == margin.shape == radius.shape == (batch,)
    ref_pred, ref_margin, ref_radius = lipschitz_certify_reference(
        logits.double(), alpha.double(), lip.double(), 1.3
    )
    assert torch.equal(pred, ref_pred)
    assert_close(margin, ref_margin, dtype)
    assert_close(radius, ref_radius, dtype)
    assert (radius >= 0).all()
    if batch >= 7 and classes > 1:
        assert (radius > 0).any() and (radius == 0).any(), "both cases should be exercised"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,classes", [(7, 2), (9, 10), (33, 100), (5, 1000), (3, 3000)])
@pytest.mark.parametrize("lip_kind", ["per_class", "scalar"])
def test_backward_matches_reference(device, dtype, batch, classes, lip_kind):
    logits, alpha, lip = make_inputs(batch, classes, dtype, device, lip_kind)
    logits.requires_grad_()
    alpha.requires_grad_()
    grad_margin = torch.randn(batch, device=device).to(dtype)
    grad_radius = torch.randn(batch, device=device).to(dtype)
    _, margin, radius = lipschitz_certify(logits, alpha, lip, 0.8)
    torch.autograd.backward((margin, radius), (grad_margin, grad_radius))

    logits64, alpha64 = (t.detach().double().requires_grad_() for t in (logits, alpha))
    _, ref_margin, ref_radius = lipschitz_certify_reference(logits64, alpha64, lip.double(), 0.8)
    torch.autograd.backward((ref_margin, ref_radius), (grad_margin.double(), grad_radius.double()))
    assert_close(logits.grad, logits64.grad, dtype)
    assert_close(alpha.grad, alpha64.grad, dtype)
    assert alpha.grad.abs().max() > 0 and logits.grad.abs().max() > 0


@pytest.mark.parametrize("alpha_shape", ["scalar", "rows1"])
def test_alpha_shapes_and_python_numbers(device, alpha_shape):
    logits, alpha, lip = make_inputs(9, 10, torch.float64, device, alpha_shape=alpha_shape)
    alpha.requires_grad_()
    out = lipschitz_certify(logits, alpha, lip)
    ref = lipschitz_certify_reference(logits, alpha.detach(), lip)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b)
    out.radius.sum().backward()
    assert alpha.grad.shape == alpha.shape
    numbers = lipschitz_certify(logits, 0.9, 0.3)
    torch.testing.assert_close(numbers.radius, lipschitz_certify_reference(logits, 0.9, 0.3)[2])


def test_gradcheck(device):
    logits = (3 * torch.randn(6, 8, dtype=torch.float64, device=device)).requires_grad_()
    alpha = (0.7 + 0.3 * torch.rand(6, dtype=torch.float64, device=device)).requires_grad_()
    lip = 0.1 + 0.2 * torch.rand(8, dtype=torch.float64, device=device)
    radius = lipschitz_certify(logits, alpha, lip, 1.1).radius
    assert (radius > 0).sum() >= 3, "gradcheck should see certified rows"

    def outputs(logits, alpha, lip):
        return lipschitz_certify(logits, alpha, lip, 1.1)[1:]

    assert torch.autograd.gradcheck(outputs, (logits, alpha, lip))
    assert torch.autograd.gradcheck(outputs, (logits, alpha[0].detach().requires_grad_(), lip[0]))


def test_opcheck(device):
    logits, alpha, lip = make_inputs(5, 7, torch.float32, device)
    logits.requires_grad_()
    alpha.requires_grad_()
    op = torch.ops.adasmooth.lipschitz_certify.default
    # opcheck's AOT-dispatch check sums all outputs into one tensor starting from the first,
    # which fails for an int64 first output (pred); test_torch_compile covers that path.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, (logits, alpha, lip, 1.0), test_utils=utils)
    torch.library.opcheck(op, (logits, alpha[2].detach(), lip[0], 2.0), test_utils=utils)
    grads = (torch.randn(5, device=device), torch.randn(5, device=device))
    torch.library.opcheck(
        torch.ops.adasmooth.lipschitz_certify_backward.default,
        (*grads, logits.detach(), alpha.detach(), lip, 1.0),
    )


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile(dynamic):
    """AOT dispatch through the fake and autograd registrations, as in a training loss."""
    torch._dynamo.reset()

    def loss_fn(logits, alpha, lip):
        pred, margin, radius = lipschitz_certify(logits, alpha, lip)
        return pred, -(radius + 0.1 * margin).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for batch in (8, 11):
        logits, alpha, lip = make_inputs(batch, 12, torch.float32, "cpu")
        logits.requires_grad_()
        alpha.requires_grad_()
        pred, loss = compiled(logits, alpha, lip)
        eager_pred, eager_loss = loss_fn(logits, alpha, lip)
        assert torch.equal(pred, eager_pred)
        torch.testing.assert_close(loss, eager_loss)
        grads = torch.autograd.grad(loss, (logits, alpha))
        for a, b in zip(grads, torch.autograd.grad(eager_loss, (logits, alpha)), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_alpha_at_and_below_threshold_gives_zero_radius(device, dtype):
    """α ≤ 1/(1 + margin) certifies nothing: radius 0, never negative or NaN, zero gradients."""
    logits = torch.tensor([[2.0, 0.5, -1.0]] * 5, device=device, dtype=torch.float64)
    q = torch.softmax(logits[0], -1)
    threshold = 1 / (1 + (q[0] - q[1]).item())
    alpha = torch.tensor([threshold, 0.99 * threshold, 0.3, 1e-30, 0.0], dtype=torch.float64)
    logits, alpha = logits.to(dtype).requires_grad_(), alpha.to(device, dtype).requires_grad_()
    pred, margin, radius = lipschitz_certify(logits, alpha, torch.tensor(0.5, dtype=dtype))
    assert (pred == 0).all()
    assert radius[0] >= 0 and radius[0] <= TOLERANCES[dtype]["atol"]
    assert (radius[1:] == 0).all()
    (radius.sum() + margin.sum()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(alpha.grad).all()
    assert (alpha.grad[1:] == 0).all()


def test_single_class_is_certified_everywhere(device):
    logits = torch.randn(4, 1, device=device, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([0.0, 0.3, 0.9, 1.0], device=device, dtype=torch.float64)
    alpha.requires_grad_()
    pred, margin, radius = lipschitz_certify(logits, alpha, 1.0)
    assert (pred == 0).all() and (margin == 1).all() and torch.isinf(radius).all()
    (margin.sum() + radius.sum()).backward()
    assert (logits.grad == 0).all() and (alpha.grad == 0).all()


def test_ties_pick_the_first_class(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], device=device)
    pred, margin, radius = lipschitz_certify(logits, 1.0, 0.5)
    assert pred.tolist() == [1, 0]
    assert (margin == 0).all() and (radius == 0).all()


def test_nan_logits_certify_nothing(device):
    logits = torch.randn(4, 37, device=device)
    logits[1, 5] = float("nan")
    logits[2] = float("nan")
    alpha = torch.ones(4, device=device)
    pred, margin, radius = lipschitz_certify(logits, alpha, 0.5)
    assert margin[1:3].isnan().all() and (radius[1:3] == 0).all()
    assert ((pred >= 0) & (pred < 37)).all()
    expected = lipschitz_certify_reference(logits[[0, 3]], alpha[[0, 3]], 0.5)
    torch.testing.assert_close(radius[[0, 3]], expected[2])


def test_non_contiguous_inputs(device):
    logits = torch.randn(40, 9, device=device).t()[:, ::2]  # [9, 20], strided
    alpha = torch.rand(9, 2, device=device)[:, 0]
    lip = (0.1 + torch.rand(40, device=device))[::2]
    assert not (logits.is_contiguous() or alpha.is_contiguous() or lip.is_contiguous())
    for a, b in zip(
        lipschitz_certify(logits, alpha, lip),
        lipschitz_certify_reference(logits, alpha, lip),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_empty_batch(device):
    logits = torch.empty(0, 5, device=device, requires_grad=True)
    alpha = torch.empty(0, device=device, requires_grad=True)
    pred, margin, radius = lipschitz_certify(logits, alpha, 1.0)
    assert pred.shape == margin.shape == radius.shape == (0,)
    radius.sum().backward()
    assert logits.grad.shape == (0, 5) and alpha.grad.shape == (0,)


def test_radius_is_monotone_in_alpha(device):
    """Why a policy with α(x) ≥ α_lo may be certified at α_lo: the bound only grows with α."""
    logits, _, lip = make_inputs(200, 10, torch.float64, device)
    alphas = torch.linspace(0, 1, 101, dtype=torch.float64, device=device)
    radii = torch.stack([lipschitz_certify(logits, a, lip).radius for a in alphas])
    assert (radii.diff(dim=0) >= 0).all()
    assert (radii[-1] > radii[60]).sum() > 20, "the bound should really grow on many rows"
    a = alphas[80].clone().requires_grad_()
    lipschitz_certify(logits, a, lip).radius.sum().backward()
    assert a.grad > 0


def test_policy_certificate_is_the_fixed_one_at_alpha_lo():
    logits, _, lip = make_inputs(20, 10, torch.float32, "cpu")
    policy = policy_lipschitz_certify(logits, 0.7, lip, alpha=0.7 + 0.3 * torch.rand(20))
    fixed = lipschitz_certify(logits, 0.7, lip)
    for a, b in zip(policy, fixed, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="below alpha_lo"):
        policy_lipschitz_certify(logits, 0.7, lip, alpha=torch.full((20,), 0.6))
    with pytest.raises(ValueError, match=r"alpha_lo must lie in \[0, 1\]"):
        policy_lipschitz_certify(logits, 1.2, lip)


# ---------------------------------------------------------------------------------------------
# The guarantee, empirically: a linear softmax model h(x) = Wx + b has known Lipschitz
# constants, so PGD on the mixed classifier must never flip a prediction inside the radius.

DIM, CLASSES, POINTS = 16, 4, 400


def softmax_lipschitz(weight, dual_ord):
    """Valid Lipschitz constants of q_k(x) = softmax(Wx + b)_k.

    ∇q_k = q_k Σ_j q_j (W_k − W_j), so ‖∇q_k‖_* ≤ q_k (1 − q_k) max_j ‖W_k − W_j‖_*
    ≤ max_j ‖W_k − W_j‖_* / 4, in the norm dual to the attack's (ℓ2 for ℓ2, ℓ1 for ℓ∞).
    """
    diffs = torch.linalg.vector_norm(weight[:, None] - weight[None], ord=dual_ord, dim=-1)
    return diffs.max(dim=1).values / 4


def pgd_flips(mixed_logits, x, pred, eps, norm_ord, steps=100, restarts=4):
    """Whether any iterate of a margin-loss PGD (random starts) within ‖δ‖ ≤ eps moves the
    mixed prediction off `pred`, per point."""
    n = len(x)
    x, pred, eps = x.repeat(restarts, 1), pred.repeat(restarts), eps.repeat(restarts)[:, None]
    step = eps / 8
    if norm_ord == 2:
        delta = F.normalize(torch.randn_like(x), dim=1) * eps * torch.rand_like(eps)
    else:
        delta = (2 * torch.rand_like(x) - 1) * eps
    flipped = torch.zeros(len(x), dtype=torch.bool)
    for it in range(steps + 1):
        delta.requires_grad_()
        z = mixed_logits(x + delta)
        flipped |= z.argmax(-1) != pred
        if it == steps:
            break
        others = z.scatter(1, pred[:, None], -torch.inf).max(-1).values
        grad = torch.autograd.grad((others - z.gather(1, pred[:, None])[:, 0]).sum(), delta)[0]
        with torch.no_grad():
            if norm_ord == 2:
                delta = delta + step * F.normalize(grad, dim=1)
                delta = delta * (eps / delta.norm(dim=1, keepdim=True)).clamp(max=1)
            else:
                delta = torch.maximum(torch.minimum(delta + step * grad.sign(), eps), -eps)
    return flipped.view(restarts, n).any(0)


@pytest.fixture(scope="module")
def linear_models():
    gen = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(DIM, CLASSES, generator=gen, dtype=torch.float64))
    w_h = basis.T * torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=torch.float64)[:, None]
    b_h = 0.5 * torch.randn(CLASSES, generator=gen, dtype=torch.float64)
    w_g = 10 * torch.randn(CLASSES, DIM, generator=gen, dtype=torch.float64)
    w_policy = torch.randn(DIM, generator=gen, dtype=torch.float64)
    x = 0.8 * torch.randn(POINTS, DIM, generator=gen, dtype=torch.float64)
    return w_h, b_h, w_g, w_policy, x


@pytest.mark.parametrize(
    "policy,norm_ord",
    [("fixed", 2), ("fixed", math.inf), ("varying", 2), ("varying", math.inf)],
    ids=["fixed-l2", "fixed-linf", "varying-l2", "varying-linf"],
)
def test_pgd_never_breaks_the_certificate(linear_models, policy, norm_ord):
    w_h, b_h, w_g, w_policy, x = linear_models
    alpha_lo = 0.75
    lip = softmax_lipschitz(w_h, 2 if norm_ord == 2 else 1)

    def alpha_of(inputs):  # the policy: any weight in [alpha_lo, 1], moving with the input
        if policy == "fixed":
            return torch.full((len(inputs),), alpha_lo, dtype=inputs.dtype)
        return alpha_lo + (1 - alpha_lo) * torch.sigmoid(3 * inputs @ w_policy)

    def mixed_logits(inputs):
        return mix(inputs @ w_g.T, inputs @ w_h.T + b_h, alpha_of(inputs))

    logits = x @ w_h.T + b_h
    cert = policy_lipschitz_certify(logits, alpha_lo, lip, alpha=alpha_of(x))
    certified = cert.radius > 0
    assert certified.sum() >= 150, "too few certified points for a meaningful test"
    assert (mixed_logits(x).argmax(-1)[certified] == cert.pred[certified]).all()

    xs, pred, radius = x[certified], cert.pred[certified], cert.radius[certified]
    inside = pgd_flips(mixed_logits, xs, pred, 0.999 * radius, norm_ord)
    assert not inside.any(), f"{int(inside.sum())} certified predictions flipped inside the radius"
    # The constants are tight enough that the same attack flips points at twice the radius
    # (at 1.5x already a few), so the test above could fail.
    outside = pgd_flips(mixed_logits, xs, pred, 2 * radius, norm_ord)
    assert outside.sum() >= 5, "the same attack should succeed just outside the radius"


# ---------------------------------------------------------------------------------------------
# Randomized smoothing.


def test_rs_radius_with_alpha_one_is_cohens():
    pa = torch.linspace(0.5, 0.999, 50, dtype=torch.float64)
    for sigma in (0.25, 1.0):
        radius = randomized_smoothing_radius(pa, 1 - pa, 1.0, sigma)
        expected = sigma * torch.from_numpy(norm.ppf(pa.numpy()))
        torch.testing.assert_close(radius, expected, rtol=1e-9, atol=1e-12)


def test_rs_radius_matches_theorem_3_7():
    pa = torch.tensor([0.9, 0.99, 0.7, 0.6, 0.999, 0.8], dtype=torch.float64)
    pb = torch.tensor([0.05, 0.01, 0.3, 0.4, 0.001, 0.2], dtype=torch.float64)
    for alpha in (0.55, 0.7, 0.9, 0.99):
        mu = (1 - alpha) / alpha
        theorem = 0.5 / 2 * (norm.ppf(pa / (1 + mu)) - norm.ppf((pb + mu) / (1 + mu)))
        expected = torch.from_numpy(theorem).clamp(min=0)
        radius = randomized_smoothing_radius(pa, pb, alpha, 0.5)
        torch.testing.assert_close(radius, expected, rtol=1e-9, atol=1e-12)
        assert (radius > 0).any() and (alpha > 0.6 or (radius == 0).any())


def test_rs_radius_edges_and_gradients():
    pa = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.6], dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([0.0, 0.5, 0.8, 1.0, 0.8], dtype=torch.float64, requires_grad=True)
    radius = randomized_smoothing_radius(pa, 1 - pa, alpha, 0.5)
    assert radius[0] == 0 and radius[1] == 0 and radius[4] == 0, "α ≤ 1/2 or weak p_A: nothing"
    assert 0 < radius[2] < radius[3]
    radius.sum().backward()
    assert torch.isfinite(pa.grad).all() and torch.isfinite(alpha.grad).all()
    assert alpha.grad[2] > 0 and (alpha.grad[[0, 1, 4]] == 0).all()
    inner_pa = torch.tensor([0.9, 0.95], dtype=torch.float64, requires_grad=True)
    inner_alpha = torch.tensor([0.8, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p, a: randomized_smoothing_radius(p, 1 - p, a, 0.5), (inner_pa, inner_alpha)
    )


def binary_linear_setup(points=60, dim=10):
    """f(x) = [w·x + b > 0]: its Gaussian smoothing has p_A = Φ(d/σ) exactly, where d is the
    distance to the hyperplane, and d is also the exact certified radius. The last point lies
    on the hyperplane (p_A = 1/2): it must abstain."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(dim, generator=gen)
    b = 0.3
    x = torch.randn(points, dim, generator=gen)
    x[-1] = -b * w / w.dot(w)
    signed = (x @ w + b) / w.norm()

    def model(inputs):
        score = inputs @ w + b
        return torch.stack([-score, score], dim=-1)

    return model, x, (signed > 0).long(), signed.abs().double()


def test_smoothed_certify_is_valid_and_tight():
    model, x, labels, distance = binary_linear_setup()
    sigma = 0.5
    cert = smoothed_certify(model, x, sigma, n0=64, n=2000, batch_size=500, progress=False)
    decided = cert.pred != ABSTAIN
    assert (cert.pred[decided] == labels[decided]).all()
    assert (cert.radius <= distance + 1e-9).all(), "a certified radius beyond the exact one"
    moderate = decided & (distance > 0.2) & (distance < 2 * sigma)
    assert moderate.sum() >= 10
    assert (cert.radius[moderate] >= 0.6 * distance[moderate]).all(), "needlessly loose"
    assert not decided[-1] and (distance[~decided] < 0.2).all()
    torch.testing.assert_close(cert.mixed_radius(1.0), cert.radius)

    # The mix's radius for the worst-case g: the exact smoothed p_A = Φ(d'/σ) at distance d'
    # must keep p_A − p_B = 2Φ(d'/σ) − 1 ≥ μ, i.e. d' ≥ σΦ⁻¹((1 + μ)/2).
    for alpha in (0.6, 0.8, 0.95):
        mu = (1 - alpha) / alpha
        exact = (distance - sigma * norm.ppf((1 + mu) / 2)).clamp(min=0)
        mixed = cert.mixed_radius(alpha)
        assert (mixed <= exact + 1e-9).all()
        assert (mixed[decided] > 0).any()
        pa = torch.from_numpy(norm.cdf(distance.numpy() / sigma))
        theorem = randomized_smoothing_radius(pa, 1 - pa, alpha, sigma)
        assert (theorem <= exact + 1e-9).all() and (theorem > 0).any()


def test_smoothed_predict_and_abstain():
    model, x, labels, distance = binary_linear_setup()
    pred = smoothed_predict(model, x, 0.5, n=1000, progress=False)
    far = distance > 0.5
    assert far.sum() >= 20 and (pred[far] == labels[far]).all()
    assert pred[-1] == ABSTAIN


def test_too_few_samples_and_bad_arguments():
    model, x, _, _ = binary_linear_setup(points=2)
    with pytest.raises(ValueError, match="n >= 10"):
        smoothed_certify(model, x, 0.5, n0=10, n=9, progress=False)
    with pytest.raises(ValueError, match="too few"):
        smoothed_predict(model, x, 0.5, n=5, progress=False)
    with pytest.raises(ValueError, match="sigma must be positive"):
        smoothed_certify(model, x, 0.0, n0=10, n=100, progress=False)
    with pytest.raises(ValueError, match="sigma must be positive"):
        randomized_smoothing_radius(0.9, 0.1, 0.8, -1.0)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        randomized_smoothing_radius(0.9, 0.1, 1.5, 1.0)
    with pytest.raises(ValueError, match=r"pa_lower must lie in \[0, 1\]"):
        randomized_smoothing_radius(torch.tensor([0.9, 1.1]), 0.1, 0.8, 1.0)
    with pytest.raises(ValueError, match="batch"):
        smoothed_certify(model, x[0], 0.5, n0=10, n=100, progress=False)


def test_certified_accuracy_and_plot(tmp_path):
    pred = torch.tensor([0, 1, 2, 1, ABSTAIN])
    labels = torch.tensor([0, 1, 1, 1, 0])
    radius = torch.tensor([0.5, 0.0, 2.0, 1.5, 0.0])
    acc = certified_accuracy(pred, radius, labels, [0.0, 0.5, 1.0, 2.0])
    torch.testing.assert_close(acc, torch.tensor([0.4, 0.4, 0.2, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="one length"):
        certified_accuracy(pred, radius[:3], labels, [0.0])

    model, x, labels, _ = binary_linear_setup(points=30)
    cert = smoothed_certify(model, x, 0.5, n0=32, n=500, progress=False)
    radii = torch.linspace(0, 1.5, 16)
    curves = smoothing_curves(cert, labels, radii, alphas=[0.7, 0.9])
    assert list(curves) == ["h alone (σ = 0.5)", "mix, α = 0.7", "mix, α = 0.9"]
    for acc in curves.values():
        assert acc.shape == (16,) and (acc.diff() <= 0).all()
    assert (curves["mix, α = 0.7"] <= curves["mix, α = 0.9"]).all()
    assert (curves["mix, α = 0.9"] <= curves["h alone (σ = 0.5)"]).all()
    path = plot_certified_accuracy(radii, curves, tmp_path / "certified.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(alpha=torch.tensor([0.5, 1.5, 0.2])), r"alpha must lie in \[0, 1\]"),
        (dict(alpha=torch.tensor(float("nan"))), r"alpha must lie in \[0, 1\]"),
        (dict(alpha=torch.tensor(-0.1)), r"alpha must lie in \[0, 1\]"),
        (dict(lipschitz=torch.tensor(0.0)), "lipschitz constants must be positive"),
        (dict(lipschitz=torch.tensor([1.0, -1.0, 1.0, 1.0])), "lipschitz constants must be"),
        (dict(lipschitz=torch.ones(3)), r"lipschitz must be 0-d .* or \[C\] with C = 4"),
        (dict(alpha=torch.rand(2)), r"alpha must be 0-d, \[B\] or \[B, 1\] with B = 3"),
        (dict(alpha=torch.rand(3).double()), "must share one dtype"),
        (dict(rob_logits=torch.randn(12)), "must be 2-D"),
        (dict(rob_logits=torch.randn(3, 4).long()), "floating-point"),
        (dict(rob_scale=0.0), "rob_scale must be positive"),
    ],
)
def test_bad_input_errors(device, change, match):
    args = dict(
        rob_logits=torch.randn(3, 4), alpha=torch.rand(3), lipschitz=torch.ones(4), rob_scale=1.0
    )
    args.update(change)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=match):
        torch.ops.adasmooth.lipschitz_certify(**args)
