"""torch.ops.adasmooth.pgd_step_ against the eager reference, its invariants and its checks."""

import pytest
import torch
from conftest import DTYPES, TOLERANCES

from adasmooth_ext import pgd_step_
from adasmooth_ext.reference import pgd_step_reference

NORMS = ["Linf", "L2"]
SHAPES = [(7, 3, 5, 5), (3, 1000), (1, 7), (5, 2, 33)]


def make_batch(shape, dtype, device, eps, grad_dtype=None):
    """x0 in [0, 1], x a point of x0's ε-box, and a gradient with some exact zeros."""
    x0 = torch.rand(shape, device=device)
    eps_view = torch.as_tensor(eps, device=device).reshape((-1,) + (1,) * (len(shape) - 1))
    x = (x0 + eps_view * (2 * torch.rand(shape, device=device) - 1)).clamp(0, 1)
    grad = torch.randn(shape, device=device)
    grad[torch.rand(shape, device=device) < 0.1] = 0
    return x0.to(dtype), x.to(dtype), grad.to(grad_dtype or dtype)


def sizes(delta, norm):
    flat = delta.double().flatten(1)
    return flat.abs().amax(1) if norm == "Linf" else flat.norm(dim=1)


def assert_matches_reference(x, x0, grad, eps, step, norm, dtype):
    eps64 = torch.as_tensor(eps, dtype=torch.float64)
    expected = pgd_step_reference(x.double(), x0.double(), grad.double(), eps64, step, norm)
    out = pgd_step_(x, x0, grad, eps, step, norm)
    assert out is x
    torch.testing.assert_close(x.double(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, dtype, norm, shape):
    eps = 0.1 if norm == "Linf" else 1.0
    x0, x, grad = make_batch(shape, dtype, device, eps)
    assert_matches_reference(x, x0, grad, eps, eps / 4, norm, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_per_sample_eps_and_step(device, dtype, norm):
    eps = torch.tensor([0.0, 0.05, 0.3, 2.0, 0.1], device=device)
    step = torch.tensor([0.1, 0.0, 0.2, 1.0, 0.05], device=device)
    x0, x, grad = make_batch((5, 3, 8, 8), dtype, device, eps)
    assert_matches_reference(x, x0, grad, eps, step, norm, dtype)


@pytest.mark.parametrize("grad_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_gradient_of_another_dtype(device, grad_dtype, norm):
    x0, x, grad = make_batch((6, 50), torch.float32, device, 0.2, grad_dtype)
    assert_matches_reference(x, x0, grad, 0.2, 0.07, norm, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_stays_in_ball_and_box_over_many_steps(device, dtype, norm):
    eps = torch.tensor([0.0, 0.03, 0.25, 1.5], device=device)
    x0, x, _ = make_batch((4, 3, 16, 16), dtype, device, eps)
    # Rounding x to a half type moves each element by up to one unit in the last place.
    slack = 1e-6 + torch.finfo(dtype).eps * (1 if norm == "Linf" else x0[0].numel() ** 0.5)
    for _ in range(30):
        grad = 100 * torch.randn(x.shape, device=device, dtype=dtype)
        pgd_step_(x, x0, grad, eps, 2 * eps + 0.01, norm)
        assert (sizes(x - x0, norm) <= eps.double() * (1 + 1e-5) + slack).all()
        assert x.min() >= 0 and x.max() <= 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_zero_or_non_finite_gradient_stays_finite(device, dtype, norm, bad):
    """sign(0) = sign(NaN) = 0; in L2 such a gradient (or an infinite one) only projects."""
    eps = 0.05
    x0 = torch.rand(3, 40, device=device).to(dtype)
    x = (x0 + 0.5 * torch.randn_like(x0)).clamp(0, 1)  # outside the ball: gets projected
    grad = torch.full_like(x, bad)
    grad[0, :20] = 1.0  # a sample whose gradient is only partly bad
    expected = pgd_step_reference(x.double(), x0.double(), grad.double(), eps, 0.1, norm)
    pgd_step_(x, x0, grad, eps, 0.1, norm)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x.double(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("norm", NORMS)
def test_eps_zero_returns_x0_exactly(device, norm):
    x0, x, grad = make_batch((4, 3, 6, 6), torch.float32, device, 0.2)
    pgd_step_(x, x0, grad, 0.0, 0.5, norm)
    assert torch.equal(x, x0)


def test_custom_box_and_non_contiguous_x(device):
    x0 = torch.rand(6, 3, 4, 4, device=device) * 4 - 2
    x = (x0 + 0.3).clamp(-2, 2).to(memory_format=torch.channels_last)
    grad = torch.randn(6, 3, 4, 4, device=device).transpose(2, 3)
    expected = pgd_step_reference(x, x0, grad, 0.5, 0.2, "L2", box=(-2.0, 2.0))
    out = pgd_step_(x, x0, grad, 0.5, 0.2, "L2", box=(-2.0, 2.0))
    assert out is x and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, expected)


def test_empty_batch(device):
    x = torch.empty(0, 3, device=device)
    assert pgd_step_(x, x.clone(), x.clone(), 0.1, 0.1, "L2").shape == (0, 3)


@pytest.mark.parametrize("norm", [0, 2])
def test_opcheck(device, norm):
    x0 = torch.rand(5, 2, 3, device=device)
    x = (x0 + 0.05 * torch.randn_like(x0)).clamp(0, 1)
    grad = torch.randn_like(x0)
    eps = torch.tensor([0.1, 0.2, 0.0, 0.05, 1.0], device=device)
    for e, s in ((eps, eps / 3), (torch.tensor(0.1, device=device), torch.tensor(0.02))):
        args = (x.clone(), x0, grad, e, s.to(device), norm, 0.0, 1.0)
        torch.library.opcheck(torch.ops.adasmooth.pgd_step_.default, args)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def two_steps(x, x0, grad, eps):
        pgd_step_(x, x0, grad, eps, eps / 2, "Linf")
        return pgd_step_(x, x0, -grad, eps, eps / 2, "L2") * 2

    x0, x, grad = make_batch((4, 10), torch.float32, device, 0.1)
    eps = torch.full((4,), 0.1, device=device)
    x_eager = x.clone()
    expected = two_steps(x_eager, x0, grad, eps)
    backend = "aot_eager" if device == "cpu" else "inductor"
    out = torch.compile(two_steps, fullgraph=True, backend=backend)(x, x0, grad, eps)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x, x_eager)


def raw(x, x0, grad, eps=0.1, step=0.1, norm=0, lo=0.0, hi=1.0):
    def as_tensor(v):
        return v if isinstance(v, torch.Tensor) else torch.tensor(v, device=x.device)

    return torch.ops.adasmooth.pgd_step_(x, x0, grad, as_tensor(eps), as_tensor(step), norm, lo, hi)


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda d: raw(
                torch.rand(2, 3, device=d), torch.rand(2, 4, device=d), torch.rand(2, 3, device=d)
            ),
            "same shape",
        ),
        (
            lambda d: raw(
                torch.rand(2, 3, device=d), torch.rand(2, 3, device=d), torch.rand(3, 3, device=d)
            ),
            "same shape",
        ),
        (
            lambda d: raw(
                torch.rand(2, 3, device=d),
                torch.rand(2, 3, device=d).double(),
                torch.rand(2, 3, device=d),
            ),
            "x0 must have x's dtype",
        ),
        (
            lambda d: raw(
                torch.ones(2, 3, device=d, dtype=torch.long),
                torch.ones(2, 3, device=d, dtype=torch.long),
                torch.rand(2, 3, device=d),
            ),
            "floating-point",
        ),
        (
            lambda d: raw(
                torch.rand(3, device=d)[0], torch.rand(3, device=d)[0], torch.rand(3, device=d)[0]
            ),
            "batched",
        ),
        (
            lambda d: raw(
                torch.rand(2, 3, device=d),
                torch.rand(2, 3, device=d),
                torch.rand(2, 3, device=d),
                eps=torch.rand(3, device=d),
            ),
            "eps must be 0-d or",
        ),
        (
            lambda d: raw(
                torch.rand(2, 3, device=d),
                torch.rand(2, 3, device=d),
                torch.rand(2, 3, device=d),
                step=torch.rand(2, 1, device=d),
            ),
            "step must be 0-d or",
        ),
        (
            lambda d: raw(
                torch.rand(2, 3, device=d),
                torch.rand(2, 3, device=d),
                torch.rand(2, 3, device=d),
                norm=1,
            ),
            "norm must be 0",
        ),
        (
            lambda d: raw(
                torch.rand(2, 3, device=d),
                torch.rand(2, 3, device=d),
                torch.rand(2, 3, device=d),
                lo=1.0,
                hi=0.0,
            ),
            "lo <= hi",
        ),
        (
            lambda d: raw(*[torch.rand(2, 3, device=d)] * 2, torch.rand(2, 3, device=d)),
            "overlap|memory location",
        ),
    ],
)
def test_bad_input_errors(device, make, match):
    with pytest.raises(RuntimeError, match=match):
        make(device)


@pytest.mark.parametrize("what", ["eps", "step"])
@pytest.mark.parametrize("value", [-0.1, float("nan")])
def test_negative_or_nan_radius_rejected_on_cpu(what, value):
    x0 = torch.rand(2, 3)
    with pytest.raises(RuntimeError, match=f"{what} must be >= 0"):
        pgd_step_(x0.clone(), x0, torch.randn(2, 3), **{"eps": 0.1, "step": 0.1, what: value})


def test_wrapper_rejects_unknown_norm():
    x0 = torch.rand(2, 3)
    with pytest.raises(ValueError, match="norm must be one of"):
        pgd_step_(x0.clone(), x0, torch.randn(2, 3), 0.1, 0.1, "L1")
