"""Tests of tta.models: registry, ResNet/WideResNet architectures, normalisation, torchvision
lookup (never a download), checkpoint errors and the shipped Fashion-MNIST model."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta.models
from tta.models import CheckpointError, InputNormalization, Normalized, extract_state_dict, load_checkpoint, save_checkpoint
from tta.models.resnet import ResNet
from tta.models.shipped import PRETRAINED, PRETRAINED_DIR, sha256_of
from tta.models.wideresnet import WideResNet


# ---------------------------------------------------------------- registry


def test_list_models_is_sorted_and_has_the_families():
    names = tta.models.list_models()
    assert names == sorted(names)
    for name in ("resnet8", "resnet14", "resnet20", "wide_resnet28_10", "resnet50", "vit_b_16"):
        assert name in names


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet21'.*resnet20"):
        tta.models.get_model("resnet21")


def test_register_model_and_duplicates():
    @tta.models.register_model("_test_tiny")
    def tiny(num_classes: int = 3, **kwargs) -> nn.Module:
        return nn.Linear(4, num_classes)

    try:
        assert "_test_tiny" in tta.models.list_models()
        assert tta.models.get_model("_test_tiny", num_classes=5).out_features == 5
        with pytest.raises(ValueError, match="already registered.*_test_tiny"):
            tta.models.register_model("_test_tiny")(tiny)
        with pytest.raises(ValueError, match="already registered"):
            tta.models.register_model("resnet20")(tiny)
    finally:
        tta.models._MODELS.pop("_test_tiny", None)


# ---------------------------------------------------------------- small ResNets


def _call_order(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in model.modules() if not list(m.children())]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return order


@pytest.mark.parametrize("depth", [8, 14, 20])
@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
def test_resnet_shape_depth_and_bn_after_every_conv(depth, in_channels, size):
    model = tta.models.get_model(f"resnet{depth}", num_classes=7, in_channels=in_channels).eval()
    x = torch.rand(2, in_channels, size, size)
    assert model(x).shape == (2, 7)
    order = _call_order(model, x)
    convs = [m for m in order if isinstance(m, nn.Conv2d)]
    # depth counts the 3x3 convolutions and the classifier (He et al. 2016, sec. 4.2)
    assert sum(c.kernel_size == (3, 3) for c in convs) + 1 == depth
    for index, module in enumerate(order):
        if isinstance(module, nn.Conv2d):
            following = order[index + 1]
            assert isinstance(following, nn.BatchNorm2d) and following.num_features == module.out_channels
    # three stages of 16/32/64 channels, spatial size halved twice
    widths = sorted({c.out_channels for c in convs})
    assert widths == [16, 32, 64]


def test_resnet_width_and_bad_arguments():
    model = ResNet(depth=8, width=4, in_channels=1)
    assert model.fc.in_features == 16
    with pytest.raises(ValueError, match="6n \\+ 2.*got 21"):
        ResNet(depth=21)
    with pytest.raises(ValueError, match="both mean and std"):
        ResNet(depth=8, mean=[0.5])


def test_resnet_weights_from_local_checkpoint(tmp_path):
    torch.manual_seed(1)
    source = tta.models.get_model("resnet8", num_classes=10, in_channels=1)
    save_checkpoint({"state_dict": source.state_dict()}, tmp_path / "r8.pt")
    loaded = tta.models.get_model("resnet8", num_classes=10, in_channels=1, weights=tmp_path / "r8.pt")
    for (k1, v1), (k2, v2) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


# ---------------------------------------------------------------- normalisation


def test_input_normalization_matches_hand_computation_and_is_not_saved():
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]
    norm = InputNormalization(mean, std)
    x = torch.rand(2, 3, 5, 5)
    expected = torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)
    torch.testing.assert_close(norm(x), expected)
    assert norm.state_dict() == {}
    model = ResNet(depth=8, in_channels=3, mean=mean, std=std)
    assert not any("normalize" in key for key in model.state_dict())
    with pytest.raises(ValueError, match="std must be > 0"):
        InputNormalization([0.5], [0.0])
    with pytest.raises(ValueError, match=r"\(N, 3, \.\.\.\)"):
        norm(torch.rand(2, 1, 5, 5))


def test_normalized_wrapper_keys_and_strict_loading():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    wrapped = Normalized(inner, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert set(wrapped.state_dict()) == {"model." + k for k in inner.state_dict()}
    x = torch.rand(2, 3, 6, 6)
    torch.testing.assert_close(wrapped.eval()(x), inner.eval()((x - 0.5) / 0.25))

    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    bare = other.state_dict()  # a user's checkpoint of the unwrapped model
    wrapped.load_state_dict(bare, strict=True)
    assert torch.equal(inner[0].weight, other[0].weight)
    wrapped.load_state_dict({"model." + k: v * 0 for k, v in bare.items()}, strict=True)
    assert not inner[0].weight.any()
    with pytest.raises(RuntimeError, match="Missing key"):
        wrapped.load_state_dict({"0.weight": bare["0.weight"]}, strict=True)


# ---------------------------------------------------------------- WideResNet-28-10


def _robustbench_standard_keys() -> dict[str, tuple[int, ...]]:
    """The state_dict of RobustBench's CIFAR-10 "Standard" WideResNet-28-10, enumerated by hand
    from robustbench/model_zoo/architectures/wide_resnet.py (commit 3c3ee546): conv1 (3->16),
    three NetworkBlocks ``block{1,2,3}.layer.{0..3}`` of BasicBlocks (bn1, conv1, bn2, conv2, and
    convShortcut only in layer.0 where in_planes != out_planes), a final bn1 and fc (bias)."""
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (16, 3, 3, 3)}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{name}"] = (c,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    for stage, (c_in, c_out) in enumerate([(16, 160), (160, 320), (320, 640)], start=1):
        for i in range(4):
            p = f"block{stage}.layer.{i}"
            first_in = c_in if i == 0 else c_out
            bn(f"{p}.bn1", first_in)
            keys[f"{p}.conv1.weight"] = (c_out, first_in, 3, 3)
            bn(f"{p}.bn2", c_out)
            keys[f"{p}.conv2.weight"] = (c_out, c_out, 3, 3)
            if i == 0:
                keys[f"{p}.convShortcut.weight"] = (c_out, c_in, 1, 1)
    bn("bn1", 640)
    keys["fc.weight"] = (10, 640)
    keys["fc.bias"] = (10,)
    return keys


def test_wide_resnet28_10_matches_robustbench_standard_keys_and_shapes():
    expected = _robustbench_standard_keys()
    state = tta.models.get_model("wide_resnet28_10").state_dict()
    assert set(state) == set(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert len(expected) == 1 + 3 * (4 * 12 + 1) + 5 + 2  # 155 tensors


def _robustbench_forward(state: dict[str, torch.Tensor], x: torch.Tensor, blocks: int) -> torch.Tensor:
    """Functional re-statement of RobustBench's WideResNet.forward in eval mode (the oracle)."""

    def bn(prefix, t):
        return F.batch_norm(t, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], False, 0.0, 1e-5)

    out = F.conv2d(x, state["conv1.weight"], padding=1)
    for stage in (1, 2, 3):
        for i in range(blocks):
            p = f"block{stage}.layer.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            if f"{p}.convShortcut.weight" in state:  # not equalInOut: x itself is pre-activated
                out = F.relu(bn(f"{p}.bn1", out))
                h = F.conv2d(out, state[f"{p}.conv1.weight"], stride=stride, padding=1)
                shortcut = F.conv2d(out, state[f"{p}.convShortcut.weight"], stride=stride)
            else:
                h = F.conv2d(F.relu(bn(f"{p}.bn1", out)), state[f"{p}.conv1.weight"], stride=stride, padding=1)
                shortcut = out
            h = F.conv2d(F.relu(bn(f"{p}.bn2", h)), state[f"{p}.conv2.weight"], padding=1)
            out = shortcut + h
    out = F.relu(bn("bn1", out))
    out = F.avg_pool2d(out, 8).flatten(1)
    return F.linear(out, state["fc.weight"], state["fc.bias"])


def test_wide_resnet_forward_matches_robustbench_semantics():
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=2).eval()
    for module in model.modules():  # non-trivial running statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _robustbench_forward(model.state_dict(), x, blocks=1))


def test_wide_resnet_loads_a_dataparallel_checkpoint_strictly(tmp_path):
    # RobustBench checkpoints are {"state_dict": {"module.<key>": ...}}
    torch.manual_seed(3)
    source = WideResNet(depth=10, widen_factor=1)
    save_checkpoint({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, tmp_path / "s.pt")
    target = WideResNet(depth=10, widen_factor=1)
    target.load_state_dict(extract_state_dict(load_checkpoint(tmp_path / "s.pt")), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


# ---------------------------------------------------------------- torchvision


def test_torchvision_by_name_with_hub_cache_and_no_download(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        model = tta.models.get_model("squeezenet1_1", num_classes=1000)
        assert isinstance(model, Normalized) and isinstance(model.model, torchvision.models.SqueezeNet)
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1000)

        expected_file = tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
        with pytest.raises(FileNotFoundError, match="SqueezeNet1_1_Weights.IMAGENET1K_V1 not found at .*squeezenet1_1-b8a52dc0.pth"):
            tta.models.get_model("squeezenet1_1", weights="DEFAULT")
        torch.manual_seed(5)
        reference = torchvision.models.squeezenet1_1()
        expected_file.parent.mkdir(parents=True)
        torch.save(reference.state_dict(), expected_file)
        for weights in ("DEFAULT", "IMAGENET1K_V1", "SqueezeNet1_1_Weights.IMAGENET1K_V1", expected_file):
            model = tta.models.get_model("squeezenet1_1", weights=weights)
            assert torch.equal(model.model.features[0].weight, reference.features[0].weight)
        with pytest.raises(ValueError, match="unknown weights 'IMAGENET1K_V9'.*IMAGENET1K_V1"):
            tta.models.get_model("squeezenet1_1", weights="IMAGENET1K_V9")
        with pytest.raises(ValueError, match="3 input channels, got in_channels=1"):
            tta.models.get_model("squeezenet1_1", in_channels=1)
        with pytest.raises(FileNotFoundError, match="weights file not found"):
            tta.models.get_model("squeezenet1_1", weights=tmp_path / "missing.pth")
    finally:
        torch.hub.set_dir(str(Path.home() / ".cache" / "torch" / "hub"))


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_is_atomic(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3)}
    path = save_checkpoint({"state_dict": state, "accuracy": 0.5}, tmp_path / "sub" / "c.pt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], state["w"]) and loaded["accuracy"] == 0.5
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temp file left behind


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")

    html = tmp_path / "Standard.pt"
    html.write_text("<!DOCTYPE html>\n<html><head><title>Google Drive - Virus scan warning</title>")
    with pytest.raises(CheckpointError, match="is an HTML page, not a checkpoint: the download probably failed"):
        load_checkpoint(html)
    (tmp_path / "h2.pt").write_bytes(b"\n  <html><body>404</body></html>")
    with pytest.raises(CheckpointError, match="HTML page"):
        load_checkpoint(tmp_path / "h2.pt")

    full = save_checkpoint({"w": torch.randn(64, 64)}, tmp_path / "full.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)

    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")

    # a pickle that would run code is refused, never executed
    evil = tmp_path / "evil.pt"
    torch.save({"f": shutil.rmtree}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(evil)


def test_extract_state_dict_layouts():
    w = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    assert extract_state_dict(w).keys() == w.keys()
    assert extract_state_dict({"state_dict": w, "epoch": 3}).keys() == w.keys()
    assert extract_state_dict({"model_state_dict": {"module." + k: v for k, v in w.items()}}).keys() == w.keys()
    with pytest.raises(CheckpointError, match="no state_dict found"):
        extract_state_dict({"epoch": 3, "config": {}})


# ---------------------------------------------------------------- the shipped model

def _shipped(name: str):
    stem = PRETRAINED[name]
    pt, meta = PRETRAINED_DIR / f"{stem}.pt", PRETRAINED_DIR / f"{stem}.json"
    mark = pytest.mark.skipif(
        not (pt.is_file() and meta.is_file()),
        reason=f"the shipped model is not there yet ({pt}); train it with scripts/train_source.py "
        "and export it with scripts/export_pretrained.py",
    )
    return pytest.param(name, pt, meta, marks=mark, id=name)


SHIPPED = [_shipped(name) for name in sorted(PRETRAINED)]


def test_load_pretrained_unknown_name():
    with pytest.raises(ValueError, match="unknown pretrained model 'cifar10'.*fashion_mnist"):
        tta.models.load_pretrained("cifar10")


@pytest.mark.parametrize("name,pt,meta", SHIPPED)
def test_shipped_model_metadata_and_load(name, pt, meta):
    info = json.loads(meta.read_text())
    assert info["sha256"] == sha256_of(pt)
    assert pt.stat().st_size <= 5 * 2**20
    assert info["tta"]["test_accuracy"] >= 0.93
    state = load_checkpoint(pt)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    model = tta.models.load_pretrained(name)
    assert not model.training and isinstance(model, ResNet)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name,pt,meta", SHIPPED[:1])
def test_load_pretrained_refuses_a_modified_file(tmp_path, name, pt, meta):
    shutil.copy(meta, tmp_path)
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / pt.name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 .* records .*corrupt or was replaced"):
        tta.models.load_pretrained(name, directory=tmp_path)
    (tmp_path / pt.name).unlink()
    with pytest.raises(FileNotFoundError, match=f"weights of pretrained model '{name}' not found"):
        tta.models.load_pretrained(name, directory=tmp_path)


@pytest.fixture(scope="module")
def fashion_mnist_test():
    import tta.data
    from tta.training import dataset_tensors

    try:
        test_set = tta.data.get_dataset("fashion_mnist", split="test")
    except (FileNotFoundError, RuntimeError) as exc:
        pytest.skip(f"Fashion-MNIST test set not available (install the Debian package dataset-fashion-mnist): {exc}")
    return dataset_tensors(test_set)


@pytest.mark.slow
@pytest.mark.parametrize("name,pt,meta", SHIPPED)
def test_shipped_model_reaches_its_stated_accuracy_on_fashion_mnist(name, pt, meta, fashion_mnist_test):
    from tta.training import evaluate

    images, targets = fashion_mnist_test
    assert images.shape == (10000, 1, 28, 28)
    model = tta.models.load_pretrained(name)
    accuracy = evaluate(model, images, targets, batch_size=1000)
    stated = tta.models.model_info(model)["test_accuracy"]
    assert stated == json.loads(meta.read_text())["tta"]["test_accuracy"]
    assert accuracy >= 0.93
    assert abs(accuracy - stated) <= 0.002  # recorded on the training GPU; CPU numerics differ slightly
