"""PolicyTrainer: the composite loss, pseudo-labels, exact resume, bf16, and bad checkpoints."""

import math
import shutil

import pytest
import torch
from torch.utils.data import Subset

from adasmooth_ext import MixedClassifier
from adasmooth_ext.checkpoint import CheckpointError, save_checkpoint
from adasmooth_ext.data import digits
from adasmooth_ext.models import SMALL_CNN_TAPS, small_cnn
from adasmooth_ext.policy import PolicyNetwork
from adasmooth_ext.training import PolicyTrainer, TrainConfig, composite_loss, pseudo_labels


def test_composite_loss_matches_a_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    gamma = torch.tensor([0.3, -2.0])
    y, target = torch.tensor([0, 2]), torch.tensor([0.0, 1.0])
    ce = []
    for row, label in zip(logits.tolist(), y.tolist(), strict=True):
        ce.append(-row[label] + math.log(sum(math.exp(v) for v in row)))
    sig = [1 / (1 + math.exp(-g)) for g in gamma.tolist()]
    bce = [-(t * math.log(s) + (1 - t) * math.log(1 - s)) for s, t in zip(sig, [0, 1], strict=True)]
    c1, c2, c3 = 0.7, 1.3, 0.2
    expected = sum(c1 * a + c2 * b + c3 * a * b for a, b in zip(ce, bce, strict=True)) / 2
    got = composite_loss(logits, gamma, y, target, (c1, c2, c3))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    default = sum(0.5 * a + 1.0 * b + 0.1 * a * b for a, b in zip(ce, bce, strict=True)) / 2
    assert composite_loss(logits, gamma, y, target).item() == pytest.approx(default, rel=1e-6)


def test_pseudo_labels_zero_for_clean_one_for_attacked():
    labels = pseudo_labels(3, 2)
    assert labels.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0] and labels.dtype == torch.float32


def tiny_run(out, epochs=2, seed=0, rob_scale=1.0, **kwargs):
    torch.manual_seed(0)
    g, h = small_cnn(width=4).eval(), small_cnn(width=4).eval()
    torch.manual_seed(seed)
    splits = digits()
    train, val = Subset(splits.train, range(48)), Subset(splits.calibration, range(16))
    policy = PolicyNetwork.from_models(g, h, train[0][0][None], SMALL_CNN_TAPS, width=4)
    mixed = MixedClassifier(g, h, policy=policy, alpha_range=(0.1, 0.95), rob_scale=rob_scale)
    config = TrainConfig(
        epochs=epochs, batch_size=16, steps=(1, 3), eps=(0.05, 0.2), val_steps=2, **kwargs
    )
    return PolicyTrainer(mixed, train, val, config, out, progress=False)


@pytest.mark.parametrize("setting", ["A", "C"])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, setting):
    whole = tiny_run(tmp_path / "whole", setting=setting)
    rows = whole.fit()
    assert [r["epoch"] for r in rows] == [1, 2] and whole.step == 6
    assert rows[-1]["val_alpha_pgd"] > 0  # validation ran and logged α
    lines = (tmp_path / "whole" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,step,train_loss,lr,val_clean,val_pgd") and len(lines) == 3

    first = tiny_run(tmp_path / "cut", setting=setting)
    first.fit(epochs=1)  # interrupted after one epoch
    torch.manual_seed(123)  # the resumed process starts from other random states
    resumed = tiny_run(tmp_path / "resumed", seed=7, setting=setting)
    resumed.fit(resume=tmp_path / "cut" / "policy.safetensors")
    assert resumed.step == whole.step
    for (name, a), b in zip(
        whole.policy.state_dict().items(), resumed.policy.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert whole.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_training_separates_clean_and_attacked_inputs(tmp_path):
    trainer = tiny_run(tmp_path, epochs=4, w=(0.0, 0.0), bf16=True, lr=1e-2)
    rows = trainer.fit()
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["val_alpha_pgd"] > rows[-1]["val_alpha_clean"]


def test_accumulate_splits_batches_and_bad_config():
    with pytest.raises(ValueError, match="setting must be one of"):
        TrainConfig(setting="D")
    with pytest.raises(ValueError, match="eps must be a range"):
        TrainConfig(eps=(0.3, 0.1))
    with pytest.raises(ValueError, match="multiple of accumulate 3"):
        TrainConfig(batch_size=16, accumulate=3)


def test_bad_checkpoints_are_refused_and_leave_files_intact(tmp_path):
    trainer = tiny_run(tmp_path / "run", epochs=1)
    trainer.fit()
    good = tmp_path / "run" / "policy.safetensors"
    before = good.read_bytes()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(before[: len(before) // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"policy": trainer.policy.state_dict()}, foreign)
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, {"model": torch.zeros(2)}, "small-cnn")
    resumed = tiny_run(tmp_path / "run", epochs=2)
    for path, match in [
        (corrupt, "corrupt or truncated"),
        (foreign, "pickle"),
        (other, "holds a 'small-cnn' checkpoint, expected 'policy-trainer'"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            resumed.fit(resume=path)
    assert good.read_bytes() == before
    shutil.copy(good, tmp_path / "copy.safetensors")
    wider = tiny_run(tmp_path / "wider", epochs=2)
    wider.policy.config["width"] = 8  # another architecture
    with pytest.raises(ValueError, match="holds a policy built as"):
        wider.fit(resume=tmp_path / "copy.safetensors")
    hotter = tiny_run(tmp_path / "hotter", epochs=2, rob_scale=2.0)  # another mixture
    with pytest.raises(ValueError, match="trained to mix as .*'rob_scale': 1.0"):
        hotter.fit(resume=tmp_path / "copy.safetensors")
