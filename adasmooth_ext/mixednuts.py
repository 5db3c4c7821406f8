"""MixedNUTS (Bai et al., 2024; DESIGN.md §5): mix a *nonlinearly mapped* robust model, no training.

``h``'s logits go through ``M(h) = s·sign(u)·|u|^p``, ``u = GELU(LN_k(h) + c)`` (the fused
``nuts_map`` op) before the usual mixture, and ``g`` may be replaced by its hard prediction::

    calib = calibrate_mixednuts(g, h, calibration_loader, eps=8 / 255)  # held-out data only
    mixed = mixednuts_classifier(g, h, calib.params)  # a MixedClassifier with a fixed α
    table = evaluate_mixednuts(mixed, test_loader, eps=8 / 255)  # AutoAttack + surrogates

Why ``α = 1/(1 + q)``: whatever ``g`` outputs (a one-hot on the worst class included), the mix
keeps ``h``'s prediction wherever ``h``'s mapped probability margin exceeds ``(1 − α)/α = q``. So
``q``, a low percentile of the mapped margins of the calibration examples ``h`` still gets right
under attack, keeps (about) ``β``% of them robust, and the map is chosen to make ``h``'s clean
mistakes fall *below* ``q``, where ``g`` takes over.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from .attacks import APGD, EvalTable, Norm, autoattack_attacks, evaluate
from .data import Splits, as_loader, split_names
from .mixed import MixedClassifier
from .ops import mix, nuts_map

__all__ = [
    "DEFAULT_GRID",
    "Calibration",
    "GridPoint",
    "HardPrediction",
    "MappedModel",
    "NutsParams",
    "calibrate_mixednuts",
    "compare_on_digits",
    "evaluate_mixednuts",
    "mixednuts_classifier",
    "plot_comparison",
    "surrogate",
]

# (s, p, c) candidates: scales, powers and shifts around those MixedNUTS reports.
DEFAULT_GRID: tuple[tuple[float, float, float], ...] = tuple(
    itertools.product((0.5, 1.0, 2.0, 4.0), (1.0, 2.0, 4.0), (-1.0, -0.5, 0.0))
)


# ---------------------------------------------------------------------------------------------
# Output maps


class MappedModel(nn.Module):
    """``model`` with its logits reshaped before mixing.

    With ``k`` the MixedNUTS map ``nuts_map(logits, k, s, p, c)``; without it the temperature
    ``s·logits`` (the identity for ``s = 1``), for which ``p`` and ``c`` must keep their defaults.
    """

    def __init__(
        self,
        model: nn.Module,
        k: int | None = None,
        s: float = 1.0,
        p: float = 1.0,
        c: float = 0.0,
    ) -> None:
        super().__init__()
        if not (s > 0 and p > 0 and math.isfinite(s) and math.isfinite(p) and math.isfinite(c)):
            raise ValueError(f"MappedModel: need finite s > 0, p > 0 and c, got {s}, {p}, {c}")
        if k is None and (p, c) != (1.0, 0.0):
            raise ValueError("MappedModel: p and c need the MixedNUTS map: give k (top-k size)")
        if k is not None and k < 2:
            raise ValueError(f"MappedModel: k must be >= 2, got {k}")
        self.model = model
        self.k, self.s, self.p, self.c = k, float(s), float(p), float(c)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        if self.k is None:
            return logits if self.s == 1.0 else self.s * logits
        return nuts_map(logits, self.k, self.s, self.p, self.c)

    def extra_repr(self) -> str:
        return f"k={self.k}, s={self.s:g}, p={self.p:g}, c={self.c:g}"


class HardPrediction(nn.Module):
    """``model``'s hard prediction as logits: ``scale`` on the predicted class, 0 elsewhere.

    Mixed with the default ``scale`` the prediction gets all of ``g``'s probability mass (the
    others get ``e^{-100}``). Piecewise constant: no gradient reaches the input through it, so
    attack it through a :func:`surrogate`.
    """

    def __init__(self, model: nn.Module, scale: float = 100.0) -> None:
        super().__init__()
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"HardPrediction: scale must be finite and positive, got {scale}")
        self.model, self.scale = model, float(scale)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x).detach()
        hard = F.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)
        return self.scale * hard

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


@dataclass(frozen=True)
class NutsParams:
    """Everything that turns ``g`` and ``h`` into a MixedNUTS classifier."""

    k: int
    s: float
    p: float
    c: float
    alpha: float
    hard_g: bool = False


def mixednuts_classifier(
    g: nn.Module, h: nn.Module, params: NutsParams, *, std_scale: float = 1.0
) -> MixedClassifier:
    """``MixedClassifier(g or its hard prediction, MappedModel(h, k, s, p, c), alpha=α)``."""
    std = HardPrediction(g) if params.hard_g else g
    rob = MappedModel(h, params.k, params.s, params.p, params.c)
    return MixedClassifier(std, rob, alpha=params.alpha, std_scale=std_scale)


# ---------------------------------------------------------------------------------------------
# Calibration


@dataclass(frozen=True)
class GridPoint:
    """One ``(s, p, c)`` candidate: its threshold, weight, objective and calibration accuracy."""

    s: float
    p: float
    c: float
    q: float  # (100 − β)-th percentile of mapped margins, attacked-but-correct examples
    alpha: float  # 1 / (1 + q)
    objective: float  # share of h's clean mistakes with mapped q_pred − q_y >= q (minimised)
    clean_accuracy: float  # the resulting mix on the clean calibration data


@dataclass(frozen=True)
class Calibration:
    """The chosen parameters and the statistics behind them."""

    params: NutsParams
    beta: float
    attacks: tuple[str, ...]  # names (ε, steps, ...) of the attacks on h; backend "adasmooth"
    n_examples: int  # calibration examples
    n_robust: int  # h correct on clean and under every attack
    n_clean_wrong: int  # h wrong on clean
    grid: tuple[GridPoint, ...]

    @property
    def chosen(self) -> GridPoint:
        p = self.params
        return next(g for g in self.grid if (g.s, g.p, g.c) == (p.s, p.p, p.c))


def _check_held_out(data: object) -> None:
    names = split_names(data)
    if "test" in names:
        raise ValueError(
            "calibrate_mixednuts: refusing the test split; calibrate on the held-out "
            "calibration split (Splits.calibration), never on the data you report on"
        )
    if names - {"calibration"}:
        raise ValueError(
            f"calibrate_mixednuts: refusing the {sorted(names)} split(s): h has seen training "
            "data, so its margins there are overconfident; use Splits.calibration"
        )


def _true_margin(probs: Tensor, y: Tensor) -> Tensor:
    """``q_y − max_{k≠y} q_k``: positive where the prediction is right."""
    others = probs.scatter(1, y[:, None], -math.inf)
    return probs.gather(1, y[:, None]).squeeze(1) - others.amax(1)


def _keeping_percentile(margins: Tensor, beta: float) -> float:
    """The ``(100 − β)``-th percentile as the largest value with at least ``β``% of ``margins``
    at or above it (an order statistic: no interpolation, the tightest such threshold)."""
    keep = math.ceil(beta * margins.numel() / 100 - 1e-9)
    return margins.sort().values[margins.numel() - keep].item()


def _mapped_probs(logits: Tensor, k: int, s: float, p: float, c: float) -> Tensor:
    return torch.softmax(nuts_map(logits, k, s, p, c).double(), dim=-1)


@torch.no_grad()
def _collect(g, h, loader, attacks, device):
    """Clean logits of g and h, h's logits under each attack (clean-correct rows), labels."""
    std, rob, adv, labels = [], [], [], []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        std_logits, rob_logits = g(x), h(x)
        ok = rob_logits.argmax(1) == y
        rows = rob_logits.clone()[None].repeat(len(attacks), 1, 1)
        for i, attack in enumerate(attacks):
            if ok.any():
                rows[i, ok] = h(attack(h, x[ok], y[ok]))
        std.append(std_logits), rob.append(rob_logits), adv.append(rows), labels.append(y)
    return torch.cat(std), torch.cat(rob), torch.cat(adv, 1), torch.cat(labels)


def calibrate_mixednuts(
    g: nn.Module,
    h: nn.Module,
    calibration: DataLoader | Iterable[tuple[Tensor, Tensor]],
    *,
    eps: float,
    norm: Norm = "Linf",
    beta: float = 98.5,
    k: int = 4,
    grid: Sequence[tuple[float, float, float]] = DEFAULT_GRID,
    hard_g: bool = False,
    steps: int = 100,
    n_targets: int = 9,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Calibration:
    """Choose ``(s, p, c)`` and ``α`` for MixedNUTS from held-out data (DESIGN.md §5).

    ``h`` alone is attacked with APGD-CE and targeted APGD-DLR (``attacks.APGD``); an example
    is *attacked-but-correct* if ``h`` gets it right clean and under both, and its margin is the
    smaller of the two attacked ones. For each grid point, ``q`` is the ``(100 − β)``-th
    percentile (the largest value with at least ``β``% at or above it) of the mapped
    probability margins ``q_y − max_{k≠y} q_k`` of those examples and ``α = 1/(1 + q)``; the
    objective is the share of ``h``'s clean mistakes whose mapped margin over the true class,
    ``q_pred − q_y``, is still ``≥ q``: exactly those the mix gets wrong even with a right,
    one-hot ``g`` (DESIGN's "margin ≥ q", measured against the class that matters; it equals
    top-1 minus top-2 where the truth is ``h``'s runner-up). The point with the smallest
    objective wins; ties go to the larger ``q`` (smaller ``α``, more of ``g``).

    Refuses data tagged as the test (or training) split of :class:`~adasmooth_ext.data.Splits`,
    however wrapped: calibrating on the test set would overstate robustness.

    Args:
        g, h: the accurate and the robust classifier (eval mode).
        calibration: batches ``(x, y)`` of held-out data, e.g. ``Splits.calibration``.
        eps, norm, steps, n_targets, seed: the attacks' threat model and budget.
        beta: the percentage of ``h``'s attacked-but-correct examples to keep, in ``(0, 100]``.
        k: top-``k`` logits standardising the map (``2 ≤ k ≤`` classes).
        grid: ``(s, p, c)`` candidates.
        hard_g: mix with ``g``'s hard prediction (reported clean accuracy and ``params``).
    """
    _check_held_out(calibration)
    if not 0 < beta <= 100:
        raise ValueError(f"calibrate_mixednuts: beta must lie in (0, 100], got {beta}")
    grid = [tuple(map(float, point)) for point in grid]
    if not grid or any(len(point) != 3 for point in grid):
        raise ValueError("calibrate_mixednuts: grid must be a non-empty list of (s, p, c)")
    if device is None:
        device = next((p.device for p in h.parameters()), torch.device("cpu"))
    attack_args = dict(eps=eps, norm=norm, steps=steps, seed=seed)
    attacks = [
        APGD(loss="ce", **attack_args),
        APGD(loss="dlr-targeted", n_targets=n_targets, **attack_args),
    ]
    std, rob, adv, y = _collect(g, h, calibration, attacks, device)
    if y.numel() == 0:
        raise ValueError("calibrate_mixednuts: the calibration data are empty")
    if not 2 <= k <= rob.shape[1]:
        raise ValueError(f"calibrate_mixednuts: k must lie in [2, {rob.shape[1]}], got {k}")
    robust = (rob.argmax(1) == y) & (adv.argmax(2) == y).all(0)
    wrong = rob.argmax(1) != y
    if not robust.any():
        raise ValueError(
            "calibrate_mixednuts: h gets no calibration example right under attack; MixedNUTS "
            "needs a robust h (or a smaller eps)"
        )
    std_in = HardPrediction(nn.Identity())(std) if hard_g else std

    points = []
    for s, p, c in grid:
        margins = torch.stack(
            [_true_margin(_mapped_probs(a[robust], k, s, p, c), y[robust]) for a in adv]
        ).amin(0)
        q = max(_keeping_percentile(margins, beta), 0.0)  # < 0: the map flips right answers
        alpha = 1 / (1 + q)
        # How far h's wrong answer beats the truth: at or above q, even a right g cannot win.
        wrong_margins = -_true_margin(_mapped_probs(rob[wrong], k, s, p, c), y[wrong])
        objective = (wrong_margins >= q).double().mean().item() if wrong.any() else 0.0
        mixed = mix(std_in, nuts_map(rob, k, s, p, c), alpha)
        accuracy = (mixed.argmax(1) == y).double().mean().item()
        points.append(GridPoint(s, p, c, q, alpha, objective, accuracy))
    best = min(points, key=lambda point: (point.objective, -point.q))
    params = NutsParams(k, best.s, best.p, best.c, best.alpha, hard_g)
    return Calibration(
        params=params,
        beta=float(beta),
        attacks=tuple(attack.name for attack in attacks),
        n_examples=y.numel(),
        n_robust=int(robust.sum()),
        n_clean_wrong=int(wrong.sum()),
        grid=tuple(points),
    )


# ---------------------------------------------------------------------------------------------
# Evaluation


def surrogate(mixed: MixedClassifier, kind: str = "soft") -> MixedClassifier:
    """A differentiable stand-in for a MixedNUTS classifier, to take attack gradients from.

    ``"soft"``: ``g``'s soft logits instead of its hard prediction and the map's power clipped
    to ``p ≥ 1`` (its slope at ``u = 0`` is then finite and non-zero); ``"identity"``: soft ``g``
    and ``h``'s raw logits. Same ``α`` and scales; the base models are shared, not copied.
    """
    if kind not in ("soft", "identity"):
        raise ValueError(f"surrogate: kind must be 'soft' or 'identity', got {kind!r}")
    if mixed.policy is not None:
        raise ValueError("surrogate: MixedNUTS surrogates are for a fixed α, not a policy")
    std, rob = mixed.std_model, mixed.rob_model
    if isinstance(std, HardPrediction):
        std = std.model
    if isinstance(rob, MappedModel) and kind == "identity":
        rob = rob.model
    elif isinstance(rob, MappedModel):
        rob = MappedModel(rob.model, rob.k, rob.s, max(rob.p, 1.0), rob.c)
    return MixedClassifier(
        std,
        rob,
        alpha=mixed.alpha.item(),
        std_scale=mixed.std_scale,
        rob_scale=mixed.rob_scale,
    )


def _surrogate_attacks(mixed: MixedClassifier, kinds: Sequence[str], **budget) -> list[APGD]:
    attacks = []
    for kind in kinds:
        target = surrogate(mixed, kind)
        for loss in ("ce", "dlr-targeted"):
            attack = APGD(loss=loss, target=target, **budget)
            attack.label = f"APGD[{kind} surrogate]"  # the name says which gradients it used
            attacks.append(attack)
    return attacks


def evaluate_mixednuts(
    mixed: MixedClassifier,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    eps: float,
    norm: Norm = "Linf",
    steps: int = 100,
    n_targets: int = 9,
    square_queries: int = 5000,
    surrogates: Sequence[str] = ("soft", "identity"),
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> EvalTable:
    """AutoAttack standard, then the adaptive AutoAttack, on a MixedNUTS classifier, cascaded.

    The first rows are AutoAttack standard with end-to-end gradients (backend ``autoattack`` or
    ``torchattacks``); its Square row is the standard robust accuracy. Then, because the hard
    prediction and steep maps mask gradients, APGD-CE and APGD-T follow each
    :func:`surrogate`'s gradients (backend ``adasmooth``, named ``APGD[<kind> surrogate]``)
    while success is judged on ``mixed`` itself; the last row is the adaptive robust accuracy.
    """
    budget = dict(eps=eps, norm=norm, steps=steps, seed=seed)
    attacks = autoattack_attacks(n_targets=n_targets, square_queries=square_queries, **budget)
    attacks += _surrogate_attacks(mixed, surrogates, n_targets=n_targets, **budget)
    return evaluate(mixed, loader, attacks, device=device, cascade=True, progress=progress)


# ---------------------------------------------------------------------------------------------
# Comparison on digits: MixedNUTS vs fixed-α smoothing vs the adaptive policy


def compare_on_digits(
    g: nn.Module,
    h: nn.Module,
    splits: Splits,
    *,
    eps: float,
    norm: Norm = "Linf",
    alphas: Sequence[float] = (0.5, 0.75, 0.9),
    std_scale: float = 1.0,
    rob_scale: float = 1.0,
    adaptive: MixedClassifier | None = None,
    adaptive_w: float = 0.5,
    beta: float = 98.5,
    k: int = 4,
    grid: Sequence[tuple[float, float, float]] = DEFAULT_GRID,
    hard_g: bool = False,
    steps: int = 100,
    n_targets: int = 9,
    square_queries: int = 5000,
    limit: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[dict]:
    """The rows of one table: ``g``, ``h``, fixed-``α`` mixes, MixedNUTS and (if given) the
    adaptive policy, all on the same base models and the first ``limit`` test examples; the
    fixed-``α`` mixes use the temperatures ``std_scale``, ``rob_scale`` (give the policy's).

    MixedNUTS is calibrated on ``splits.calibration``. Every model faces AutoAttack standard
    (end-to-end); MixedNUTS also the surrogate-gradient APGDs and the adaptive policy the APGD
    with the term pushing ``α`` toward ``g`` (``adaptive_w``). Each row: ``method``, ``alpha``
    (``None`` for a policy or a base model), ``clean``, ``autoattack`` (standard),
    ``adaptive`` (worst case over all its attacks), ``attacks`` and ``backend``.
    """
    test = splits.test
    if limit is not None:
        test = Subset(test, range(min(limit, len(test))))
    loader = as_loader(test, batch_size)
    calib = calibrate_mixednuts(
        g,
        h,
        as_loader(splits.calibration, batch_size),
        eps=eps,
        norm=norm,
        beta=beta,
        k=k,
        grid=grid,
        hard_g=hard_g,
        steps=steps,
        n_targets=n_targets,
        seed=seed,
        device=device,
    )
    budget = dict(eps=eps, norm=norm, steps=steps, n_targets=n_targets, seed=seed)
    standard = autoattack_attacks(square_queries=square_queries, **budget)
    models: list[tuple[str, float | None, nn.Module, list]] = [
        ("g (standard)", None, g, []),
        ("h (robust)", None, h, []),
    ]
    scales = dict(std_scale=std_scale, rob_scale=rob_scale)
    models += [(f"fixed α={a:g}", a, MixedClassifier(g, h, alpha=a, **scales), []) for a in alphas]
    nuts = mixednuts_classifier(g, h, calib.params)
    p = calib.params
    name = f"MixedNUTS (s={p.s:g}, p={p.p:g}, c={p.c:g}{', hard g' if p.hard_g else ''})"
    nuts_extra = _surrogate_attacks(nuts, ("soft", "identity"), **budget)
    models.append((name, p.alpha, nuts, nuts_extra))
    if adaptive is not None:
        extra = autoattack_attacks(square_queries=square_queries, adaptive_w=adaptive_w, **budget)
        models.append(("adaptive policy", None, adaptive, extra[len(standard) :]))

    rows = []
    for method, alpha, model, extra in models:
        table = evaluate(
            model, loader, standard + extra, device=device, cascade=True, progress=progress
        )
        rows.append(
            dict(
                method=method,
                alpha=alpha,
                clean=table.rows[0].accuracy,
                autoattack=table.rows[len(standard)].accuracy,
                adaptive=table.rows[-1].accuracy,
                attacks=", ".join(a.name for a in standard + extra),
                backend=table.rows[-1].backend,
            )
        )
    return rows


def plot_comparison(rows: Sequence[dict], path: str | None = None):
    """Clean vs robust accuracy, one point per method (the adaptive-attack figure, and the
    AutoAttack-standard one where they differ); saved to ``path`` if given. Returns the
    ``matplotlib`` figure (no pyplot: safe without a display)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for row in rows:
        (point,) = ax.plot(100 * row["clean"], 100 * row["adaptive"], "o")
        if row["autoattack"] != row["adaptive"]:
            ax.plot(100 * row["clean"], 100 * row["autoattack"], "x", color=point.get_color())
        ax.annotate(row["method"], (100 * row["clean"], 100 * row["adaptive"]), fontsize=8)
    backends = sorted({b for row in rows for b in row["backend"].split("+")})
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(
        "o: worst case over AutoAttack + adaptive/surrogate APGD; x: AutoAttack standard\n"
        f"backend: {'+'.join(backends)}",
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig
