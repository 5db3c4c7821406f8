"""Loads the _C library that CMake built (not the pip-built one) and mixes a few logits."""

import importlib.util
import pathlib
import sys

import torch

folder = pathlib.Path(sys.argv[1])
(library,) = folder.glob("_C*.so")
spec = importlib.util.spec_from_file_location("_C", library)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
info = module.build_info()
g, h = torch.randn(4, 10), torch.randn(4, 10)
out = torch.ops.adasmooth.mix(g, h, torch.full((4,), 0.3), 1.0, 1.0)
expected = torch.logaddexp(
    g.log_softmax(-1) + torch.log1p(torch.tensor(-0.3)),
    h.log_softmax(-1) + torch.log(torch.tensor(0.3)),
)
torch.testing.assert_close(out, expected)
print(f"CMake build OK: {library.name} {info}")
