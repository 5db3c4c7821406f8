"""``python -m adasmooth_ext`` / ``adasmooth``: train, mix, attack and certify from the shell.

Every command writes into one run folder (``--out``, default ``runs/<command>-<time>``):
checkpoints (safetensors), tables (Markdown and JSON), plots and metrics. ``demo`` runs the
whole job on the bundled digits: it trains ``g`` and an adversarially trained ``h``, sweeps
fixed ``α``, trains the policy and evaluates everything end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from scipy.stats import binomtest
from torch import nn

from . import MixedClassifier, build_info
from .attacks import (
    PGD,
    EvalTable,
    ExternalAttack,
    autoattack,
    autoattack_backend,
    evaluate,
    policy_audit_attacks,
)
from .certify import plot_certified_accuracy, smoothed_certify, smoothing_curves
from .checkpoint import CheckpointError, load_checkpoint
from .data import Splits, as_loader, cifar10, cifar100, digits
from .mixednuts import compare_on_digits, plot_comparison
from .models import SMALL_CNN_TAPS, load_small_cnn, save_small_cnn, small_cnn
from .policy import PolicyNetwork
from .train_base import METHODS, train_classifier
from .training import CHECKPOINT_KIND, SETTINGS, PolicyTrainer, TrainConfig

# ---------------------------------------------------------------------------------------------
# Shared pieces


def _splits(args: argparse.Namespace) -> Splits:
    if args.data == "digits":
        return digits()
    if args.data_root is None:
        raise ValueError(f"--data {args.data} needs --data-root, the folder holding the dataset")
    return (cifar10 if args.data == "cifar10" else cifar100)(args.data_root)


def _run_dir(args: argparse.Namespace) -> Path:
    if args.out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = os.path.join("runs", f"{args.command}-{stamp}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _say(args: argparse.Namespace, *text: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*text, flush=True)


def load_policy(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """The policy of a :class:`PolicyTrainer` checkpoint, and the ``MixedClassifier`` keyword
    arguments it was trained with (``alpha_range``, ``std_scale``, ``rob_scale``)."""
    state = load_checkpoint(
        path, CHECKPOINT_KIND, required=("policy_config", "policy", "mixing"), device=device
    )
    policy = PolicyNetwork(**state["policy_config"])
    try:
        policy.load_state_dict(state["policy"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit its config ({err})") from None
    mixing = {k: v for k, v in state["mixing"].items() if k != "alpha"}
    return policy.to(device).eval(), mixing


def _scales(args: argparse.Namespace, trained: dict | None = None) -> dict[str, float]:
    """``std_scale`` and ``rob_scale`` of a mix: a trained policy's own (the flags may only
    repeat them: a policy is trained for its temperatures), else the flags' (default 1)."""
    flags = {name: getattr(args, name, None) for name in ("std_scale", "rob_scale")}
    if trained is None:
        return {name: 1.0 if value is None else value for name, value in flags.items()}
    for name, value in flags.items():
        if value is not None and value != trained[name]:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} {value}: the policy was trained with {name} = {trained[name]}; "
                "leave the flag out"
            )
    return {name: trained[name] for name in flags}


def _adaptive(args: argparse.Namespace, g: nn.Module, h: nn.Module) -> MixedClassifier:
    """The adaptive mix of ``--policy``, with the α range and temperatures it was trained for."""
    policy, mixing = load_policy(args.policy, args.device)
    _scales(args, mixing)  # flags may only repeat the policy's temperatures
    return MixedClassifier(g, h, policy=policy, **mixing)


def _mixed(args: argparse.Namespace, g: nn.Module, h: nn.Module) -> MixedClassifier:
    if args.policy is not None:
        return _adaptive(args, g, h)
    return MixedClassifier(g, h, alpha=args.alpha, **_scales(args))


def _wilson(correct: int, total: int) -> tuple[float, float]:
    ci = binomtest(correct, total).proportion_ci(0.95, method="wilson")
    return ci.low, ci.high


def _cell(correct: int, total: int) -> str:
    lo, hi = _wilson(correct, total)
    return f"{100 * correct / total:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _save_table(out: Path, name: str, table: EvalTable) -> None:
    (out / f"{name}.md").write_text(table.to_markdown() + "\n")
    (out / f"{name}.json").write_text(json.dumps(table.to_dicts(), indent=1))


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}"


# ---------------------------------------------------------------------------------------------
# Commands


def train_base(args: argparse.Namespace) -> Path:
    """Train a small CNN (standard, PGD or TRADES) and report its test accuracy."""
    out, splits = _run_dir(args), _splits(args)
    torch.manual_seed(args.seed)
    config = dict(
        num_classes=splits.num_classes, in_channels=splits.input_shape[0], width=args.width
    )
    model = small_cnn(**config)
    loader = as_loader(splits.train, args.batch_size, shuffle=True, seed=args.seed)
    train_classifier(
        model,
        loader,
        method=args.method,
        epochs=args.epochs,
        lr=args.lr,
        eps=args.eps,
        steps=args.steps,
        device=args.device,
        progress=args.progress,
    )
    path = out / "model.safetensors"
    save_small_cnn(path, model, config)
    attacks = [PGD(eps=args.eps, steps=20)] if args.eps > 0 else []
    table = evaluate(model, as_loader(splits.test, 256), attacks, progress=args.progress)
    _save_table(out, "test", table)
    _say(args, f"saved {path}\n{table}")
    return path


def train_policy(args: argparse.Namespace) -> Path:
    """Train the adaptive policy of a mix of two saved base models."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    out, splits = _run_dir(args), _splits(args)
    g, h = load_small_cnn(args.std, args.device), load_small_cnn(args.rob, args.device)
    torch.manual_seed(args.seed)
    example = torch.stack([splits.train[i][0] for i in range(2)]).to(args.device)
    policy = PolicyNetwork.from_models(
        g, h, example, args.layers, width=args.policy_width, blocks=tuple(args.policy_blocks)
    ).to(args.device)
    mixed = MixedClassifier(g, h, policy=policy, alpha_range=args.alpha_range, **_scales(args))
    config = TrainConfig(
        setting=args.setting,
        eps=tuple(args.eps_range),
        steps=tuple(args.steps_range),
        w=tuple(args.w_range),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        bf16=args.bf16,
        val_eps=args.val_eps,
        accumulate=args.accumulate,
        seed=args.seed,
    )
    trainer = PolicyTrainer(
        mixed, splits.train, splits.calibration, config, out, args.device, args.progress
    )
    rows = trainer.fit(resume=args.resume)
    for row in rows:
        _say(
            args,
            json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
        )
    _say(args, f"saved {trainer.checkpoint_path}")
    if distributed:
        torch.distributed.destroy_process_group()
    return trainer.checkpoint_path


def evaluate_cmd(args: argparse.Namespace) -> EvalTable:
    """Clean, PGD and (optionally adaptive) AutoAttack accuracy of a model or a mix; with
    ``--audit``, also a wider net of attacks on a policy's mix (each attack and the per-sample
    worst case), to check that its robustness is not gradient masking."""
    if args.audit and args.policy is None:
        raise ValueError("--audit attacks a policy: give --policy")
    out, splits = _run_dir(args), _splits(args)
    g = load_small_cnn(args.std, args.device)
    model = g if args.rob is None else _mixed(args, g, load_small_cnn(args.rob, args.device))
    loader = as_loader(_subset(splits.test, args.limit), args.batch_size)
    attacks = [PGD(eps=args.eps, steps=args.pgd_steps)]
    table = evaluate(model, loader, attacks, progress=args.progress)
    _save_table(out, "pgd", table)
    _say(args, table.to_markdown())
    has_policy = getattr(model, "policy", None) is not None
    if args.autoattack:
        aa = _autoattack(args, model, loader, args.adaptive_w if has_policy else None)
        _save_table(out, "autoattack", aa)
        _say(args, aa.to_markdown())
    if args.audit:
        attacks = policy_audit_attacks(eps=args.eps, steps=args.aa_steps, seed=args.seed)
        audit = evaluate(model, loader, attacks, progress=args.progress)
        _save_table(out, "audit", audit)
        _say(args, audit.to_markdown())
    return table


def certify_cmd(args: argparse.Namespace) -> Path:
    """Randomized-smoothing certificates of ``h`` and of its fixed-α mixes (ℓ2, Theorem 3.7)."""
    out, splits = _run_dir(args), _splits(args)
    h = load_small_cnn(args.rob, args.device)
    x, y = _stack(_subset(splits.test, args.limit))
    cert = smoothed_certify(
        h, x.to(args.device), args.sigma, n=args.n, batch_size=args.n, progress=args.progress
    )
    radii = torch.linspace(0, args.max_radius, 41)
    curves = smoothing_curves(cert, y, radii, args.alphas)
    path = plot_certified_accuracy(radii, curves, out / "certified.png")
    (out / "certified.json").write_text(
        json.dumps({"radii": radii.tolist(), **{k: v.tolist() for k, v in curves.items()}})
    )
    for label, acc in curves.items():
        _say(args, f"{label}: certified accuracy {100 * acc[0]:.1f}% at r > 0")
    _say(args, f"saved {path}")
    return path


def sweep(args: argparse.Namespace) -> list[dict]:
    """Clean vs robust accuracy of fixed-α mixes (the paper's Figure 4)."""
    out, splits = _run_dir(args), _splits(args)
    g, h = load_small_cnn(args.std, args.device), load_small_cnn(args.rob, args.device)
    loader = as_loader(_subset(splits.test, args.limit), args.batch_size)
    rows = _sweep(args, g, h, loader, args.alphas)
    _plot_tradeoff(rows, out / "sweep.png", f"fixed-α mixes, {rows[0]['attack']}")
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    for row in rows:
        _say(args, f"α = {row['alpha']:.2f}: clean {row['clean']:.3f}, robust {row['robust']:.3f}")
    return rows


def compare(args: argparse.Namespace) -> list[dict]:
    """MixedNUTS vs fixed-α smoothing vs the adaptive policy, on the same g and h: one table
    (AutoAttack standard, then each method's adaptive or surrogate-gradient attacks) and one
    clean-vs-robust plot. MixedNUTS is calibrated on the calibration split, never the test one."""
    out, splits = _run_dir(args), _splits(args)
    g, h = load_small_cnn(args.std, args.device), load_small_cnn(args.rob, args.device)
    adaptive = None if args.policy is None else _adaptive(args, g, h)
    scales = _scales(args) if adaptive is None else _scales(args, adaptive.mixing_config())
    rows = compare_on_digits(
        g, h, splits, eps=args.eps, alphas=args.alphas, adaptive=adaptive, **scales,
        adaptive_w=args.adaptive_w, steps=args.aa_steps, square_queries=args.square_queries,
        limit=args.limit, batch_size=args.batch_size, seed=args.seed, device=args.device,
        progress=args.progress,
    )  # fmt: skip
    lines = ["| method | α | clean | AutoAttack | worst case (adaptive / surrogate) | backend |"]
    lines.append("|---|---:|---:|---:|---:|---|")
    for row in rows:
        alpha = "policy" if row["method"] == "adaptive policy" else row["alpha"]
        alpha = "–" if alpha is None else alpha if isinstance(alpha, str) else f"{alpha:.3f}"
        lines.append(
            f"| {row['method']} | {alpha} | {100 * row['clean']:.1f} | "
            f"{100 * row['autoattack']:.1f} | {100 * row['adaptive']:.1f} | {row['backend']} |"
        )
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    plot_comparison(rows, out / "compare.png")
    _say(args, "\n".join([*lines, f"saved {out / 'compare.png'}"]))
    return rows


# ---------------------------------------------------------------------------------------------
# The demo


def demo(args: argparse.Namespace) -> dict:
    """The whole job on digits; prints the table and whether the acceptance criteria hold."""
    start = time.time()
    out, splits = _run_dir(args), _splits(args)
    device, seed = args.device, args.seed
    loader = as_loader(splits.train, 64, shuffle=True, seed=seed)
    test = as_loader(_subset(splits.test, args.limit), 512)
    config = dict(num_classes=splits.num_classes, in_channels=splits.input_shape[0], width=16)
    rob_config = config | {"width": args.rob_width}
    _say(args, f"adasmooth {build_info()['version']} demo: {args.data}, ε = {args.eps} (ℓ∞)")

    torch.manual_seed(seed)
    g = train_classifier(small_cnn(**config), loader, epochs=args.epochs, device=device,
                         progress=args.progress)  # fmt: skip
    torch.manual_seed(seed + 1)
    h = train_classifier(small_cnn(**rob_config), loader, method=args.rob_method, eps=args.eps,
                         epochs=args.epochs, device=device, progress=args.progress)  # fmt: skip
    save_small_cnn(out / "g.safetensors", g, config)
    save_small_cnn(out / "h.safetensors", h, rob_config)

    rows = _sweep(args, g, h, test, args.alphas)
    _plot_tradeoff(rows, out / "sweep.png", f"fixed-α mixes, {rows[0]['attack']}")

    torch.manual_seed(seed + 2)
    example = torch.stack([splits.train[i][0] for i in range(2)]).to(device)
    policy = PolicyNetwork.from_models(g, h, example, SMALL_CNN_TAPS, width=args.policy_width)
    scales = _scales(args)
    mixed = MixedClassifier(g, h, policy=policy.to(device), alpha_range=args.alpha_range, **scales)
    config_p = TrainConfig(
        setting=args.setting,
        eps=(0.5 * args.eps, 1.25 * args.eps),
        steps=(3, 10),
        w=(0.0, 0.5),
        epochs=args.policy_epochs,
        batch_size=64,
        lr=args.policy_lr,
        val_eps=args.eps,
        seed=seed,
    )
    PolicyTrainer(
        mixed, splits.train, splits.calibration, config_p, out, device, args.progress
    ).fit()

    models = {"g": g, "h": h}
    models |= {f"mix α={a:g}": MixedClassifier(g, h, alpha=a, **scales) for a in args.table_alphas}
    models["adaptive mix"] = mixed
    results = {}
    for name, model in models.items():
        table = evaluate(model, test, [PGD(eps=args.eps, steps=20)], progress=False)
        adaptive = args.adaptive_w if model is mixed else None
        aa = _autoattack(args, model, test, adaptive)
        results[name] = _summary(table, aa)
        _say(args, f"{name}: " + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in results[name].items()))
    verdict = _acceptance(results, rows)
    report = _demo_report(args, results, verdict, time.time() - start)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"results": results, "verdict": verdict}))
    _plot_tradeoff(rows, out / "tradeoff.png", "digits demo", results)
    _say(args, report)
    return {"results": results, "verdict": verdict}


def _summary(pgd: EvalTable, aa: EvalTable) -> dict[str, tuple[int, int]]:
    """(correct, total) per column: clean, PGD-20, AutoAttack standard, adaptive AutoAttack."""
    standard = aa.rows[len(ExternalAttack.KINDS)]  # cascaded: after clean and the standard four
    cols = {"clean": pgd["clean"], "pgd20": pgd.rows[1], "aa": standard}
    cols["aa_adaptive"] = aa.rows[-1]  # the worst case
    return {k: (r.correct, r.total) for k, r in cols.items()}


def _acceptance(results: dict, sweep_rows: list[dict]) -> dict[str, bool]:
    """The issue's claims, judged on the adaptive mix's worst (adaptive) AutoAttack accuracy;
    the last against the fixed-α mixes twice: the PGD-20 sweep, and the table's AutoAttack
    rows (where the fixed mixes face the standard AutoAttack only, a weaker test for them)."""

    def acc(name: str, col: str) -> float:
        correct, total = results[name][col]
        return correct / total

    clean_g, clean_h, clean_a = acc("g", "clean"), acc("h", "clean"), acc("adaptive mix", "clean")
    robust_h, robust_a = acc("h", "aa"), acc("adaptive mix", "aa_adaptive")
    pgd_a = acc("adaptive mix", "pgd20")
    rivals = [r["clean"] for r in sweep_rows if r["robust"] >= pgd_a]
    fixed = [name for name in results if name.startswith("mix α=")]
    rivals += [acc(name, "clean") for name in fixed if acc(name, "aa") >= robust_a]
    return {
        "h is at least 5 points less accurate than g": clean_g - clean_h >= 0.05,
        "closes at least half of the clean gap from h to g": clean_a - clean_h
        >= 0.5 * (clean_g - clean_h),
        "keeps at least 85% of h's AutoAttack accuracy": robust_a >= 0.85 * robust_h,
        "at least as accurate as every fixed-α mix at least as robust (PGD-20 sweep, "
        "AutoAttack rows)": all(clean_a >= c for c in rivals),
    }


def _demo_report(args, results: dict, verdict: dict, seconds: float) -> str:
    n = next(iter(results.values()))["clean"][1]
    backend = autoattack_backend()
    full = (args.aa_steps, args.square_queries) == (100, 5000)
    standard = "the standard version" if full else "reduced: the standard version has 100, 5000"
    lines = [
        f"digits test split ({n} images), ℓ∞ ε = {args.eps}; temperatures s_g = "
        f"{args.std_scale:g}, s_h = {args.rob_scale:g}; the policy's α in "
        f"[{args.alpha_range[0]:g}, {args.alpha_range[1]:g}]; accuracy % with 95% Wilson "
        "intervals. PGD-20: white box, end to end (adasmooth). AutoAttack: APGD-CE, APGD-T "
        f"(9 targets), FAB-T, Square ({backend}), cascaded, end to end, with {args.aa_steps} "
        f"steps and {args.square_queries} queries ({standard}). "
        "Adaptive AutoAttack: that, then APGD-CE and APGD-T with the term −γ (w = "
        f"{args.adaptive_w}) through the policy (adasmooth), cascaded.",
        "",
        "| model | clean | PGD-20 | AutoAttack | adaptive AutoAttack |",
        "|---|---|---|---|---|",
    ]
    for name, cols in results.items():
        cells = [_cell(*cols[k]) for k in ("clean", "pgd20", "aa", "aa_adaptive")]
        if name != "adaptive mix":
            cells[-1] = "–"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Acceptance:"]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {claim}" for claim, ok in verdict.items()]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += ["", f"{when}; {_machine()}; {seconds / 60:.1f} min."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Helpers of several commands


def _autoattack(args, model: nn.Module, loader, adaptive_w: float | None) -> EvalTable:
    return autoattack(
        model,
        loader,
        eps=args.eps,
        adaptive_w=adaptive_w,
        steps=args.aa_steps,
        square_queries=args.square_queries,
        progress=args.progress,
    )


def _sweep(args, g: nn.Module, h: nn.Module, loader, alphas: Sequence[float]) -> list[dict]:
    rows, scales = [], _scales(args)
    for alpha in alphas:
        model = MixedClassifier(g, h, alpha=alpha, **scales)
        attack = PGD(eps=args.eps, steps=20)
        table = evaluate(model, loader, [attack], progress=False)
        rows.append(
            dict(
                alpha=alpha,
                clean=table["clean"].accuracy,
                robust=table.rows[1].accuracy,
                attack=f"{attack.name}, {attack.backend}",
            )
        )
    return rows


def _plot_tradeoff(rows: list[dict], path: Path, title: str, points: dict | None = None) -> Path:
    """Clean vs robust accuracy of the fixed-α mixes, with named models (AutoAttack) on top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([100 * r["robust"] for r in rows], [100 * r["clean"] for r in rows], "o-",
            label="fixed α, PGD-20")  # fmt: skip
    for r in rows:
        ax.annotate(f"{r['alpha']:g}", (100 * r["robust"], 100 * r["clean"]), fontsize=7)
    for name, cols in (points or {}).items():
        (rc, n), (cc, _) = cols["aa_adaptive"], cols["clean"]
        ax.plot(100 * rc / n, 100 * cc / n, "*" if name == "adaptive mix" else "s", ms=9,
                label=f"{name} (AutoAttack)")  # fmt: skip
        if name == "adaptive mix":  # on the sweep's own scale too
            ax.plot(100 * cols["pgd20"][0] / n, 100 * cc / n, "*", ms=11, mfc="none",
                    label=f"{name} (PGD-20)")  # fmt: skip
    ax.set(xlabel="robust accuracy (%)", ylabel="clean accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path


def _subset(dataset, limit: int | None):
    if limit is None or limit >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, range(limit))


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(x), torch.as_tensor(y)


# ---------------------------------------------------------------------------------------------
# Arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adasmooth", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", choices=("digits", "cifar10", "cifar100"), default="digits")
    common.add_argument("--data-root", help="folder holding the CIFAR dataset folder")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--out", help="run folder (default runs/<command>-<time>)")
    common.add_argument("--no-progress", dest="progress", action="store_false")
    models = argparse.ArgumentParser(add_help=False)
    models.add_argument("--std", required=True, help="g: a small-cnn checkpoint")
    models.add_argument("--rob", help="h: a small-cnn checkpoint")
    budget = argparse.ArgumentParser(add_help=False)
    budget.add_argument("--eps", type=float, default=0.2, help="ℓ∞ radius of the attacks")
    budget.add_argument("--limit", type=int, help="only the first LIMIT test images")
    budget.add_argument("--batch-size", type=int, default=512)
    aa = argparse.ArgumentParser(add_help=False)
    aa.add_argument("--aa-steps", type=int, default=100, help="APGD/FAB steps (100: standard)")
    aa.add_argument("--square-queries", type=int, default=5000, help="5000: standard")
    aa.add_argument("--adaptive-w", type=float, default=0.5, help="weight of the α term")

    def temperatures(std: float | None = None, rob: float | None = None):
        """A parent parser of its own (parents share their actions, hence their defaults)."""
        temps = argparse.ArgumentParser(add_help=False)
        temps.add_argument("--std-scale", type=float, default=std, help=f"s_g (default {std or 1})")
        temps.add_argument("--rob-scale", type=float, default=rob, help=f"s_h (default {rob or 1})")
        return temps

    temps = temperatures()

    def add(name, run, parents, help):
        sub = commands.add_parser(name, parents=parents, help=help, description=run.__doc__)
        sub.set_defaults(run=run)
        return sub

    demo_temps = temperatures(std=0.5, rob=2.0)
    sub = add("demo", demo, [common, aa, demo_temps], "the whole job, with the acceptance check")
    sub.add_argument("--eps", type=float, default=0.2, help="ℓ∞ radius of h's training and attacks")
    sub.add_argument("--rob-method", choices=METHODS[1:], default="trades", help="h's training")
    sub.add_argument("--epochs", type=int, default=30, help="epochs of g and h")
    sub.add_argument("--rob-width", type=int, default=4, help="width of h (g has 16)")
    sub.add_argument("--policy-lr", type=float, default=1e-2)
    sub.add_argument("--policy-epochs", type=int, default=12)
    sub.add_argument("--policy-width", type=int, default=16)
    sub.add_argument("--setting", choices=SETTINGS, default="B")
    sub.add_argument("--alpha-range", type=float, nargs=2, default=(0.6, 1.0), metavar=("LO", "HI"))
    sub.add_argument("--alphas", type=float, nargs="+", default=[i / 10 for i in range(11)])
    sub.add_argument("--table-alphas", type=float, nargs="+", default=[0.6, 0.8, 0.9])
    sub.add_argument("--limit", type=int, help="only the first LIMIT test images")

    sub = add("train-base", train_base, [common], "train g (standard) or h (PGD, TRADES)")
    sub.add_argument("--method", choices=METHODS, default="standard")
    sub.add_argument("--eps", type=float, default=0.0, help="ℓ∞ training radius (pgd, trades)")
    sub.add_argument("--steps", type=int, default=7, help="attack steps per training batch")
    sub.add_argument("--epochs", type=int, default=30)
    sub.add_argument("--width", type=int, default=16)
    sub.add_argument("--batch-size", type=int, default=64)
    sub.add_argument("--lr", type=float, default=3e-3)

    sub = add("train-policy", train_policy, [common, models, temps], "train the adaptive policy")
    sub.add_argument("--setting", choices=SETTINGS, default="B")
    sub.add_argument("--eps-range", type=float, nargs=2, default=(0.1, 0.25), metavar=("LO", "HI"))
    sub.add_argument("--steps-range", type=int, nargs=2, default=(3, 10), metavar=("LO", "HI"))
    sub.add_argument("--w-range", type=float, nargs=2, default=(0.0, 0.5), metavar=("LO", "HI"))
    sub.add_argument("--val-eps", type=float, default=0.2)
    sub.add_argument("--epochs", type=int, default=12)
    sub.add_argument("--batch-size", type=int, default=64, help="global batch")
    sub.add_argument("--accumulate", type=int, default=1, help="micro-batches per batch")
    sub.add_argument("--lr", type=float, default=2e-3)
    sub.add_argument("--bf16", action="store_true", help="bf16 autocast")
    sub.add_argument("--layers", nargs=2, default=list(SMALL_CNN_TAPS), help="tapped layers")
    sub.add_argument("--policy-width", type=int, default=16)
    sub.add_argument("--policy-blocks", type=int, nargs=2, default=(1, 1))
    sub.add_argument("--alpha-range", type=float, nargs=2, default=None, metavar=("LO", "HI"))
    sub.add_argument("--resume", help="a policy.safetensors checkpoint to continue from")

    sub = add(
        "evaluate", evaluate_cmd, [common, models, budget, aa, temps], "attack a model or a mix"
    )
    weight = sub.add_mutually_exclusive_group()
    weight.add_argument("--policy", help="a policy.safetensors checkpoint (adaptive mix)")
    weight.add_argument("--alpha", type=float, default=0.5, help="a fixed α")
    sub.add_argument("--pgd-steps", type=int, default=20)
    sub.add_argument("--autoattack", action="store_true", help="also AutoAttack (+ adaptive)")
    sub.add_argument("--audit", action="store_true", help="also 14 attacks on the policy's mix")

    sub = add("certify", certify_cmd, [common], "randomized-smoothing certificates of h's mixes")
    sub.add_argument("--rob", required=True, help="h: a small-cnn checkpoint")
    sub.add_argument("--sigma", type=float, default=0.25)
    sub.add_argument("--n", type=int, default=1000, help="Monte Carlo samples per image")
    sub.add_argument("--alphas", type=float, nargs="+", default=[0.6, 0.8, 0.9])
    sub.add_argument("--max-radius", type=float, default=1.0)
    sub.add_argument("--limit", type=int, default=100, help="only the first LIMIT test images")

    sub = add(
        "compare", compare, [common, models, budget, aa, temps], "MixedNUTS vs fixed α vs policy"
    )
    sub.add_argument("--policy", help="a policy.safetensors checkpoint (adds the adaptive mix)")
    sub.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.75, 0.9])

    sub = add(
        "sweep", sweep, [common, models, budget, temps], "fixed-α clean vs robust trade-off plot"
    )
    sub.add_argument("--alphas", type=float, nargs="+", default=[i / 10 for i in range(11)])

    info = commands.add_parser("info", help="print build info")
    info.set_defaults(run=lambda _: print(json.dumps(build_info())))
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "rob", "") is None and args.command in ("sweep", "compare"):
        parser.error(f"{args.command} needs --rob")
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"adasmooth {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
