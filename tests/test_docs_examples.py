"""The Python examples of docs/methods.md run as written, on a tiny ResNet-8 with random
inputs: every block executes, the adapter's logits have shape (batch, classes), and for
``tent`` the BatchNorm affine parameters move while ``reset()`` restores them exactly.

Each block runs in a fresh namespace holding the names the examples use: ``tta``, ``torch``,
``model`` (a fresh model per block), ``x`` (one test batch), ``clean`` (in-distribution
images, float [0, 1]), ``stream`` (a few test batches) and ``unlabelled_loader`` (a
DataLoader of images and labels). A block whose last statement is ``adapted.reset()`` is run
up to it first, so that the state before the reset can be checked.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import tta
from test_methods_values import one_thread  # noqa: F401  (one torch thread on the shared machine)

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
CLASSES, BATCH, SIZE = 10, 8, 16



def _first_method(block: str) -> str:
    found = re.search(r"tta\.adapt\(model, \"(\w+)\"", block)
    return found.group(1) if found else "none"


IDS = [f"{i}-{_first_method(b)}" for i, b in enumerate(BLOCKS)]


def _namespace() -> dict:
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.rand(n, 3, SIZE, SIZE, generator=g)  # noqa: E731
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tta.models.get_model("resnet8", num_classes=CLASSES, in_channels=3, width=8).eval()
    loader_images = images(16)
    return {"tta": tta, "torch": torch, "model": model, "x": images(BATCH), "clean": images(16),
            "stream": [images(BATCH) for _ in range(3)],
            "unlabelled_loader": DataLoader(TensorDataset(loader_images, torch.zeros(16, dtype=torch.long)),
                                            batch_size=8)}


def _is_reset(statement: ast.stmt) -> bool:
    return (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)
            and ast.unparse(statement.value) == "adapted.reset()")


def _affine(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the scale and shift of every BatchNorm layer, by parameter name."""
    return {f"{name}.{key}": p.detach().clone() for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for key, p in m.named_parameters(recurse=False)}


def test_the_page_has_an_example_per_method():
    assert len(BLOCKS) >= 8
    shown = {m for b in BLOCKS for m in re.findall(r"tta\.adapt\(model, \"(\w+)\"", b)}
    assert shown == set(tta.list_methods()) - {"source"}, shown  # source: nothing to show


def _run_and_check(block: str) -> None:
    body = ast.parse(block).body
    resets = [i for i, statement in enumerate(body) if _is_reset(statement)]
    split = resets[-1] if resets else len(body)  # run up to the last adapted.reset(), check, go on
    head, tail = ast.Module(body=body[:split], type_ignores=[]), ast.Module(body=body[split:], type_ignores=[])
    ns = _namespace()
    source_affine = _affine(ns["model"])
    assert source_affine, "the model has BatchNorm affine parameters"
    exec(compile(head, f"{DOC.name} block", "exec"), ns)
    adapted = ns["adapted"]
    assert isinstance(adapted, tta.Adapter)
    if "logits" in ns:
        last = ns["x"]  # the loop variable for stream examples: the last batch adapted on
        assert ns["logits"].shape == (len(last), CLASSES)
        assert torch.isfinite(ns["logits"]).all()
    method = adapted.name
    if method == "tent":
        moved = _affine(adapted.model)
        assert moved.keys() == source_affine.keys()
        assert any(not torch.equal(moved[k], source_affine[k]) for k in moved), "tent did not move the BN affine"
    if resets:
        exec(compile(tail, f"{DOC.name} block", "exec"), ns)
        if method == "tent":
            restored = _affine(adapted.model)
            for k, value in source_affine.items():
                assert torch.equal(restored[k], value), k
        # after reset the adapter still works and gives logits of the right shape
        with torch.no_grad():
            assert adapted(ns["x"]).shape == (BATCH, CLASSES)


ADAPT = "tta.adapt(model,"
# a block that builds several adapters on the same `model` (alternatives shown line by line)
# is refused by the one-owner rule (docs/methods.md, "One owner per model")
@pytest.mark.parametrize("block", BLOCKS,
                         ids=IDS)
def test_example_runs_as_written(block):
    _run_and_check(block)


@pytest.mark.parametrize("block", BLOCKS, ids=IDS)
def test_example_with_a_fresh_model_copy_per_adapter(block):
    """The same block with every ``tta.adapt(model, ...)`` given its own
    ``copy.deepcopy(model)``: what each example shows works and gives the right values."""
    _run_and_check("import copy\n" + block.replace(ADAPT, "tta.adapt(copy.deepcopy(model),"))
