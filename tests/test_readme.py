"""The README's library snippet runs as written and does what its comments say."""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torchvision

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- readme-snippet[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its marked python snippet"
    return match.group(1)


def test_readme_snippet_runs_and_matches_torch():
    namespace: dict = {}
    exec(compile(_snippet(), str(README), "exec"), namespace)

    # An independent copy of the same network (same seed, same initialisation), never converted.
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10)
    foggy = namespace["foggy"]
    assert foggy.shape == (16, 3, 32, 32)
    with torch.no_grad():
        reference.eval()
        source = reference(foggy)
        reference.train()  # torch BatchNorm in train mode normalises with the batch statistics
        batch = reference(foggy)
        first_layer_input = reference.conv1(foggy)
    torch.testing.assert_close(namespace["source"], source, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(namespace["batch"], batch, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(namespace["blended"], source, atol=1e-3)
    assert not torch.allclose(namespace["blended"], batch, atol=1e-3)

    # Recalibration over both chunks = the statistics of the first BatchNorm's input over all 16.
    var, mean = torch.var_mean(first_layer_input.double(), dim=(0, 2, 3), correction=0)
    plain_bn1 = namespace["plain"].bn1
    assert type(plain_bn1) is torch.nn.BatchNorm2d
    torch.testing.assert_close(plain_bn1.running_mean.double(), mean, rtol=1e-4, atol=1e-5)
    # running_var is stored unbiased, torch's running_var convention (docs/batchnorm.md).
    n = first_layer_input.numel() / first_layer_input.shape[1]
    torch.testing.assert_close(plain_bn1.running_var.double(), var * n / (n - 1), rtol=1e-4, atol=1e-6)
