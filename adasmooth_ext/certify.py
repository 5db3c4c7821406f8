"""Certified robustness of the mixed classifier (DESIGN.md §2).

A certificate is a radius ``r`` such that no perturbation ``‖δ‖ ≤ r`` changes the mixed
prediction, whatever the accurate model ``g`` does; it rests on the robust model ``h`` alone.
Two routes:

- **Lipschitz** (mixing-classifiers Theorem 3.5): ``h``'s probabilities are ``L_k``-Lipschitz.
  :func:`lipschitz_certify` (the fused op) for a fixed ``α``, :func:`policy_lipschitz_certify`
  for a policy ``α(x) ≥ α_lo``.
- **Randomized smoothing** (Theorem 3.7, ℓ2): ``h`` is a Gaussian-smoothed base classifier.
  :func:`smoothed_predict` and :func:`smoothed_certify` follow Cohen et al. (2019);
  :func:`randomized_smoothing_radius` turns their bounds into the mix's radius.

:func:`certified_accuracy`, :func:`smoothing_curves` and :func:`plot_certified_accuracy` give
certified accuracy on a grid of radii. A radius of 0 always means "nothing certified".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import beta, binomtest
from torch import Tensor
from tqdm.auto import tqdm

from .ops import LipschitzCertificate, lipschitz_certify

__all__ = [
    "ABSTAIN",
    "LipschitzCertificate",
    "SmoothedCertificate",
    "certified_accuracy",
    "lipschitz_certify",
    "plot_certified_accuracy",
    "policy_lipschitz_certify",
    "randomized_smoothing_radius",
    "smoothed_certify",
    "smoothed_predict",
    "smoothing_curves",
]

ABSTAIN = -1  # the prediction of a smoothed classifier that cannot decide


def policy_lipschitz_certify(
    rob_logits: Tensor,
    alpha_lo: float,
    lipschitz: Tensor | float,
    rob_scale: float = 1.0,
    alpha: Tensor | None = None,
) -> LipschitzCertificate:
    """Lipschitz certificate for a mix whose weight ``α(x)`` varies, but never below ``α_lo``.

    The paper certifies a fixed ``α``; this extends it. For a competitor ``k`` of ``h``'s
    prediction ``i``, the mixed margin at any point ``x'`` (``g``'s share being at worst −1) is

        m(x') ≥ α(x')·(1 + q_i(x') − q_k(x')) − 1 ≥ α_lo·(1 + q_i(x') − q_k(x')) − 1,

    the second step because ``1 + q_i − q_k ≥ 0``, so the bound grows with ``α``. The right-hand
    side is the fixed-``α`` bound at ``α_lo``, and the same Lipschitz step turns it into the
    fixed-``α`` radius at ``α_lo``: valid however ``α(x')`` moves with ``x'``, as long as
    ``α(x') ≥ α_lo`` at every input (e.g. ``α = α_lo + (1 − α_lo)·σ(γ)``). The radius is
    non-decreasing in ``α``, so this is never more than the fixed-``α(x)`` radius would claim.

    Args:
        rob_logits, lipschitz, rob_scale: as for :func:`lipschitz_certify`.
        alpha_lo: the policy's lower bound on ``α``, in ``[0, 1]``.
        alpha: the policy's weights at these inputs, if at hand: checked to be ``≥ α_lo``.
    """
    if not 0.0 <= alpha_lo <= 1.0:
        raise ValueError(f"alpha_lo must lie in [0, 1], got {alpha_lo}")
    if alpha is not None and bool((alpha < alpha_lo).any()):
        raise ValueError(
            f"the policy's alpha dips to {alpha.min().item():.6g}, below alpha_lo = {alpha_lo}: "
            "the certificate needs alpha(x) >= alpha_lo at every input"
        )
    return lipschitz_certify(rob_logits, alpha_lo, lipschitz, rob_scale)


def randomized_smoothing_radius(
    pa_lower: Tensor | float,
    pb_upper: Tensor | float,
    alpha: Tensor | float,
    sigma: float,
) -> Tensor:
    """The mix's ℓ2 certified radius when ``h`` is Gaussian smoothing with noise ``σ``.

    Mixing-classifiers Theorem 3.7 with ``μ = (1 − α)/α``:
    ``r = (σ/2)·(Φ⁻¹(p_A/(1 + μ)) − Φ⁻¹((p_B + μ)/(1 + μ)))``, evaluated as
    ``(σ/2)·(Φ⁻¹(α·p_A) − Φ⁻¹(α·p_B + 1 − α))`` (the same, since ``1 + μ = 1/α``), which has no
    division and is exact at ``α = 0`` (radius 0). ``p_A`` must be a lower and ``p_B`` an upper
    confidence bound (e.g. ``p_B = 1 − p_A``, as :class:`SmoothedCertificate` does); raw
    frequencies certify nothing. ``α = 1`` gives Cohen et al.'s ``(σ/2)(Φ⁻¹(p_A) − Φ⁻¹(p_B))``.
    The radius grows with ``α``, so a policy with ``α(x) ≥ α_lo`` is certified at ``α_lo``, as
    in :func:`policy_lipschitz_certify`. Clamped at 0; differentiable (``torch.special.ndtri``).
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    for name, value in (("pa_lower", pa_lower), ("pb_upper", pb_upper), ("alpha", alpha)):
        value = torch.as_tensor(value)
        if not bool(((value >= 0) & (value <= 1)).all()):
            raise ValueError(
                f"{name} must lie in [0, 1], got values in "
                f"[{value.min().item():.6g}, {value.max().item():.6g}]"
            )
    a = torch.as_tensor(alpha * pa_lower)
    b = torch.as_tensor(alpha * pb_upper + 1 - alpha)
    certified = a > b
    # Where nothing is certified, evaluate Φ⁻¹ at harmless points: no inf, no NaN gradient.
    a, b = torch.where(certified, a, 0.75), torch.where(certified, b, 0.25)
    radius = sigma / 2 * (torch.special.ndtri(a) - torch.special.ndtri(b))
    return torch.where(certified, radius, 0)


@dataclass(frozen=True)
class SmoothedCertificate:
    """Cohen et al.'s certificate for the smoothed ``h``, per input.

    ``pred``: the smoothed prediction, ``ABSTAIN`` (-1) where ``p_A`` could not be shown
    ``≥ 1/2``; ``pa_lower``: one-sided Clopper–Pearson lower bound on ``p_A`` (float64);
    ``radius``: ``σ·Φ⁻¹(p_A)``, 0 where abstaining.
    """

    pred: Tensor
    pa_lower: Tensor
    radius: Tensor
    sigma: float

    def mixed_radius(self, alpha: Tensor | float) -> Tensor:
        """The mix's radius (Theorem 3.7) with ``p_B = 1 − p_A``; 0 where ``h`` abstains."""
        radius = randomized_smoothing_radius(self.pa_lower, 1 - self.pa_lower, alpha, self.sigma)
        return torch.where(self.pred == ABSTAIN, 0, radius)


Model = Callable[[Tensor], Tensor]


@torch.no_grad()
def _class_counts(model: Model, x: Tensor, sigma: float, num: int, batch_size: int) -> Tensor:
    """How often ``model`` predicts each class on ``num`` Gaussian-noised copies of ``x``."""
    counts = None
    for start in range(0, num, batch_size):
        batch = x.unsqueeze(0).expand(min(batch_size, num - start), *x.shape)
        logits = model(batch + sigma * torch.randn_like(batch))
        if counts is None:
            counts = torch.zeros(logits.shape[-1], dtype=torch.int64, device=x.device)
        counts += torch.bincount(logits.argmax(-1), minlength=logits.shape[-1])
    return counts


def _check_smoothing_args(x: Tensor, sigma: float, failure_prob: float, **counts: int) -> None:
    if x.dim() < 2:
        raise ValueError(f"x must be a batch [N, ...] of inputs, got shape {tuple(x.shape)}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if not 0 < failure_prob < 1:
        raise ValueError(f"failure_prob must lie in (0, 1), got {failure_prob}")
    for name, n in counts.items():
        if n < 1:
            raise ValueError(f"{name} must be at least 1, got {n}")


def smoothed_predict(
    model: Model,
    x: Tensor,
    sigma: float,
    n: int,
    failure_prob: float = 0.001,
    batch_size: int = 1000,
    progress: bool = True,
) -> Tensor:
    """Cohen et al.'s PREDICT: the smoothed ``model``'s class per input, or ``ABSTAIN``.

    Returns the top class of ``n`` noisy samples where a two-sided binomial test rejects a tie
    with the runner-up at level ``failure_prob``, so a returned class is wrong with probability
    at most ``failure_prob``.
    """
    _check_smoothing_args(x, sigma, failure_prob, n=n)
    if binomtest(n, n).pvalue > failure_prob:
        raise ValueError(
            f"n = {n} samples are too few to predict at failure_prob = {failure_prob}: even "
            f"unanimous samples give p-value {binomtest(n, n).pvalue:.3g}"
        )
    pred = torch.full((len(x),), ABSTAIN, dtype=torch.int64)
    for idx in tqdm(range(len(x)), desc="smoothed predict", disable=not progress):
        counts = _class_counts(model, x[idx], sigma, n, batch_size)
        (n_a, n_b), (c_a, _) = F.pad(counts, (0, 1)).topk(2)  # a 0 runner-up if C = 1
        if binomtest(int(n_a), int(n_a + n_b)).pvalue <= failure_prob:
            pred[idx] = int(c_a)
    return pred


def smoothed_certify(
    model: Model,
    x: Tensor,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    failure_prob: float = 0.001,
    batch_size: int = 1000,
    progress: bool = True,
) -> SmoothedCertificate:
    """Cohen et al.'s CERTIFY for each input of the batch ``x``.

    ``n0`` samples select the likely top class ``c_A``; ``n`` fresh samples estimate its
    probability, bounded below at confidence ``1 − failure_prob`` (Clopper–Pearson). Noise is
    drawn ``batch_size`` samples at a time. Raises if ``n`` is too small for any certificate:
    even ``n`` agreeing samples give ``p_A ≥ failure_prob^(1/n)``, which must exceed 1/2.
    """
    _check_smoothing_args(x, sigma, failure_prob, n0=n0, n=n)
    if failure_prob ** (1 / n) <= 0.5:
        need = math.floor(math.log2(1 / failure_prob)) + 1
        raise ValueError(
            f"n = {n} samples cannot certify at failure_prob = {failure_prob}: even if all "
            f"agree, the lower bound on p_A is {failure_prob ** (1 / n):.3g} <= 0.5; use "
            f"n >= {need}"
        )
    guess = torch.empty(len(x), dtype=torch.int64)
    hits = torch.empty(len(x), dtype=torch.int64)
    for idx in tqdm(range(len(x)), desc="smoothed certify", disable=not progress):
        guess[idx] = int(_class_counts(model, x[idx], sigma, n0, batch_size).argmax())
        hits[idx] = int(_class_counts(model, x[idx], sigma, n, batch_size)[guess[idx]])
    # One-sided Clopper–Pearson lower bound; beta.ppf(q, 0, ·) is NaN, the bound there is 0.
    pa_lower = torch.from_numpy(beta.ppf(failure_prob, hits.numpy(), n - hits.numpy() + 1))
    pa_lower = torch.where(hits > 0, pa_lower, 0.0)
    certified = pa_lower >= 0.5
    radius = torch.where(certified, sigma * torch.special.ndtri(pa_lower), 0)
    return SmoothedCertificate(torch.where(certified, guess, ABSTAIN), pa_lower, radius, sigma)


def certified_accuracy(
    pred: Tensor, radius: Tensor, labels: Tensor, radii: Tensor | Sequence[float]
) -> Tensor:
    """Share of inputs predicted correctly with a certified radius ``> 0`` and ``≥ ρ``, per ρ.

    Returns a ``[len(radii)]`` float tensor. A radius of 0 certifies nothing, so at ``ρ = 0`` this
    is the accuracy on certified inputs, not the clean accuracy.
    """
    if not pred.shape == radius.shape == labels.shape or pred.dim() != 1:
        raise ValueError(
            f"pred, radius and labels must be 1-D of one length, got {tuple(pred.shape)}, "
            f"{tuple(radius.shape)} and {tuple(labels.shape)}"
        )
    radii = torch.as_tensor(radii, dtype=radius.dtype, device=radius.device)
    good = (pred == labels) & (radius > 0)
    return (good & (radius >= radii.unsqueeze(1))).double().mean(dim=1)


def smoothing_curves(
    cert: SmoothedCertificate,
    labels: Tensor,
    radii: Tensor | Sequence[float],
    alphas: Sequence[float],
) -> dict[str, Tensor]:
    """Certified accuracy per radius for the smoothed ``h`` alone and for mixes at ``alphas``."""
    curves = {
        f"h alone (σ = {cert.sigma:g})": certified_accuracy(cert.pred, cert.radius, labels, radii)
    }
    for alpha in alphas:
        radius = cert.mixed_radius(alpha)
        curves[f"mix, α = {alpha:g}"] = certified_accuracy(cert.pred, radius, labels, radii)
    return curves


def plot_certified_accuracy(
    radii: Tensor | Sequence[float],
    curves: Mapping[str, Tensor],
    path: str | Path,
    title: str = "Certified accuracy",
    xlabel: str = "ℓ2 radius",
) -> Path:
    """Writes a PNG of certified accuracy vs radius, one line per curve; returns its path.

    Uses matplotlib's Agg canvas directly, so it needs no display and leaves pyplot's global
    backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    radii = torch.as_tensor(radii).cpu()
    for label, acc in curves.items():
        ax.plot(radii, 100 * acc.cpu(), label=label)
    ax.set(xlabel=xlabel, ylabel="certified accuracy (%)", title=title, ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
