"""torch.ops.adasmooth.mix / mix_gamma against the pure-PyTorch reference, on every device."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, HAS_CUDA, TOLERANCES

import adasmooth_ext
from adasmooth_ext import mix, mix_gamma
from adasmooth_ext.reference import mix_gamma_reference, mix_reference, naive_mix

CLASSES = [1, 2, 10, 100, 1000, 32000]
BATCHES = [0, 1, 7, 4096]
# Every class count with every batch size, except the one pair too large for a 24 GiB CI box.
SHAPES = [(b, c) for b, c in itertools.product(BATCHES, CLASSES) if b * c <= 2**22]


def make_alpha(kind: str, batch: int, dtype, device) -> torch.Tensor:
    if kind == "random":
        return torch.rand(batch, dtype=dtype, device=device)
    return torch.full((batch,), float(kind), dtype=dtype, device=device)


def reference_grads(fn, g, h, w, grad_out, **kwargs):
    """Output and gradients of the fp64 reference on the same (rounded) inputs."""
    g64, h64, w64 = (t.detach().double().requires_grad_() for t in (g, h, w))
    out = fn(g64, h64, w64, **kwargs)
    out.backward(grad_out.double())
    return out, g64.grad, h64.grad, w64.grad


def alpha_grad_formula(g, h, alpha, grad_out, std_scale, rob_scale):
    """dL/dalpha = sum_k u_k (q_k - p_k) / m_k in log space: finite at alpha = 0 and 1, where
    autograd through log(alpha) / log1p(-alpha) gives 0 * inf = NaN."""
    g, h, alpha, u = (t.double() for t in (g, h, alpha, grad_out))
    z = mix_reference(g, h, alpha, std_scale, rob_scale)
    lp, lq = F.log_softmax(std_scale * g, -1), F.log_softmax(rob_scale * h, -1)
    return (u * (torch.exp(lq - z) - torch.exp(lp - z))).sum(-1)


def assert_close(actual, expected, dtype, scale=1.0):
    """Within the dtype's tolerance; values past the dtype's range must overflow to +-inf."""
    tol = TOLERANCES[dtype]
    big = expected.abs() > torch.finfo(dtype).max
    expected = torch.where(big, expected.sign() * float("inf"), expected)
    torch.testing.assert_close(
        actual.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * scale, equal_nan=False
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,classes", SHAPES)
@pytest.mark.parametrize("alpha_kind", ["0", "1", "random"])
def test_forward_matches_reference(device, dtype, batch, classes, alpha_kind):
    g = 3 * torch.randn(batch, classes, device=device).to(dtype)
    h = 3 * torch.randn(batch, classes, device=device).to(dtype)
    alpha = make_alpha(alpha_kind, batch, dtype, device)
    out = mix(g, h, alpha)
    assert out.shape == (batch, classes) and out.dtype == dtype and out.device == g.device
    expected = mix_reference(g.double(), h.double(), alpha.double())
    assert_close(
        out, expected, dtype, scale=max(1.0, expected.abs().max().item() if out.numel() else 1)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "batch,classes", [(7, 1), (7, 2), (7, 10), (33, 100), (5, 1000), (3, 32000), (0, 10)]
)
@pytest.mark.parametrize("alpha_kind", ["0", "1", "random"])
def test_backward_matches_reference(device, dtype, batch, classes, alpha_kind):
    g = (2 * torch.randn(batch, classes, device=device)).to(dtype).requires_grad_()
    h = (2 * torch.randn(batch, classes, device=device)).to(dtype).requires_grad_()
    alpha = make_alpha(alpha_kind, batch, dtype, device).requires_grad_()
    grad_out = torch.randn(batch, classes, device=device).to(dtype)
    mix(g, h, alpha, 0.7, 1.3).backward(grad_out)
    _, gg, gh, ga = reference_grads(
        mix_reference, g, h, alpha, grad_out, std_scale=0.7, rob_scale=1.3
    )
    if alpha_kind != "random":
        ga = alpha_grad_formula(g.detach(), h.detach(), alpha.detach(), grad_out, 0.7, 1.3)
    # Gradients hold row sums over C classes: their rounding grows like sqrt(C) (PyTorch's own
    # fp32 log_softmax backward errs just as much), so the tolerance does too.
    row_sum = max(1.0, classes**0.5 / 10)
    assert_close(g.grad, gg, dtype, scale=row_sum)
    assert_close(h.grad, gh, dtype, scale=row_sum)
    assert_close(
        alpha.grad, ga, dtype, scale=row_sum * max(1.0, ga.abs().max().item() if batch else 1)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [3, 100, 2000])
def test_gamma_entry_point(device, dtype, classes):
    g = torch.randn(9, classes, device=device).to(dtype).requires_grad_()
    h = torch.randn(9, classes, device=device).to(dtype).requires_grad_()
    gamma = (4 * torch.randn(9, device=device)).to(dtype).requires_grad_()
    grad_out = torch.randn(9, classes, device=device).to(dtype)
    out = mix_gamma(g, h, gamma, 2.0, 0.5)
    out.backward(grad_out)
    ref, gg, gh, gw = reference_grads(
        mix_gamma_reference, g, h, gamma, grad_out, std_scale=2.0, rob_scale=0.5
    )
    assert_close(out, ref, dtype)
    assert_close(g.grad, gg, dtype)
    assert_close(h.grad, gh, dtype)
    assert_close(gamma.grad, gw, dtype, scale=max(1.0, gw.abs().max().item()))


def test_gamma_saturated_keeps_exact_weights(device):
    """sigmoid(±40) rounds to 1/0 in fp32, but logsigmoid keeps log(1 - α) finite."""
    g = torch.randn(2, 5, device=device)
    h = torch.randn(2, 5, device=device)
    gamma = torch.tensor([40.0, -40.0], device=device, requires_grad=True)
    out = mix_gamma(g, h, gamma)
    torch.testing.assert_close(out, mix_gamma_reference(g, h, gamma.detach()))
    out.sum().backward()
    assert torch.isfinite(gamma.grad).all()


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_endpoints_are_log_softmax(device, alpha):
    g = (5 * torch.randn(6, 50, device=device)).requires_grad_()
    h = (5 * torch.randn(6, 50, device=device)).requires_grad_()
    a = torch.full((6,), alpha, device=device, requires_grad=True)
    out = mix(g, h, a, 1.5, 0.8)
    expected = F.log_softmax(0.8 * h if alpha else 1.5 * g, dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    for t in (g, h, a):
        assert torch.isfinite(t.grad).all()


def test_alpha_shapes_and_python_number(device):
    g, h = torch.randn(4, 8, device=device), torch.randn(4, 8, device=device)
    expected = mix_reference(g, h, 0.3)
    for alpha in (
        0.3,
        torch.tensor(0.3, device=device),
        torch.full((4,), 0.3, device=device),
        torch.full((4, 1), 0.3, device=device),
    ):
        torch.testing.assert_close(mix(g, h, alpha), expected)


def test_scalar_alpha_gradient_sums_rows(device):
    g, h = torch.randn(5, 4, device=device), torch.randn(5, 4, device=device)
    alpha = torch.tensor(0.4, device=device, dtype=torch.float64, requires_grad=True)
    per_row = alpha.detach().expand(5).clone().requires_grad_()
    mix(g.double(), h.double(), alpha).sum().backward()
    mix(g.double(), h.double(), per_row).sum().backward()
    assert alpha.grad.shape == ()
    torch.testing.assert_close(alpha.grad, per_row.grad.sum())


def test_output_is_normalised(device):
    g, h = torch.randn(16, 30, device=device), torch.randn(16, 30, device=device)
    out = mix(g, h, torch.rand(16, device=device))
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(16, device=device), atol=1e-5, rtol=0)


def test_non_contiguous_inputs(device):
    g = torch.randn(20, 64, device=device).t()[:10]  # [10, 20], strided
    h = torch.randn(10, 40, device=device)[:, ::2]  # [10, 20], step 2
    alpha = torch.rand(10, 2, device=device)[:, 0]
    assert not (g.is_contiguous() or h.is_contiguous() or alpha.is_contiguous())
    g.requires_grad_()
    h.requires_grad_()
    out = mix(g, h, alpha)
    torch.testing.assert_close(out, mix_reference(g.detach(), h.detach(), alpha))
    out.sum().backward()
    g_ref, h_ref = g.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
    mix_reference(g_ref, h_ref, alpha).sum().backward()
    torch.testing.assert_close(g.grad, g_ref.grad)
    torch.testing.assert_close(h.grad, h_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["gap1e3", "values1e4"])
def test_extreme_logits_stay_finite_where_naive_fails(device, dtype, case):
    """Where log(sum of softmaxes) underflows to -inf and its gradient is NaN, mix stays finite."""
    batch, classes = 8, 10
    g = torch.zeros(batch, classes, device=device)
    h = torch.zeros(batch, classes, device=device)
    if case == "gap1e3":
        g[:, 0] = 1e3  # g is certain of class 0, h of class 1: class 2.. get ~0 probability
        h[:, 1] = 1e3
    else:
        g[:, 0], g[:, 1] = 1e4, -1e4
        h[:, 1], h[:, 2] = 1e4, -1e4
    g, h = g.to(dtype), h.to(dtype)
    alpha = torch.full((batch,), 0.5, device=device, dtype=dtype)
    labels = torch.full((batch,), 3, device=device)

    naive_g = g.clone().requires_grad_()
    naive = naive_mix(naive_g, h, alpha)
    F.nll_loss(naive, labels).backward()
    assert torch.isinf(naive).any(), "the naive mixture should underflow here"
    assert not torch.isfinite(naive_g.grad).all(), "the naive gradient should break here"

    fused_g = g.clone().requires_grad_()
    fused_h = h.clone().requires_grad_()
    fused_a = alpha.clone().requires_grad_()
    out = mix(fused_g, fused_h, fused_a)
    assert torch.isfinite(out).all()
    F.nll_loss(out, labels).backward()
    for t in (fused_g, fused_h, fused_a):
        assert torch.isfinite(t.grad).all()
    # Still the right numbers: compare with the fp64 log-space reference.
    expected = mix_reference(g.double(), h.double(), alpha.double())
    torch.testing.assert_close(
        out.double(), expected, rtol=TOLERANCES[dtype]["rtol"], atol=TOLERANCES[dtype]["atol"] * 1e4
    )
    # The true gradient on the target class's logit is nonzero: attacks are not stalled.
    assert fused_g.grad[:, 3].abs().max() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [1, 3, 17, 100])
def test_shift_invariance_far_from_zero(device, dtype, classes):
    """Softmaxes ignore a shift of the logits, so the mix must too, even where every logit of a
    row lies hundreds below (or above) zero: outputs and gradients as on the unshifted row."""
    g = torch.randn(33, classes, device=device, dtype=dtype)
    h = torch.randn(33, classes, device=device, dtype=dtype)
    alpha, u = make_alpha("random", 33, dtype, device), torch.randn_like(g)
    for shift in (-300.0, 300.0):
        # Exactly representable shifted logits, whose unshifted values the reference gets.
        gs, hs = (g + shift).requires_grad_(), (h - shift / 2).requires_grad_()
        a = alpha.clone().requires_grad_()
        out = mix(gs, hs, a, 0.5, 2.0)
        out.backward(u)
        unshifted = (gs.detach().double() - shift, hs.detach().double() + shift / 2, a)
        expected = reference_grads(mix_reference, *unshifted, u, std_scale=0.5, rob_scale=2.0)
        for got, want in zip((out, gs.grad, hs.grad, a.grad), expected, strict=True):
            assert torch.isfinite(got).all()
            assert_close(got, want, dtype, scale=classes**0.5)


def test_gradcheck_logits_alpha_gamma(device):
    g = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    h = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    alpha = (0.1 + 0.8 * torch.rand(4, dtype=torch.float64, device=device)).requires_grad_()
    gamma = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    scalar_alpha = torch.tensor(0.35, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: mix(*x, 1.3, 0.6), (g, h, alpha))
    assert torch.autograd.gradcheck(lambda *x: mix_gamma(*x, 0.9, 2.0), (g, h, gamma))
    assert torch.autograd.gradcheck(mix, (g, h, scalar_alpha))


@pytest.mark.parametrize("op", ["mix", "mix_gamma"])
def test_opcheck(device, op):
    g = torch.randn(5, 7, device=device, requires_grad=True)
    h = torch.randn(5, 7, device=device, requires_grad=True)
    w = torch.rand(5, device=device, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.adasmooth, op).default, (g, h, w, 1.0, 2.0))
    torch.library.opcheck(getattr(torch.ops.adasmooth, op).default, (g, h, w[0].detach(), 0.5, 1.0))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def loss_fn(g, h, gamma, labels):
        return F.nll_loss(mix_gamma(g, h, gamma, 1.0, 2.0), labels)

    compiled = torch.compile(
        loss_fn, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor"
    )
    g = torch.randn(8, 12, device=device, requires_grad=True)
    h = torch.randn(8, 12, device=device, requires_grad=True)
    gamma = torch.randn(8, device=device, requires_grad=True)
    labels = torch.randint(0, 12, (8,), device=device)
    loss = compiled(g, h, gamma, labels)
    grads = torch.autograd.grad(loss, (g, h, gamma))
    eager_loss = loss_fn(g, h, gamma, labels)
    eager_grads = torch.autograd.grad(eager_loss, (g, h, gamma))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_cpu():
    """The default inductor backend also traces through the op (fake impl + autograd)."""
    torch._dynamo.reset()
    fn = torch.compile(lambda g, h, a: mix(g, h, a).exp().sum(-1), fullgraph=True)
    g, h, a = torch.randn(3, 5), torch.randn(3, 5), torch.rand(3)
    torch.testing.assert_close(fn(g, h, a), torch.ones(3))


def test_autograd_saves_no_batch_by_class_intermediate(device):
    batch, classes = 64, 50
    g = torch.randn(batch, classes, device=device, requires_grad=True)
    h = torch.randn(batch, classes, device=device, requires_grad=True)
    alpha = torch.rand(batch, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = mix(g, h, alpha)
    inputs = {t.data_ptr() for t in (g, h, alpha)}
    assert saved, "the hook should see the saved inputs"
    for t in saved:
        assert t.data_ptr() in inputs or t.numel() < batch * classes, (
            f"saved {tuple(t.shape)} intermediate"
        )
    out.sum().backward()


def test_empty_batch(device):
    g = torch.empty(0, 10, device=device, requires_grad=True)
    h = torch.empty(0, 10, device=device, requires_grad=True)
    alpha = torch.empty(0, device=device, requires_grad=True)
    out = mix(g, h, alpha)
    assert out.shape == (0, 10)
    out.sum().backward()
    assert g.grad.shape == (0, 10) and alpha.grad.shape == (0,)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: (torch.randn(3, 4, device=d), torch.randn(3, 5, device=d), 0.5), "same shape"),
        (lambda d: (torch.randn(3, 4, device=d), torch.randn(2, 4, device=d), 0.5), "same shape"),
        (
            lambda d: (
                torch.randn(3, 4, device=d),
                torch.randn(3, 4, device=d),
                torch.rand(2, device=d),
            ),
            "alpha must be 0-d",
        ),
        (
            lambda d: (
                torch.randn(3, 4, device=d),
                torch.randn(3, 4, device=d),
                torch.rand(3, 2, device=d),
            ),
            "alpha must be 0-d",
        ),
        (
            lambda d: (torch.randn(3, 4, device=d), torch.randn(3, 4, device=d).double(), 0.5),
            "one dtype",
        ),
        (
            lambda d: (
                torch.randn(3, 4, device=d),
                torch.randn(3, 4, device=d),
                torch.rand(3, device=d).double(),
            ),
            "one dtype",
        ),
        (
            lambda d: (
                torch.ones(3, 4, dtype=torch.long, device=d),
                torch.ones(3, 4, dtype=torch.long, device=d),
                0.5,
            ),
            "floating-point",
        ),
        (lambda d: (torch.randn(12, device=d), torch.randn(12, device=d), 0.5), "2-D"),
        (lambda d: (torch.randn(2, 3, 4, device=d), torch.randn(2, 3, 4, device=d), 0.5), "2-D"),
    ],
)
def test_bad_input_errors(device, make, match):
    g, h, alpha = make(device)
    if not isinstance(alpha, torch.Tensor) and g.is_floating_point():
        alpha = torch.tensor(alpha, dtype=g.dtype, device=device)
    elif not isinstance(alpha, torch.Tensor):
        alpha = torch.tensor(alpha, device=device)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.adasmooth.mix(g, h, alpha)


def test_alpha_out_of_range_and_bad_scale():
    g, h = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"alpha must lie in \[0, 1\]"):
        mix(g, h, torch.tensor([0.5, 1.5, 0.2]))
    with pytest.raises(RuntimeError, match=r"alpha must lie in \[0, 1\]"):
        mix(g, h, float("nan"))
    with pytest.raises(RuntimeError, match="must be positive"):
        mix(g, h, 0.5, std_scale=0.0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA build")
def test_mixed_devices_error():
    with pytest.raises(RuntimeError, match="one device"):
        mix(torch.randn(3, 4, device="cuda"), torch.randn(3, 4), torch.tensor(0.5, device="cuda"))


def test_build_info():
    info = adasmooth_ext.build_info()
    assert info["version"] == adasmooth_ext.__version__
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert "9.0" in info["cuda_archs"]


# Classes with mixed probability exactly 0 (a_k = b_k = -inf) are absent: z_k = -inf, zero
# gradient, and no effect on the other classes, whose values are those of the row without them.
WEIGHTS = {
    "alpha=0": (mix, 0.0),
    "alpha=0.3": (mix, 0.3),
    "alpha=1": (mix, 1.0),
    "gamma=-inf": (mix_gamma, -float("inf")),
    "gamma=1.5": (mix_gamma, 1.5),
    "gamma=+inf": (mix_gamma, float("inf")),
}


def mix_and_grads(op, g, h, w, grad_out):
    g, h, w = (t.detach().clone().requires_grad_() for t in (g, h, w))
    out = op(g, h, w, 0.7, 1.3)
    out.backward(grad_out)
    return out.detach(), g.grad, h.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [6, 100, 2000])  # 2000: the CUDA block kernel
@pytest.mark.parametrize("weight", list(WEIGHTS))
def test_masked_classes_are_absent(device, dtype, classes, weight):
    op, value = WEIGHTS[weight]
    masked = sorted({0, 2, 3, classes - 1} | set(range(9, classes - 1, 7)))
    keep = [k for k in range(classes) if k not in masked]
    g = (3 * torch.randn(5, classes, device=device)).to(dtype)
    h = (3 * torch.randn(5, classes, device=device)).to(dtype)
    g[:, masked] = h[:, masked] = -float("inf")
    w = torch.full((5,), value, device=device, dtype=dtype)
    grad_out = torch.randn(5, classes, device=device).to(dtype)  # nonzero at masked classes too

    out, gg, gh, gw = mix_and_grads(op, g, h, w, grad_out)
    sub, sg, sh, sw = mix_and_grads(op, g[:, keep], h[:, keep], w, grad_out[:, keep])
    assert (out[:, masked] == -float("inf")).all()
    assert torch.isfinite(out[:, keep]).all()
    assert_close(out[:, keep], sub.double(), dtype)
    for full, removed in ((gg, sg), (gh, sh)):
        assert (full[:, masked] == 0).all()
        assert_close(full[:, keep], removed.double(), dtype, scale=max(1.0, classes**0.5 / 10))
    assert not gw.isnan().any()  # dL/dalpha may overflow fp16 at alpha = 0, 1, as the true one
    assert_close(gw, sw.double(), dtype, scale=max(1.0, classes**0.5 / 10, sw.abs().max().item()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [6, 2000])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_endpoint_alpha_with_neg_inf_logits_is_log_softmax(device, dtype, classes, alpha):
    """alpha = 0 with g_k = -inf (h_k finite) gives log_softmax(s_g g), -inf included; likewise
    alpha = 1 with h_k = -inf. Those classes get zero gradient and count as absent in dL/dalpha."""
    masked = [1, classes // 2, classes - 1]
    logits = (3 * torch.randn(2, 4, classes, device=device)).to(dtype)
    logits[1 if alpha else 0][:, masked] = -float("inf")
    g, h = logits
    a = torch.full((4,), alpha, device=device, dtype=dtype)
    grad_out = torch.randn(4, classes, device=device).to(dtype)
    out, gg, gh, ga = mix_and_grads(mix, g, h, a, grad_out)

    own, other, s_own, s_other = (h, g, 1.3, 0.7) if alpha else (g, h, 0.7, 1.3)
    own64 = own.double().requires_grad_()
    expected = F.log_softmax(s_own * own64, -1)
    assert (out[:, masked] == -float("inf")).all()
    assert_close(out, expected.detach(), dtype)
    u = torch.where(torch.isinf(expected), 0, grad_out.double())  # absent classes: u_k = 0
    expected.backward(u)
    (grad_own, grad_other) = (gh, gg) if alpha else (gg, gh)
    assert (grad_own[:, masked] == 0).all() and (grad_other == 0).all()
    assert_close(grad_own, own64.grad, dtype, scale=max(1.0, classes**0.5 / 10))
    # dL/dalpha = sum_k u_k (q_k - p_k) / m_k over the present classes, m = the own softmax.
    lo = F.log_softmax(s_other * other.double(), -1)
    ratio = torch.where(torch.isinf(expected), 0, torch.exp(lo - expected.detach()) - 1)
    ga_expected = (u * ratio).sum(-1) * (-1 if alpha else 1)
    assert_close(ga, ga_expected, dtype, scale=max(1.0, ga_expected.abs().max().item()))
