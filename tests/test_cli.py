"""The command line: a tiny end-to-end run of every command, --help, DDP under torchrun, and
clear errors on bad input that leave existing files intact."""

import json
import os
import subprocess
import sys

import pytest
import torch

from adasmooth_ext.checkpoint import load_checkpoint
from adasmooth_ext.cli import main
from adasmooth_ext.models import save_small_cnn, small_cnn

COMMANDS = ["demo", "train-base", "train-policy", "evaluate", "certify", "sweep", "compare"]
QUICK_AA = ["--aa-steps", "2", "--square-queries", "5", "--no-progress"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two untrained width-4 small CNNs as checkpoints (what train-base writes)."""
    folder = tmp_path_factory.mktemp("bases")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = folder / f"m{seed}.safetensors"
        save_small_cnn(path, small_cnn(width=4), dict(width=4))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def policy(bases, tmp_path_factory):
    out = tmp_path_factory.mktemp("policy")
    main(["train-policy", "--std", bases[0], "--rob", bases[1], "--out", str(out), *TINY_POLICY])
    return str(out / "policy.safetensors")


TINY_POLICY = [
    "--epochs", "1", "--batch-size", "512", "--steps-range", "1", "2", "--policy-width", "4",
    "--no-progress",
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS + ["info"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: adasmooth " + command in capsys.readouterr().out


def test_train_base(tmp_path, capsys):
    main(["train-base", "--method", "trades", "--eps", "0.1", "--steps", "1", "--epochs", "1",
          "--width", "4", "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    state = load_checkpoint(tmp_path / "model.safetensors", "small-cnn")
    assert state["config"] == {"num_classes": 10, "in_channels": 1, "width": 4}
    rows = json.loads((tmp_path / "test.json").read_text())
    assert [r["attack"] for r in rows][0] == "clean" and rows[0]["total"] == 449
    assert "PGD20-CE" in capsys.readouterr().out


def test_train_policy_writes_checkpoint_and_metrics(policy):
    state = load_checkpoint(policy, "policy-trainer")
    assert state["epoch"] == 1 and state["config"]["setting"] == "B"
    assert state["mixing"] == dict(alpha=None, alpha_range=None, std_scale=1.0, rob_scale=1.0)
    metrics = os.path.join(os.path.dirname(policy), "metrics.csv")
    assert open(metrics).read().startswith("epoch,step,train_loss")


def test_evaluate_policy_with_autoattack(bases, policy, tmp_path, capsys):
    main(["evaluate", "--std", bases[0], "--rob", bases[1], "--policy", policy, "--limit", "20",
          "--autoattack", "--audit", "--out", str(tmp_path), *QUICK_AA])  # fmt: skip
    rows = json.loads((tmp_path / "autoattack.json").read_text())
    names = [r["attack"] for r in rows]
    assert names[1].startswith("APGD-CE") and all("w=0.5 neg-gamma" in n for n in names[-3:-1])
    assert rows[-1]["attack"] == "worst case" and rows[-1]["total"] == 20
    assert "| clean |" in capsys.readouterr().out
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert len(audit) == 16 and audit[-1]["attack"] == "worst case"
    assert audit[-1]["correct"] == min(r["correct"] for r in audit)
    assert sum("w=0.5 bce" in r["attack"] for r in audit) == 2


def test_sweep_and_certify(bases, tmp_path):
    main(["sweep", "--std", bases[0], "--rob", bases[1], "--alphas", "0", "1", "--limit", "20",
          "--out", str(tmp_path / "s"), "--no-progress"])  # fmt: skip
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [r["alpha"] for r in rows] == [0, 1] and (tmp_path / "s" / "sweep.png").stat().st_size
    main(["certify", "--rob", bases[1], "--limit", "4", "--n", "100", "--alphas", "0.9",
          "--out", str(tmp_path / "c"), "--no-progress"])  # fmt: skip
    curves = json.loads((tmp_path / "c" / "certified.json").read_text())
    assert len(curves["radii"]) == 41 and "mix, α = 0.9" in curves


def test_compare_mixednuts_fixed_alpha_and_policy(bases, policy, tmp_path, capsys):
    main(["compare", "--std", bases[0], "--rob", bases[1], "--policy", policy, "--alphas", "0.5",
          "--limit", "16", "--out", str(tmp_path), *QUICK_AA])  # fmt: skip
    rows = json.loads((tmp_path / "compare.json").read_text())
    methods = [r["method"] for r in rows]
    assert methods[:3] == ["g (standard)", "h (robust)", "fixed α=0.5"]
    assert methods[3].startswith("MixedNUTS") and methods[4] == "adaptive policy"
    assert all(r["adaptive"] <= r["autoattack"] <= r["clean"] for r in rows)
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert "| MixedNUTS" in capsys.readouterr().out


def test_demo_tiny(tmp_path, capsys):
    main(["demo", "--epochs", "1", "--policy-epochs", "1", "--limit", "30", "--alphas", "0", "1",
          "--table-alphas", "0.8", "--out", str(tmp_path), *QUICK_AA])  # fmt: skip
    out = capsys.readouterr().out
    assert "| adaptive mix |" in out and "Acceptance:" in out
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["results"]) == {"g", "h", "mix α=0.8", "adaptive mix"}
    assert len(result["verdict"]) == 4
    for name in ("g", "h", "policy", "results"):
        assert any(p.name.startswith(name) for p in tmp_path.iterdir()), name
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    # The saved policy remembers the demo's α range and temperatures: evaluating it from the
    # files gives the demo's clean accuracy.
    mixing = load_checkpoint(tmp_path / "policy.safetensors")["mixing"]
    assert mixing == dict(alpha=None, alpha_range=(0.6, 1.0), std_scale=0.5, rob_scale=2.0)
    main(["evaluate", "--std", str(tmp_path / "g.safetensors"), "--rob",
          str(tmp_path / "h.safetensors"), "--policy", str(tmp_path / "policy.safetensors"),
          "--limit", "30", "--out", str(tmp_path / "eval"), "--no-progress"])  # fmt: skip
    clean = json.loads((tmp_path / "eval" / "pgd.json").read_text())[0]
    assert [clean["correct"], clean["total"]] == result["results"]["adaptive mix"]["clean"]


def run_cli(*args, env=None):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(bases, tmp_path):
    common = ["train-policy", "--std", bases[0], "--rob", bases[1], "--epochs", "1",
              "--batch-size", "256", "--steps-range", "1", "3", "--policy-width", "4",
              "--no-progress"]  # fmt: skip
    ddp = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "-m", "adasmooth_ext", *common, "--out", str(tmp_path / "ddp"))  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = run_cli("-m", "adasmooth_ext", *common, "--accumulate", "2", "--out",
                  str(tmp_path / "one"), env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_checkpoint(tmp_path / "ddp" / "policy.safetensors")
    b = load_checkpoint(tmp_path / "one" / "policy.safetensors")
    assert a["step"] == b["step"] == 4
    for name, tensor in a["policy"].items():
        torch.testing.assert_close(tensor, b["policy"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert a["policy"]["bias"] != 0, "the policy trained (its bias starts at 0)"


def test_bad_input_gets_a_clear_error_and_leaves_files_intact(bases, policy, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    keep = out / "pgd.md"
    keep.write_text("earlier results\n")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(open(policy, "rb").read()[:200])
    foreign = tmp_path / "foreign.pt"
    torch.save(small_cnn(width=4).state_dict(), foreign)
    wide = tmp_path / "wide.safetensors"
    save_small_cnn(wide, small_cnn(width=6), dict(width=6))
    cases = [
        (["evaluate", "--std", bases[0], "--rob", bases[1], "--policy", str(corrupt)],
         "corrupt or truncated"),
        (["evaluate", "--std", str(foreign), "--rob", bases[1]], "is a pickle"),
        (["evaluate", "--std", bases[0], "--rob", str(wide), "--policy", policy],
         "rob features have (shallow, deep) channels (6, 12), but the policy was built"),
        (["evaluate", "--std", bases[0], "--rob", bases[1], "--policy", policy, "--rob-scale", "2"],
         "--rob-scale 2.0: the policy was trained with rob_scale = 1.0"),
        (["evaluate", "--std", bases[0], "--rob", bases[1], "--audit"],
         "--audit attacks a policy: give --policy"),
        (["train-policy", "--std", bases[0], "--rob", bases[1], "--layers", "stage1", "stage7"],
         "unknown layer 'stage7' in Sequential"),
        (["sweep", "--std", bases[0], "--rob", bases[1], "--data", "cifar10", "--data-root",
          str(tmp_path / "nowhere")], "CIFAR-10 not found: expected the folder"),
        (["sweep", "--std", bases[0], "--rob", bases[1], "--data", "cifar100"],
         "needs --data-root"),
    ]  # fmt: skip
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--out", str(out), "--no-progress"])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err or pytest.fail(message)
    assert keep.read_text() == "earlier results\n"
    assert sorted(p.name for p in out.iterdir()) == ["pgd.md"]
