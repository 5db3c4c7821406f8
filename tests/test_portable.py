"""Portable mixed classifiers: bit-exact save/load, refusal of bad files, the logits export."""

import json
import struct

import pytest
import torch
from torch import nn

from adasmooth_ext import MixedClassifier
from adasmooth_ext.attacks import PGD, evaluate
from adasmooth_ext.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from adasmooth_ext.features import FeatureTap
from adasmooth_ext.mixednuts import MappedModel, NutsParams, mixednuts_classifier
from adasmooth_ext.models import SMALL_CNN_TAPS, small_cnn
from adasmooth_ext.policy import PolicyNetwork
from adasmooth_ext.portable import (
    KIND,
    LogitsModule,
    ModelRef,
    export_logits_module,
    load_mixed,
    save_mixed,
)

REF = ModelRef("small_cnn", {"width": 4})


def base_model(seed: int) -> nn.Module:
    """An untrained small_cnn with random batch-norm statistics (so buffers must round-trip)."""
    torch.manual_seed(seed)
    model = small_cnn(width=4)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.fixture
def x():
    return torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "build",
    [
        lambda g, h: MixedClassifier(g, h, alpha=0.3, std_scale=2.0, rob_scale=0.5),
        lambda g, h: mixednuts_classifier(g, h, NutsParams(4, 1.5, 2.0, -0.5, 0.8, hard_g=True)),
        lambda g, h: MixedClassifier(g, MappedModel(h, s=3.0), alpha=0.6),
    ],
    ids=["fixed-alpha", "mixednuts-hard-g", "temperature"],
)
def test_round_trip_is_bit_exact(tmp_path, x, build):
    mixed = build(base_model(0), base_model(1))
    save_mixed(tmp_path / "m.safetensors", mixed, REF, REF)
    loaded = load_mixed(tmp_path / "m.safetensors")
    assert torch.equal(loaded(x), mixed(x))
    assert type(loaded.std_model) is type(mixed.std_model)
    assert type(loaded.rob_model) is type(mixed.rob_model)
    assert not loaded.training


def test_round_trip_with_a_policy(tmp_path, x):
    g, h = base_model(0), base_model(1)
    features = []
    for model in (g, h):
        with FeatureTap(model, SMALL_CNN_TAPS) as tap, torch.no_grad():
            features.append(tap(x)[1])
    policy = PolicyNetwork.from_features(*features, width=4)
    if not hasattr(policy, "std_layers"):
        pytest.skip("this PolicyNetwork does not name its layers yet (issue 5)")
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.1 * torch.randn_like(param))
    policy.train()(*features)  # moves the batch-norm running statistics
    mixed = MixedClassifier(g, h, policy=policy.eval(), alpha_range=(0.2, 0.9))
    save_mixed(tmp_path / "p.safetensors", mixed, REF, REF)
    loaded = load_mixed(tmp_path / "p.safetensors")
    assert torch.equal(loaded(x), mixed(x)) and loaded.alpha_range == (0.2, 0.9)


def test_user_builders_and_unknown_factories(tmp_path, x):
    mixed = MixedClassifier(base_model(0), base_model(1), alpha=0.5)
    mine = ModelRef("my_cnn", {"width": 4})
    with pytest.raises(CheckpointError, match="unknown model factory 'my_cnn'"):
        save_mixed(tmp_path / "m.safetensors", mixed, mine, REF)
    save_mixed(tmp_path / "m.safetensors", mixed, mine, REF, builders={"my_cnn": small_cnn})
    with pytest.raises(CheckpointError, match="unknown model factory 'my_cnn'"):
        load_mixed(tmp_path / "m.safetensors")
    loaded = load_mixed(tmp_path / "m.safetensors", builders={"my_cnn": small_cnn})
    assert torch.equal(loaded(x), mixed(x))
    with pytest.raises(CheckpointError, match="do not fit"):
        save_mixed(tmp_path / "w.safetensors", mixed, ModelRef("small_cnn", {"width": 8}), REF)


def saved_state(tmp_path):
    path = tmp_path / "m.safetensors"
    save_mixed(path, MixedClassifier(base_model(0), base_model(1), alpha=0.5), REF, REF)
    return path, load_checkpoint(path, KIND)


def test_a_file_never_runs_code(tmp_path):
    """A well-formed file naming an importable callable as its factory is refused by name:
    nothing is imported or called (the marker file is never written)."""
    path, state = saved_state(tmp_path)
    marker = tmp_path / "pwned"
    state["std"]["factory"] = "builtins.exec"
    state["std"]["kwargs"] = {"source": f"open({str(marker)!r}, 'w')"}
    save_checkpoint(path, state, KIND)
    with pytest.raises(CheckpointError, match="unknown model factory 'builtins.exec'"):
        load_mixed(path)
    assert not marker.exists()


def test_tampered_mismatched_and_foreign_files_are_refused(tmp_path):
    path, state = saved_state(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a weight's bytes
    (tmp_path / "bytes.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_mixed(tmp_path / "bytes.safetensors")

    # Edit the JSON header (the mixing weight) without fixing the checksum.
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    header["__metadata__"]["state"] = header["__metadata__"]["state"].replace("0.5", "0.9")
    body = json.dumps(header, separators=(",", ":")).encode()
    assert len(body) <= size
    body = body.ljust(size)
    (tmp_path / "json.safetensors").write_bytes(raw[:8] + body[:size] + raw[8 + size :])
    with pytest.raises(CheckpointError, match="checksum"):
        load_mixed(tmp_path / "json.safetensors")

    state["rob"]["kwargs"] = {"width": 8}  # a consistent file whose weights do not fit
    save_checkpoint(tmp_path / "arch.safetensors", state, KIND)
    with pytest.raises(CheckpointError, match="rob weights do not fit"):
        load_mixed(tmp_path / "arch.safetensors")

    state["rob"]["kwargs"] = {"depth": 3}
    save_checkpoint(tmp_path / "kwargs.safetensors", state, KIND)
    with pytest.raises(CheckpointError, match="rejects its kwargs"):
        load_mixed(tmp_path / "kwargs.safetensors")

    save_checkpoint(tmp_path / "policy.safetensors", {"config": {}}, "policy")
    with pytest.raises(CheckpointError, match="expected 'mixed-classifier'"):
        load_mixed(tmp_path / "policy.safetensors")

    torch.save({"alpha": 0.5}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        load_mixed(tmp_path / "pickle.pt")


def test_save_rejects_what_it_cannot_rebuild(tmp_path):
    class Policy(nn.Module):
        def forward(self, x):
            return x.flatten(1).mean(1)

    mixed = MixedClassifier(base_model(0), base_model(1), policy=Policy())
    with pytest.raises(TypeError, match="only a PolicyNetwork"):
        save_mixed(tmp_path / "m.safetensors", mixed, REF, REF)
    with pytest.raises(TypeError, match="MixedClassifier"):
        save_mixed(tmp_path / "m.safetensors", base_model(0), REF, REF)


def test_exported_module_is_plain_logits_and_attackable(tmp_path, digit_models):
    splits, g, h = digit_models
    mixed = mixednuts_classifier(g, h, NutsParams(4, 1.0, 2.0, 0.0, 0.7))
    ref = ModelRef("small_cnn", {"width": 8})
    save_mixed(tmp_path / "m.safetensors", mixed, ref, ref)
    exported = export_logits_module(load_mixed(tmp_path / "m.safetensors"))
    assert isinstance(exported, LogitsModule) and not isinstance(exported, MixedClassifier)
    exported.train()  # RobustBench-style code may call it; it stays in eval mode
    assert not any(m.training for m in exported.modules())
    assert not any(p.requires_grad for p in exported.parameters())
    x, y = splits.test.tensors[0][:32], splits.test.tensors[1][:32]
    out = exported(x)
    assert isinstance(out, torch.Tensor) and torch.equal(out, mixed(x))
    table = evaluate(exported, [(x, y)], [PGD(eps=0.3, steps=10)], progress=False)
    assert table.rows[0].accuracy > 0.8 and table.rows[1].backend == "adasmooth"
    assert table.rows[1].accuracy < table.rows[0].accuracy  # gradients flow through the export
