"""Base-model training: standard training learns digits; PGD and TRADES training buy
robustness that standard training lacks; bad arguments get clear errors."""

import pytest
import torch

from adasmooth_ext.attacks import PGD, evaluate
from adasmooth_ext.data import as_loader, digits
from adasmooth_ext.models import small_cnn
from adasmooth_ext.train_base import train_classifier

EPS = 0.2


@pytest.fixture(scope="module")
def trained():
    """Clean and PGD-10 test accuracy of an untrained CNN and of one per training method."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    splits = digits()
    loader = as_loader(splits.train, 64, shuffle=True, seed=0)
    test = as_loader(splits.test, 512)
    results = {}
    for method in ("untrained", "standard", "pgd", "trades"):
        torch.manual_seed(0)
        model = small_cnn(width=8)
        if method != "untrained":
            eps = 0.0 if method == "standard" else EPS
            train_classifier(
                model, loader, method=method, eps=eps, epochs=8, lr=1e-2, progress=False
            )
        table = evaluate(model.eval(), test, [PGD(eps=EPS, steps=10)], progress=False)
        results[method] = table["clean"].accuracy, table.rows[1].accuracy
    torch.set_num_threads(threads)
    return results


def test_standard_training_learns_the_digits(trained):
    assert trained["untrained"][0] < 0.3
    assert trained["standard"][0] > 0.9


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_adversarial_training_raises_robust_accuracy(trained, method):
    clean, robust = trained[method]
    standard_clean, standard_robust = trained["standard"]
    assert robust > standard_robust + 0.2, (method, robust, standard_robust)
    assert clean > 0.8  # still a classifier, only a less accurate one
    assert clean < standard_clean + 0.02  # robustness is paid for in clean accuracy, not free


def test_bad_arguments():
    model, loader = small_cnn(width=4), [(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="method must be one of"):
        train_classifier(model, loader, method="mart")
    with pytest.raises(ValueError, match="needs a radius eps > 0"):
        train_classifier(model, loader, method="pgd")
    with pytest.raises(ValueError, match="epochs and steps must be >= 1"):
        train_classifier(model, loader, epochs=0)
