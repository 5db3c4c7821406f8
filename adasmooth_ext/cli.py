"""``python -m adasmooth_ext`` / ``adasmooth``: the command line.

``demo`` mixes two small classifiers trained on scikit-learn's bundled digits: an accurate one
(``g``) and a noise-trained one (``h``), and shows the clean-vs-attacked trade-off of the mix
as ``α`` moves from ``g`` to ``h``.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

from . import build_info, mix


def _digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as [N, 64] pixels in [0, 1], split 75/25 with a fixed permutation."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def _train(x: Tensor, y: Tensor, noise: float, seed: int, epochs: int = 60) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(128):
            inputs = x[idx] + noise * torch.randn_like(x[idx])
            loss = F.cross_entropy(model(inputs), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


def _fgsm(g: nn.Module, h: nn.Module, alpha: float, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """One signed-gradient step through the whole mixed classifier (white box)."""
    x = x.clone().requires_grad_(True)
    loss = F.nll_loss(mix(g(x), h(x), alpha), y)
    (grad,) = torch.autograd.grad(loss, x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def demo(args: argparse.Namespace) -> None:
    x_train, y_train, x_test, y_test = _digits(args.seed)
    g = _train(x_train, y_train, noise=0.0, seed=args.seed)
    h = _train(x_train, y_train, noise=args.noise, seed=args.seed + 1)
    print(f"adasmooth {build_info()['version']}: digits, {len(y_test)} test images, eps={args.eps}")
    print("| alpha | clean acc | FGSM acc |")
    print("|------:|----------:|---------:|")
    rows = []
    for alpha in args.alphas:
        with torch.no_grad():
            clean = (mix(g(x_test), h(x_test), alpha).argmax(1) == y_test).float().mean().item()
        x_adv = _fgsm(g, h, alpha, x_test, y_test, args.eps)
        with torch.no_grad():
            robust = (mix(g(x_adv), h(x_adv), alpha).argmax(1) == y_test).float().mean().item()
        rows.append({"alpha": alpha, "clean": clean, "fgsm": robust})
        print(f"| {alpha:5.2f} | {100 * clean:8.2f}% | {100 * robust:7.2f}% |")
    if args.json:
        print(json.dumps(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adasmooth", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="mix two small digit classifiers")
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.add_argument("--noise", type=float, default=0.5, help="h's training noise std")
    demo_parser.add_argument("--eps", type=float, default=0.1, help="FGSM l-inf radius")
    demo_parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    demo_parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    demo_parser.set_defaults(run=demo)
    commands.add_parser("info", help="print build info").set_defaults(
        run=lambda _: print(json.dumps(build_info()))
    )
    args = parser.parse_args(argv)
    args.run(args)
