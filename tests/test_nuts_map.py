"""torch.ops.adasmooth.nuts_map against the pure-PyTorch reference, on every device."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, TOLERANCES

from adasmooth_ext import mix, nuts_map
from adasmooth_ext.reference import mix_reference, nuts_map_reference

# (B, C, k): the smallest k, k = C, tiny and large C, C > 1024 (CUDA's block kernel).
SHAPES = [
    (7, 2, 2),
    (7, 10, 2),
    (33, 10, 10),
    (64, 100, 5),
    (16, 1000, 250),
    (4, 1000, 1000),
    (3, 2000, 17),
]
# (s, p, c): identity-like, a root (infinite slope at u = 0), a steep power.
PARAMS = [(1.0, 1.0, 0.0), (2.0, 0.5, -1.0), (0.7, 2.5, 0.5)]


def make_logits(batch: int, classes: int, k: int, dtype, device) -> torch.Tensor:
    """3·randn logits in ``dtype``, redrawn where the k-th and (k+1)-th largest tie: there the
    reference's torch.topk and the kernel may select different logits (see test_boundary_ties).
    """
    x = (3 * torch.randn(batch, classes, device=device)).to(dtype)
    while k < classes:
        top = x.double().topk(k + 1, dim=-1).values
        tied = top[:, k - 1] == top[:, k]
        if not tied.any():
            return x
        x[tied] = (3 * torch.randn(int(tied.sum()), classes, device=device)).to(dtype)
    return x


def reference(x, k, s, p, c, grad_out, dtype):
    """The reference's output and input gradient in ``dtype``, on the kernel's (rounded) inputs."""
    x = x.detach().to(dtype).requires_grad_()
    out = nuts_map_reference(x, k, s, p, c)
    out.backward(grad_out.to(dtype))
    return out.detach().double(), x.grad.double()


def assert_matches(actual, expected, fp32, dtype, scale=1.0):
    """Within the dtype's tolerance of the fp64 reference, widened by the fp32 reference's own
    error for the types that compute in fp32: where the map is ill-conditioned (t near 0 with
    p < 1) the kernels need do no better than PyTorch in fp32."""
    tol = TOLERANCES[dtype]
    slack = 0 if dtype == torch.float64 else (fp32 - expected).abs()
    allowed = tol["atol"] * scale + tol["rtol"] * expected.abs() + slack
    excess = (actual.double() - expected).abs() - allowed
    assert not (excess > 0).any() and not actual.isnan().any(), f"off by {excess.max()} more"


def magnitude(t: torch.Tensor) -> float:
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,classes,k", SHAPES)
@pytest.mark.parametrize("s,p,c", PARAMS)
def test_forward_matches_reference(device, dtype, batch, classes, k, s, p, c):
    x = make_logits(batch, classes, k, dtype, device)
    out = nuts_map(x, k, s, p, c)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    grad_out = torch.zeros_like(x)
    expected, _ = reference(x, k, s, p, c, grad_out, torch.float64)
    fp32, _ = reference(x, k, s, p, c, grad_out, torch.float32)
    assert_matches(out, expected, fp32, dtype, scale=magnitude(expected))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,classes,k", SHAPES)
@pytest.mark.parametrize("s,p,c", PARAMS)
def test_backward_matches_reference(device, dtype, batch, classes, k, s, p, c):
    x = make_logits(batch, classes, k, dtype, device).requires_grad_()
    grad_out = torch.randn(batch, classes, device=device).to(dtype)
    nuts_map(x, k, s, p, c).backward(grad_out)
    _, expected = reference(x, k, s, p, c, grad_out, torch.float64)
    _, fp32 = reference(x, k, s, p, c, grad_out, torch.float32)
    assert torch.isfinite(expected).all()
    # The top k gather row sums over C classes: rounding grows like sqrt(C), as in mix.
    row_sum = max(1.0, classes**0.5 / 10)
    assert_matches(x.grad, expected, fp32, dtype, scale=row_sum * magnitude(expected))


def test_many_classes(device):
    """C = 40000: CUDA's block kernel, with the row read from memory in every pass."""
    x = make_logits(2, 40000, 300, torch.float32, device).requires_grad_()
    grad_out = torch.randn(2, 40000, device=device)
    out = nuts_map(x, 300, 1.2, 0.8, -0.5)
    out.backward(grad_out)
    expected, expected_grad = reference(x, 300, 1.2, 0.8, -0.5, grad_out, torch.float64)
    fp32, fp32_grad = reference(x, 300, 1.2, 0.8, -0.5, grad_out, torch.float32)
    assert_matches(out, expected, fp32, torch.float32, scale=magnitude(expected))
    assert_matches(
        x.grad,
        expected_grad,
        fp32_grad,
        torch.float32,
        scale=40000**0.5 / 10 * magnitude(expected_grad),
    )


def test_empty_batch(device):
    x = torch.empty(0, 10, device=device, requires_grad=True)
    out = nuts_map(x, 3)
    assert out.shape == (0, 10)
    out.sum().backward()
    assert x.grad.shape == (0, 10)


def test_boundary_ties(device):
    """Values tied with the k-th largest: the output is unambiguous; in the gradient the tied
    logits share the selection term equally, so their sum is that of any tie-break."""
    x = torch.tensor(
        [[5.0, 3.0, 0.5, 3.0, -1.0, 3.0], [2.0, 2.0, 2.0, 2.0, 1.0, 0.0]],
        dtype=torch.float64,
        device=device,
    )
    k, args, ties = 3, (1.3, 1.7, 0.4), ([1, 3, 5], [0, 1, 2, 3])
    grad_out = torch.randn(2, 6, dtype=torch.float64, device=device)
    for row, tied in enumerate(ties):  # equal upstream gradients: the tied get equal gradients
        grad_out[row, tied] = grad_out[row, tied[0]].item()
    x_k = x.clone().requires_grad_()
    out = nuts_map(x_k, k, *args)
    out.backward(grad_out)
    x_ref = x.clone().requires_grad_()
    expected = nuts_map_reference(x_ref, k, *args)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected)
    for row, tied in enumerate(ties):
        rest = [j for j in range(6) if j not in tied]
        torch.testing.assert_close(x_k.grad[row, rest], x_ref.grad[row, rest])
        torch.testing.assert_close(x_k.grad[row, tied].sum(), x_ref.grad[row, tied].sum())
        torch.testing.assert_close(x_k.grad[row, tied], x_k.grad[row, tied[:1]].expand(len(tied)))


def test_equal_top_logits_stay_finite(device):
    """std_k = 0: the 1e-8 under the root keeps the map and its gradient finite."""
    x = torch.tensor([[4.0, 4.0, 4.0, 1.0, 0.0], [2.0] * 5], device=device, requires_grad=True)
    out = nuts_map(x, 3, 1.0, 0.5, 0.3)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    expected = nuts_map_reference(x.detach().double(), 3, 1.0, 0.5, 0.3)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_nan_stays_in_its_row(device):
    x = torch.randn(3, 8, device=device)
    x[1, 4] = float("nan")
    out = nuts_map(x, 3)
    assert out[1].isnan().all()
    torch.testing.assert_close(out[[0, 2]], nuts_map(x[[0, 2]], 3))


@pytest.mark.parametrize("s,p,c", [(1.3, 1.0, 0.2), (0.8, 0.5, 1.5), (2.0, 2.5, -0.3)])
def test_gradcheck(device, s, p, c):
    """Continuous random logits: no ties, and u = 0 (t = 0) with probability 0."""
    x = torch.randn(5, 12, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: nuts_map(x, 4, s, p, c), (x,))
    assert torch.autograd.gradcheck(lambda x: nuts_map(x, 12, s, p, c), (x,))


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_slope_at_u_zero(device, p):
    """t = 0 exactly, so u = 0: the slope of |u|^p is infinite for p < 1 and taken as 0 (its
    share of the top-k terms vanishes with it); for p = 1 it is the true s·GELU'(0) = s / 2."""
    x = torch.tensor([[4.0, 2.0, 0.0, -1.0]], dtype=torch.float64, device=device)
    x.requires_grad_()  # the top 3 are {4, 2, 0}: mean 2, so the logit 2 has t = 0
    grad_out = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64, device=device)
    nuts_map(x, 3, 1.5, p, 0.0).backward(grad_out)
    a = 0.0 if p < 1 else 1.5 * 0.5 / math.sqrt(4 + 1e-8)  # dL/dt / std at the logit 2
    expected = torch.tensor([[-a / 3, 2 * a / 3, -a / 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(x.grad.cpu(), expected)


def test_opcheck(device):
    x = torch.randn(5, 7, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.adasmooth.nuts_map.default, (x, 3, 1.5, 0.8, 0.2))
    torch.library.opcheck(
        torch.ops.adasmooth.nuts_map_backward.default,
        (torch.randn(5, 7, device=device), x.detach(), 7, 1.0, 2.0, -0.5),
    )


def test_torch_compile_fullgraph(device):
    """nuts_map feeding mix, under one compiled graph with its backward."""
    torch._dynamo.reset()

    def loss_fn(g, h, alpha, labels):
        return F.nll_loss(mix(g, nuts_map(h, 4, 1.5, 0.7, -0.2), alpha), labels)

    compiled = torch.compile(
        loss_fn, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor"
    )
    g = torch.randn(8, 12, device=device, requires_grad=True)
    h = torch.randn(8, 12, device=device, requires_grad=True)
    alpha = torch.rand(8, device=device, requires_grad=True)
    labels = torch.randint(0, 12, (8,), device=device)
    loss = compiled(g, h, alpha, labels)
    grads = torch.autograd.grad(loss, (g, h, alpha))
    eager_loss = loss_fn(g, h, alpha, labels)
    eager_grads = torch.autograd.grad(eager_loss, (g, h, alpha))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("s,p,c", [(1.0, 0.3, -1.0), (3.0, 4.0, 0.5)])
def test_composes_with_mix(device, dtype, s, p, c):
    """Mixing g with the mapped h: finite outputs and gradients, with large logit gaps too."""
    g = (20 * torch.randn(16, 100, device=device)).to(dtype).requires_grad_()
    h = (20 * torch.randn(16, 100, device=device)).to(dtype).requires_grad_()
    alpha = torch.rand(16, device=device).to(dtype).requires_grad_()
    labels = torch.randint(0, 100, (16,), device=device)
    out = mix(g, nuts_map(h, 10, s, p, c), alpha)
    F.nll_loss(out.float(), labels).backward()
    assert torch.isfinite(out).all()
    for t in (g, h, alpha):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    g64, h64, a64 = (t.detach().double() for t in (g, h, alpha))
    expected = mix_reference(g64, nuts_map_reference(h64, 10, s, p, c), a64)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        out.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * magnitude(expected)
    )


def test_non_contiguous_input(device):
    x = torch.randn(40, 20, device=device).t()[:, ::2]  # [20, 20], strided
    assert not x.is_contiguous()
    x.requires_grad_()
    out = nuts_map(x, 6, 1.2, 1.5, 0.1)
    torch.testing.assert_close(out, nuts_map(x.detach().contiguous(), 6, 1.2, 1.5, 0.1))
    out.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    nuts_map_reference(x_ref, 6, 1.2, 1.5, 0.1).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_autograd_saves_only_the_input(device):
    x = torch.randn(64, 50, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = nuts_map(x, 5)
    assert saved and all(t.data_ptr() == x.data_ptr() for t in saved)
    out.sum().backward()


def test_reference_is_the_mixednuts_formula():
    """The reference's erfc GELU and clamp change nothing where F.gelu is accurate."""
    x = torch.randn(6, 30, dtype=torch.float64)
    top = x.topk(7, dim=-1).values
    u = F.gelu((x - top.mean(-1, keepdim=True)) / (top.var(-1, keepdim=True) + 1e-8).sqrt() + 0.4)
    expected = 1.7 * u.sign() * u.abs() ** 2.0
    torch.testing.assert_close(nuts_map_reference(x, 7, 1.7, 2.0, 0.4), expected)


@pytest.mark.parametrize(
    "logits, k, kwargs, match",
    [
        ((3, 5), 1, {}, r"k must lie in \[2, C\]"),
        ((3, 5), 6, {}, r"k must lie in \[2, C\]"),
        ((3, 1), 1, {}, r"k must lie in \[2, C\]"),
        ((3, 5), 2, dict(s=0.0), "s must be positive"),
        ((3, 5), 2, dict(p=-1.0), "p must be positive"),
        ((3, 5), 2, dict(p=float("nan")), "p must be positive"),
        ((3, 5), 2, dict(c=float("inf")), "c must be finite"),
        ((15,), 2, {}, "2-D"),
    ],
)
def test_bad_input_errors(device, logits, k, kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        nuts_map(torch.randn(logits, device=device), k, **kwargs)


def test_integer_logits_and_bad_grad_error(device):
    with pytest.raises(RuntimeError, match="floating-point"):
        nuts_map(torch.ones(3, 5, dtype=torch.long, device=device), 2)
    x = torch.randn(3, 5, device=device)
    with pytest.raises(RuntimeError, match="grad must match"):
        torch.ops.adasmooth.nuts_map_backward(torch.randn(3, 4, device=device), x, 2, 1, 1, 0)
