"""Checkpoints: bit-exact round trips, atomic writes, clear refusals, exact resume."""

import math
import os

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from adasmooth_ext import checkpoint
from adasmooth_ext.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from adasmooth_ext.models import small_cnn
from adasmooth_ext.policy import PolicyNetwork


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def assert_same_tree(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert same_bits(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same_tree(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_tree(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_round_trip_is_bit_exact(tmp_path):
    base = torch.randn(4, 6)
    shared = torch.arange(5.0)
    state = {
        "tensors": {
            "fp32": torch.tensor([1.5, -0.0, float("nan"), float("inf")]),
            "bf16": torch.randn(3, 2).bfloat16(),
            "fp16": torch.randn(7).half(),
            "fp64": torch.randn(2, 2, dtype=torch.float64),
            "int64": torch.tensor(7),  # 0-d
            "bool": torch.tensor([True, False]),
            "uint8": torch.randint(0, 256, (3,), dtype=torch.uint8),
            "empty": torch.zeros(0, 3),
            "view": base.t()[1:3],  # non-contiguous view of a larger storage
            "tied_a": shared,
            "tied_b": shared,
        },
        "int_keys": {0: {"step": torch.tensor(3.0)}, 1: None},
        "tuple": (0.9, 0.999),
        "tags": {"__tensor__": "not a tensor"},
        "scalars": [None, True, 3, -2.5, float("nan"), float("inf"), "text", []],
    }
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, state, kind="test")
    loaded = load_checkpoint(path, expected_kind="test")
    assert_same_tree(state, loaded)


def test_module_state_dict_round_trip(tmp_path):
    model = small_cnn(width=4)
    model(torch.rand(8, 1, 8, 8))  # move the BN running statistics
    save_checkpoint(tmp_path / "m", {"model": model.state_dict()}, kind="base-model")
    fresh = small_cnn(width=4)
    fresh.load_state_dict(load_checkpoint(tmp_path / "m", "base-model")["model"])
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_policy_rebuilds_from_its_saved_config(tmp_path):
    policy = PolicyNetwork((4, 8), (4, 8), width=4, blocks=(1, 2))
    state = {"config": policy.config, "policy": policy.state_dict()}
    save_checkpoint(tmp_path / "p", state, kind="policy")
    loaded = load_checkpoint(tmp_path / "p", "policy", required=["config", "policy"])
    rebuilt = PolicyNetwork(**loaded["config"])
    rebuilt.load_state_dict(loaded["policy"])
    features = [torch.rand(2, 4, 8, 8), torch.rand(2, 8, 4, 4)]
    policy.eval(), rebuilt.eval()
    assert torch.equal(rebuilt(features, features), policy(features, features))


def old_and_new(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"version": "old", "w": torch.ones(3)}, kind="test")
    return path, {"version": "new", "w": torch.zeros(1000)}


def assert_old_file_intact_and_no_litter(path):
    assert load_checkpoint(path)["version"] == "old"
    assert os.listdir(path.parent) == [path.name]


@pytest.mark.parametrize("failing", ["fsync", "replace", "write"])
def test_crash_mid_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch, failing):
    path, new_state = old_and_new(tmp_path)

    def crash(*args, **kwargs):
        raise OSError("disk on fire")

    if failing == "write":  # a partial write, then the crash
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, file):
                self.file = file

            def __getattr__(self, name):
                return getattr(self.file, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.file.close()

            def write(self, data):
                self.file.write(data[: len(data) // 2])
                crash()

        monkeypatch.setattr(os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    else:
        monkeypatch.setattr(os, failing, crash)
    with pytest.raises(OSError, match="disk on fire"):
        save_checkpoint(path, new_state, kind="test")
    monkeypatch.undo()
    assert_old_file_intact_and_no_litter(path)


def test_unsavable_value_fails_before_touching_the_file(tmp_path):
    path, _ = old_and_new(tmp_path)
    with pytest.raises(TypeError, match=r"cannot save a object at 'meta/bad'"):
        save_checkpoint(path, {"meta": {"bad": object()}}, kind="test")
    with pytest.raises(TypeError, match="dict key"):
        save_checkpoint(path, {"meta": {(1, 2): 3}}, kind="test")
    assert_old_file_intact_and_no_litter(path)


def test_new_file_gets_the_usual_permissions(tmp_path):
    save_checkpoint(tmp_path / "sub" / "c", {"a": 1}, kind="test")  # creates the folder too
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "sub" / "c").st_mode & 0o777 == 0o666 & ~umask


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing")


def test_torch_save_pickle_is_refused_unopened(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="is a pickle .* never unpickles"):
        load_checkpoint(path)


def test_foreign_safetensors_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="not an adasmooth checkpoint"):
        load_checkpoint(path)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "c"
    save_checkpoint(path, {"w": torch.randn(100)}, kind="test")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_flipped_tensor_byte_is_detected(tmp_path):
    path = tmp_path / "c"
    save_checkpoint(path, {"w": torch.randn(100)}, kind="test")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match their checksum"):
        load_checkpoint(path)


def rewrite_header(path, **changes):
    """The same tensors under an edited header, as a foreign tool might write them."""
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, "pt") as file:
        header = {**file.metadata(), **changes}
    safetensors.torch.save_file(tensors, path, metadata=header)


def test_edited_state_is_detected(tmp_path):
    path = tmp_path / "c"
    save_checkpoint(path, {"lr": 0.1, "w": torch.ones(2)}, kind="test")
    rewrite_header(path, state='{"lr": 10.0, "w": {"__tensor__": "w"}}')
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "c"
    save_checkpoint(path, {"w": torch.ones(2)}, kind="test")
    rewrite_header(path, version=str(checkpoint.VERSION + 1))
    with pytest.raises(CheckpointError, match="format version 2; this adasmooth reads versions up"):
        load_checkpoint(path)


def test_damaged_header_is_refused(tmp_path):
    path = tmp_path / "c"
    save_checkpoint(path, {"w": torch.ones(2)}, kind="test")
    rewrite_header(path, version="one")
    with pytest.raises(CheckpointError, match="header lacks a valid 'version'"):
        load_checkpoint(path)


def test_wrong_kind_and_missing_entries(tmp_path):
    path = tmp_path / "c"
    save_checkpoint(path, {"policy": {"w": torch.ones(2)}, "epoch": 1}, kind="policy")
    with pytest.raises(CheckpointError, match="holds a 'policy' checkpoint, expected 'trainer'"):
        load_checkpoint(path, expected_kind="trainer")
    with pytest.raises(CheckpointError, match="lacks 'optimizer'; it holds 'policy', 'epoch'"):
        load_checkpoint(path, required=["policy", "optimizer"])


def test_bad_kind_or_state():
    with pytest.raises(ValueError, match="kind"):
        save_checkpoint("unused", {}, kind="")
    with pytest.raises(TypeError, match="must be a dict"):
        save_checkpoint("unused", [torch.ones(1)], kind="test")


# ---------------------------------------------------------------------------------------------
# Resume: stopping, saving, loading into fresh objects and continuing equals never stopping.

_GEN = torch.Generator().manual_seed(0)
DATA = torch.rand(64, 1, 8, 8, generator=_GEN), torch.randint(0, 10, (64,), generator=_GEN)


def make_run(optimizer: str, seed: int):
    torch.manual_seed(seed)
    model = small_cnn(width=4)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    return model, opt, sched


def train_steps(model, opt, sched, steps):
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(DATA[1]), (16,))  # draws from the global RNG
        loss = F.cross_entropy(model(DATA[0][idx]), DATA[1][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, optimizer):
    model, opt, sched = make_run(optimizer, seed=0)
    torch.manual_seed(123)
    train_steps(model, opt, sched, 6)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = make_run(optimizer, seed=0)
    torch.manual_seed(123)
    train_steps(model, opt, sched, 3)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": rng_state(),
    }
    save_checkpoint(tmp_path / "resume", state, kind="trainer")

    def resume(restore_rng: bool):
        model, opt, sched = make_run(optimizer, seed=99)  # different initial weights
        torch.manual_seed(7)  # and a different global RNG
        loaded = load_checkpoint(tmp_path / "resume", "trainer")
        model.load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["optimizer"])
        sched.load_state_dict(loaded["scheduler"])
        if restore_rng:
            set_rng_state(loaded["rng"])
        train_steps(model, opt, sched, 3)
        return model.state_dict()

    resumed = resume(restore_rng=True)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    # The test can fail: without the RNG state the batches, hence the weights, differ.
    unseeded = resume(restore_rng=False)
    assert not all(torch.equal(unseeded[k], reference[k]) for k in reference)
