"""MixedNUTS: output maps, calibration on held-out data, surrogate-gradient evaluation, the
comparison table. Tiny digits CNNs (conftest) and small attack budgets."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset

from adasmooth_ext import mix, nuts_map
from adasmooth_ext.attacks import APGD
from adasmooth_ext.data import as_loader
from adasmooth_ext.mixednuts import (
    HardPrediction,
    MappedModel,
    NutsParams,
    calibrate_mixednuts,
    compare_on_digits,
    evaluate_mixednuts,
    mixednuts_classifier,
    plot_comparison,
    surrogate,
)
from adasmooth_ext.reference import mix_reference, nuts_map_reference


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mapped_model_identity_temperature_and_nuts_map(digit_models):
    splits, _, h = digit_models
    x = splits.calibration.tensors[0][:16]
    assert torch.equal(MappedModel(h)(x), h(x))
    assert torch.equal(MappedModel(h, s=2.5)(x), 2.5 * h(x))
    torch.testing.assert_close(
        MappedModel(h, k=4, s=2, p=3, c=-0.5)(x), nuts_map_reference(h(x), 4, 2, 3, -0.5)
    )
    with pytest.raises(ValueError, match="give k"):
        MappedModel(h, p=2.0)
    with pytest.raises(ValueError, match="k must be"):
        MappedModel(h, k=1)
    with pytest.raises(ValueError, match="s > 0"):
        MappedModel(h, k=4, s=0.0)


@pytest.mark.parametrize("hard_g", [False, True])
def test_mixednuts_classifier_is_the_reference_composition(digit_models, hard_g):
    splits, g, h = digit_models
    g64, h64 = (copy.deepcopy(m).double() for m in (g, h))  # fp64: a tight comparison
    x = splits.calibration.tensors[0][:32].double()
    params = NutsParams(k=4, s=1.5, p=2.0, c=-0.5, alpha=0.7, hard_g=hard_g)
    out = mixednuts_classifier(g64, h64, params)(x)
    std = g64(x)
    if hard_g:
        std = 100.0 * F.one_hot(std.argmax(1), std.shape[1]).double()
    alpha = torch.tensor(0.7).item()  # MixedClassifier keeps a fixed α as a float32 buffer
    expected = mix_reference(std, nuts_map_reference(h64(x), 4, 1.5, 2.0, -0.5), alpha)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


class Quantised(nn.Module):
    """Logits ``round(8·x)``: piecewise constant, so an ε < 1/16 attack cannot change them and
    the margins under attack are the clean ones, known by construction."""

    def forward(self, x):
        return torch.round(8 * x)


def synthetic_calibration(n=200, classes=5, seed=0):
    """Logit vectors on the 1/8 grid: most rows right with margins of every size, a quarter
    wrong by a small gap."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=gen)
    logits = torch.randint(0, 4, (n, classes), generator=gen).float()
    top = torch.randint(4, 9, (n,), generator=gen).float()
    logits[torch.arange(n), y] = top
    wrong = torch.arange(n) % 4 == 0
    other = (y + 1) % classes
    logits[wrong, other[wrong]] = top[wrong]
    logits[wrong, y[wrong]] = top[wrong] - 1
    return TensorDataset(logits / 8, y)


def kept_against_worst_g(mapped, y, alpha):
    """Share of rows whose mix with a one-hot ``g`` on the strongest wrong class still says
    ``y``: the robustness ``α`` must preserve whatever ``g`` does."""
    worst = mapped.scatter(1, y[:, None], -torch.inf).argmax(1)
    g = 100.0 * F.one_hot(worst, mapped.shape[1]).to(mapped.dtype)
    return (mix(g, mapped, alpha).argmax(1) == y).double().mean().item()


def test_calibration_recovers_the_smallest_alpha_that_keeps_beta_percent():
    """Known-good α: the smallest weight with which β% of h's attacked-but-correct examples
    survive a worst-case g. Checked by mixing (fp32, hence the 1e-5 nudge off ties), not by
    formula."""
    data = synthetic_calibration()
    h, g = Quantised().eval(), nn.Linear(5, 5).eval()
    grid = [(1.0, 1.0, 0.0), (4.0, 1.0, -1.0), (1.0, 0.5, 0.0)]
    beta = 80.0
    calib = calibrate_mixednuts(
        g, h, DataLoader(data, 64), eps=0.03, beta=beta, k=3, grid=grid, steps=5, n_targets=2
    )
    x, y = data.tensors
    right = h(x).argmax(1) == y
    assert calib.n_robust == int(right.sum()) and calib.n_clean_wrong == int((~right).sum())
    assert calib.n_examples == len(y) and len(calib.grid) == len(grid)
    for point in calib.grid:
        mapped = nuts_map(h(x[right]), 3, point.s, point.p, point.c)
        assert kept_against_worst_g(mapped, y[right], point.alpha * (1 + 1e-5)) >= beta / 100
        assert kept_against_worst_g(mapped, y[right], point.alpha * (1 - 1e-3)) < beta / 100
        # The objective: h's clean mistakes that the mix still makes with a perfect hard g.
        mapped_wrong = nuts_map(h(x[~right]), 3, point.s, point.p, point.c)
        oracle = 100.0 * F.one_hot(y[~right], 5).float()
        still_wrong = mix(oracle, mapped_wrong, point.alpha).argmax(1) != y[~right]
        assert point.objective == pytest.approx(still_wrong.double().mean().item())
    best = min(p.objective for p in calib.grid)
    assert any(p.objective > best for p in calib.grid)  # the grid choice mattered
    # The least objective wins; among ties the largest q, i.e. the most weight on g.
    assert calib.chosen.objective == best and calib.params.alpha == calib.chosen.alpha
    assert calib.chosen.q == max(p.q for p in calib.grid if p.objective == best)


def test_calibration_refuses_test_and_training_data(digit_models):
    splits, g, h = digit_models
    kwargs = dict(eps=0.1, steps=1, n_targets=2)
    for data in (
        as_loader(splits.test, 64),
        DataLoader(Subset(splits.test, range(10)), 8),
        ConcatDataset([splits.calibration, splits.test]),
    ):
        with pytest.raises(ValueError, match="refusing the test split"):
            calibrate_mixednuts(g, h, data, **kwargs)
    with pytest.raises(ValueError, match="refusing the \\['train'\\] split"):
        calibrate_mixednuts(g, h, as_loader(splits.train, 64), **kwargs)
    with pytest.raises(ValueError, match="beta"):
        calibrate_mixednuts(g, h, as_loader(splits.calibration, 64), beta=0, **kwargs)


def test_surrogate_gradients_reach_adversarial_examples_the_hard_map_hides(digit_models):
    """Hard g and a steep, saturating map: the true classifier's input gradient is exactly 0,
    so end-to-end APGD is stuck; the identity surrogate's gradient finds adversarial inputs,
    and they fool the true classifier."""
    splits, g, h = digit_models
    x, y = splits.calibration.tensors[0][:96], splits.calibration.tensors[1][:96]
    mixed = mixednuts_classifier(
        g, h, NutsParams(k=4, s=50.0, p=4.0, c=0.0, alpha=0.6, hard_g=True)
    )
    keep = mixed(x).argmax(1) == y
    x, y = x[keep], y[keep]

    def input_grad(model):
        x_ = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_), y, reduction="sum"), x_)
        return grad.flatten(1).abs().amax(1)

    dead = input_grad(mixed) == 0
    assert dead.float().mean() > 0.5  # masked on most inputs
    x, y = x[dead], y[dead]
    sur = surrogate(mixed, "identity")
    assert (input_grad(sur) > 0).all()

    budget = dict(eps=0.3, steps=10, loss="ce", seed=0)
    end_to_end = APGD(**budget)(mixed, x, y)
    via_surrogate = APGD(target=sur, **budget)(mixed, x, y)
    fooled_e2e = (mixed(end_to_end).argmax(1) != y).sum().item()
    fooled_sur = (mixed(via_surrogate).argmax(1) != y).sum().item()
    assert (via_surrogate - x).abs().amax() <= 0.3 + 1e-6
    assert fooled_sur >= max(5, 3 * fooled_e2e), (fooled_sur, fooled_e2e)


def test_soft_surrogate_replaces_hard_g_and_flattens_small_powers(digit_models):
    _, g, h = digit_models
    mixed = mixednuts_classifier(g, h, NutsParams(4, 2.0, 0.5, -0.5, 0.8, hard_g=True))
    soft = surrogate(mixed, "soft")
    assert soft.std_model is g and isinstance(soft.rob_model, MappedModel)
    assert (soft.rob_model.p, soft.rob_model.s, soft.alpha.item()) == (1.0, 2.0, pytest.approx(0.8))
    assert surrogate(mixed, "identity").rob_model is h
    with pytest.raises(ValueError, match="kind"):
        surrogate(mixed, "hard")
    assert isinstance(mixed.std_model, HardPrediction)


def test_evaluate_mixednuts_cascades_autoattack_then_surrogates(digit_models):
    splits, g, h = digit_models
    mixed = mixednuts_classifier(g, h, NutsParams(4, 1.0, 2.0, 0.0, 0.7, hard_g=True))
    loader = as_loader(Subset(splits.test, range(24)), 24)
    table = evaluate_mixednuts(
        mixed, loader, eps=0.2, steps=3, n_targets=2, square_queries=10, progress=False
    )
    names = [row.attack for row in table.rows]
    assert names[1].startswith("APGD-CE") and names[4].startswith("SQUARE")
    assert sum("soft surrogate" in n for n in names) == 2
    assert sum("identity surrogate" in n for n in names) == 2
    assert {row.backend for row in table.rows[5:-1]} == {"adasmooth"}
    assert table.rows[1].backend in ("autoattack", "torchattacks")
    accuracies = [row.accuracy for row in table.rows]
    assert accuracies == sorted(accuracies, reverse=True)  # cumulative


def test_compare_on_digits_rows_and_plot(digit_models, tmp_path):
    splits, g, h = digit_models
    rows = compare_on_digits(
        g,
        h,
        splits,
        eps=0.2,
        alphas=(0.5,),
        grid=[(1.0, 1.0, 0.0), (2.0, 2.0, -0.5)],
        beta=90.0,
        steps=3,
        n_targets=2,
        square_queries=10,
        limit=24,
    )
    methods = [row["method"] for row in rows]
    assert methods[:3] == ["g (standard)", "h (robust)", "fixed α=0.5"]
    assert methods[3].startswith("MixedNUTS (s=")
    for row in rows:
        assert 0 <= row["adaptive"] <= row["autoattack"] <= row["clean"] <= 1
        assert row["backend"]
    assert "surrogate" in rows[3]["attacks"] and 0.5 <= rows[3]["alpha"] <= 1
    fig = plot_comparison(rows, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 0 and fig.axes
