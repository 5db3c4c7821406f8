"""Training the policy of an adaptive mix (DESIGN.md §3, paper §4.3): :class:`PolicyTrainer`.

Each step attacks the batch on the fly, with a radius, a step count and an adaptive-term weight
``w`` drawn at random (so the policy does not overfit one attack), in one threat setting:

- ``"A"``: gray-box PGD (gradients of ``g`` and ``h``, ``α`` held constant);
- ``"B"``: white-box PGD, end to end through the policy;
- ``"C"``: APGD-CE, then targeted APGD-DLR on the samples it left unbroken.

The policy then learns from the clean and the attacked inputs together with the composite loss
``c1·CE(z, y) + c2·BCE(γ, α̃) + c3·CE·BCE`` (:func:`composite_loss`), the pseudo-label ``α̃``
being 0 for clean and 1 for attacked inputs. The base models stay frozen and in eval mode.

**Reproducibility.** Every random choice of a step (the attack's budget, its random start) is
seeded by ``(seed, step, shard)``, and the batches come from a seeded ``DistributedSampler``;
checkpoints (safetensors, atomic) hold the policy, optimizer, scheduler, RNG states and
position, so a resumed run reproduces an uninterrupted one. **Multi-process**: under
``torchrun`` (after ``torch.distributed.init_process_group``) the policy trains with DDP, each
process on its shard of every global batch. BatchNorm normalises per process, as DDP does; its
running statistics are averaged over processes after each step. ``accumulate = k`` splits each
batch into ``k`` interleaved micro-batches the same way, so one process with ``k = n`` computes
exactly what ``n`` processes do.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from .attacks import APGD, PGD
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import as_loader
from .mixed import MixedClassifier, MixedOutput

__all__ = ["SETTINGS", "PolicyTrainer", "TrainConfig", "composite_loss", "pseudo_labels"]

SETTINGS = ("A", "B", "C")
CHECKPOINT_KIND = "policy-trainer"
_STATE_KEYS = ("config", "policy_config", "mixing", "policy", "optimizer", "scheduler", "rng")


def pseudo_labels(clean: int, attacked: int, device: torch.device | str = "cpu") -> Tensor:
    """``α̃``: 0 for each of ``clean`` inputs (trust ``g``), then 1 for each attacked one."""
    return torch.cat([torch.zeros(clean, device=device), torch.ones(attacked, device=device)])


def composite_loss(
    logits: Tensor,
    gamma: Tensor,
    y: Tensor,
    alpha_target: Tensor,
    weights: tuple[float, float, float] = (0.5, 1.0, 0.1),
) -> Tensor:
    """Paper eq. 6, per sample then averaged: ``c1·CE(z, y) + c2·BCE(γ, α̃) + c3·CE·BCE``, with
    BCE-with-logits on ``γ`` (stable where ``σ(γ)`` rounds to 0 or 1)."""
    c1, c2, c3 = weights
    ce = F.cross_entropy(logits, y, reduction="none")
    bce = F.binary_cross_entropy_with_logits(gamma, alpha_target, reduction="none")
    return (c1 * ce + c2 * bce + c3 * ce * bce).mean()


@dataclass
class TrainConfig:
    """What a policy-training run does; saved in its checkpoints (JSON-able).

    ``eps``, ``steps`` and ``w`` are the ranges the training attack's radius, step count and
    adaptive-term weight are drawn from at each step. ``batch_size`` is the global batch (over
    all processes); ``warmup`` is the share of steps with a linear learning-rate warm-up
    before the cosine decay.
    """

    setting: str = "B"
    eps: tuple[float, float] = (0.05, 0.15)
    norm: str = "Linf"
    steps: tuple[int, int] = (5, 10)
    w: tuple[float, float] = (0.0, 0.5)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: float = 0.1
    loss_weights: tuple[float, float, float] = (0.5, 1.0, 0.1)
    clip_grad: float = 5.0
    bf16: bool = False
    val_eps: float = 0.1
    val_steps: int = 10
    accumulate: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("eps", "steps", "w", "loss_weights"):
            setattr(self, name, tuple(getattr(self, name)))
        problems = []
        if self.setting not in SETTINGS:
            problems.append(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        for name, lowest in (("eps", 0.0), ("steps", 1), ("w", 0.0)):
            lo, hi = getattr(self, name)
            if not lowest <= lo <= hi:
                problems.append(f"{name} must be a range ({lowest} <= lo <= hi), got {(lo, hi)}")
        if self.w[1] > 1:
            problems.append(f"w must lie in [0, 1], got {self.w}")
        if min(self.epochs, self.batch_size, self.accumulate, self.val_steps) < 1:
            problems.append("epochs, batch_size, accumulate and val_steps must be >= 1")
        if self.batch_size % self.accumulate:
            problems.append(
                f"batch_size {self.batch_size} must be a multiple of accumulate {self.accumulate}"
            )
        if not 0 <= self.warmup < 1:
            problems.append(f"warmup must be a share of the steps in [0, 1), got {self.warmup}")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))


class _Details(nn.Module):
    """The mix's full forward as a module's forward, so that DDP can wrap it."""

    def __init__(self, mixed: MixedClassifier) -> None:
        super().__init__()
        self.mixed = mixed

    def forward(self, x: Tensor) -> MixedOutput:
        return self.mixed.forward_details(x)


def _distributed() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class PolicyTrainer:
    """Trains ``mixed.policy`` (a :class:`MixedClassifier` with a policy) on ``train_set``.

    Args:
        mixed: the mix; its base models stay frozen, its ``alpha_range`` (if any) and
            temperatures apply in training as in evaluation, and are saved with the policy.
        train_set, val_set: datasets of ``(image, label)``; ``val_set`` (optional) gives the
            clean and PGD accuracy of the mix after each epoch.
        config: a :class:`TrainConfig`.
        out_dir: where ``policy.safetensors`` (the checkpoint) and ``metrics.csv`` go.
        device: where to train (``cuda:<local rank>`` under ``torchrun`` on GPUs).
        progress: tqdm progress bars (on the first process only).
    """

    def __init__(
        self,
        mixed: MixedClassifier,
        train_set: Dataset,
        val_set: Dataset | None,
        config: TrainConfig,
        out_dir: str | os.PathLike,
        device: torch.device | str = "cpu",
        progress: bool = True,
    ) -> None:
        if not isinstance(mixed, MixedClassifier) or mixed.policy is None:
            raise ValueError("PolicyTrainer needs a MixedClassifier with a policy")
        self.rank, self.world = _distributed()
        shards = self.world * config.accumulate
        if config.batch_size % shards:
            raise ValueError(
                f"batch_size {config.batch_size} must be a multiple of processes × accumulate "
                f"= {shards}"
            )
        self.config, self.device = config, torch.device(device)
        self.mixed = mixed.to(self.device)
        self.policy = mixed.policy
        self.out_dir = Path(out_dir)
        self.checkpoint_path = self.out_dir / "policy.safetensors"
        self.progress = progress and self.rank == 0
        # Same permutation for any number of processes: rank r takes every world-th sample.
        self.sampler = DistributedSampler(
            train_set,
            num_replicas=self.world,
            rank=self.rank,
            shuffle=True,
            seed=config.seed,
            drop_last=True,
        )
        local_batch = config.batch_size // self.world
        self.loader = DataLoader(train_set, local_batch, sampler=self.sampler, drop_last=True)
        if len(self.loader) == 0:
            raise ValueError(
                f"the training set ({len(train_set)} items) holds no full batch of "
                f"{config.batch_size}"
            )
        self.val_loader = None if val_set is None else as_loader(val_set, 256)
        self.net: nn.Module = _Details(mixed)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=ids, broadcast_buffers=False
            )
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.total_steps = config.epochs * len(self.loader)
        warmup = math.ceil(config.warmup * self.total_steps)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (
                1 + math.cos(math.pi * (step - warmup) / max(1, self.total_steps - warmup))
            )

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.epoch, self.step = 0, 0

    # -----------------------------------------------------------------------------------------
    # Checkpoints

    def state(self) -> dict:
        """Everything a resumed run needs, as a checkpoint state tree."""
        return {
            "config": dataclasses.asdict(self.config),
            "policy_config": getattr(self.policy, "config", {}),
            "mixing": self.mixed.mixing_config(),
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch,
            "step": self.step,
        }

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the checkpoint (first process only); returns its path."""
        path = Path(path or self.checkpoint_path)
        if self.rank == 0:
            save_checkpoint(path, self.state(), CHECKPOINT_KIND)
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Continue from a checkpoint of this trainer's policy (same architecture)."""
        state = load_checkpoint(
            path, CHECKPOINT_KIND, required=(*_STATE_KEYS, "epoch", "step"), device="cpu"
        )
        mine = getattr(self.policy, "config", {})
        if state["policy_config"] != mine:
            raise ValueError(
                f"{path} holds a policy built as {state['policy_config']}, not as {mine}"
            )
        if state["mixing"] != self.mixed.mixing_config():
            raise ValueError(
                f"{path} holds a policy trained to mix as {state['mixing']}, not as "
                f"{self.mixed.mixing_config()}"
            )
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.epoch, self.step = state["epoch"], state["step"]

    # -----------------------------------------------------------------------------------------
    # Training

    def fit(self, resume: str | os.PathLike | None = None, epochs: int | None = None) -> list[dict]:
        """Train up to ``config.epochs`` (from ``resume``, a checkpoint, if given), or only
        ``epochs`` more; after each epoch validate, log and save. Returns this call's rows."""
        if resume is not None:
            self.load(resume)
        stop = (
            self.config.epochs if epochs is None else min(self.config.epochs, self.epoch + epochs)
        )
        rows = []
        writer = self._tensorboard()
        while self.epoch < stop:
            self.sampler.set_epoch(self.epoch)
            losses = []
            bar = tqdm(
                self.loader, desc=f"policy epoch {self.epoch + 1}", disable=not self.progress
            )
            for x, y in bar:
                losses.append(self._train_step(x.to(self.device), y.to(self.device)))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            self.epoch += 1
            row = {"epoch": self.epoch, "step": self.step, "train_loss": sum(losses) / len(losses)}
            row["lr"] = self.scheduler.get_last_lr()[0]
            if self.rank == 0:
                row |= self.validate()
                self._log(row, writer)
                self.save()
            rows.append(row)
            if self.world > 1:
                dist.barrier()
        if writer is not None:
            writer.close()
        self.mixed.eval()
        return rows

    def _train_step(self, x: Tensor, y: Tensor) -> float:
        """One optimizer step on this process's shard of a global batch."""
        cfg = self.config
        budget = torch.Generator().manual_seed(_seed(cfg.seed, self.step))
        eps = cfg.eps[0] + (cfg.eps[1] - cfg.eps[0]) * torch.rand((), generator=budget).item()
        steps = int(torch.randint(cfg.steps[0], cfg.steps[1] + 1, (), generator=budget))
        w = cfg.w[0] + (cfg.w[1] - cfg.w[0]) * torch.rand((), generator=budget).item()
        buffers = list(self.policy.buffers())
        start = [b.clone() for b in buffers]
        ends = [torch.zeros_like(b, dtype=torch.float64) for b in buffers]
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(cfg.accumulate):
            shard = self.rank * cfg.accumulate + i
            xi, yi = x[i :: cfg.accumulate], y[i :: cfg.accumulate]
            for b, s in zip(buffers, start, strict=True):
                b.copy_(s)  # every shard starts from the step's statistics, as on n processes
            attack = self._attack(eps, steps, w, _seed(cfg.seed, self.step, shard))
            x_adv = attack(self.mixed.eval(), xi, yi)
            self.mixed.train()
            last = i == cfg.accumulate - 1
            sync = nullcontext() if last or self.world == 1 else self.net.no_sync()
            autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=cfg.bf16)
            with sync:
                with autocast:
                    out = self.net(torch.cat([xi, x_adv]))
                target = pseudo_labels(len(xi), len(x_adv), self.device)
                loss = composite_loss(
                    out.logits.float(), out.gamma.float(), torch.cat([yi, yi]), target,
                    cfg.loss_weights,
                )  # fmt: skip
                (loss / cfg.accumulate).backward()
            total += loss.item() / cfg.accumulate
            for e, b in zip(ends, buffers, strict=True):
                e.add_(b, alpha=1 / cfg.accumulate)
        with torch.no_grad():  # BatchNorm statistics: the mean over shards (counts: one step's)
            for b, e in zip(buffers, ends, strict=True):
                if self.world > 1:
                    dist.all_reduce(e)
                    e /= self.world
                b.copy_(e if b.is_floating_point() else e.round())
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.mixed.eval()
        return total

    def _attack(self, eps: float, steps: int, w: float, seed: int):
        cfg = self.config
        common = dict(eps=eps, norm=cfg.norm, steps=steps, w=w, seed=seed)
        if cfg.setting == "A":
            return PGD(target="mix-graybox", **common)
        if cfg.setting == "B":
            return PGD(target="mix", **common)
        ce, targeted = APGD(loss="ce", **common), APGD(loss="dlr-targeted", n_targets=1, **common)

        def apgd_ce_then_targeted(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            x_adv = ce(model, x, y)
            with torch.no_grad():
                left = (model(x_adv).argmax(1) == y).nonzero().squeeze(1)
            if left.numel():
                x_adv[left] = targeted(model, x[left], y[left])
            return x_adv

        return apgd_ce_then_targeted

    # -----------------------------------------------------------------------------------------
    # Validation and logs

    def validate(self) -> dict:
        """Clean and PGD (white box, through the policy) accuracy of the mix on ``val_set``,
        and its mean ``α`` on clean and on attacked inputs."""
        if self.val_loader is None:
            return {}
        cfg = self.config
        self.mixed.eval()
        attack = PGD(eps=cfg.val_eps, norm=cfg.norm, steps=cfg.val_steps, target="mix")
        sums = dict.fromkeys(("val_clean", "val_pgd", "val_alpha_clean", "val_alpha_pgd"), 0.0)
        for x, y in self.val_loader:
            x, y = x.to(self.device), y.to(self.device)
            x_adv = attack(self.mixed, x, y)
            with torch.no_grad():
                clean, adv = self.mixed.forward_details(x), self.mixed.forward_details(x_adv)
            correct = clean.logits.argmax(1) == y
            sums["val_clean"] += correct.sum().item()
            sums["val_pgd"] += (correct & (adv.logits.argmax(1) == y)).sum().item()
            sums["val_alpha_clean"] += clean.alpha.sum().item()
            sums["val_alpha_pgd"] += adv.alpha.sum().item()
        return {key: total / len(self.val_loader.dataset) for key, total in sums.items()}

    def _tensorboard(self):
        if self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional: the CSV has everything
            return None
        return SummaryWriter(self.out_dir / "tensorboard")

    def _log(self, row: dict, writer) -> None:
        path = self.out_dir / "metrics.csv"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            out = csv.DictWriter(f, fieldnames=list(row))
            if new:
                out.writeheader()
            out.writerow(row)
        if writer is not None:
            for key, value in row.items():
                writer.add_scalar(key, value, row["step"])


def _seed(*parts: int) -> int:
    """A seed from integers, distinct for distinct tuples (for steps and shards < 2^20)."""
    seed = 0
    for part in parts:
        seed = (seed << 20) + part
    return seed % (2**63)
