"""RobustBench checkpoints load strictly: key lists written out here from RobustBench's model
definitions (robustbench/model_zoo/cifar10.py, cifar100.py, imagenet.py,
architectures/{wide_resnet,resnext,utils_architectures}.py), nested and prefixed layouts, and
wrong checkpoints refused with errors that name the problem."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import tta
from tta.models import CheckpointError, load_weights



@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (restored afterwards): on a loaded 2-core machine two threads of
    these small convolutions spin against each other (4 s instead of 0.04 s per forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def robustbench_wrn_keys(depth: int, k: int, num_classes: int, mu_sigma: bool) -> dict[str, tuple[int, ...]]:
    """RobustBench's WideResNet(depth, widen_factor=k, sub_block1=False) (+ mu/sigma of the AugMix
    subclass): conv1, block{1,2,3}.layer.i.{bn1,conv1,bn2,conv2[,convShortcut]}, bn1, fc."""
    keys: dict[str, tuple[int, ...]] = {}
    if mu_sigma:
        keys |= {"mu": (1, 3, 1, 1), "sigma": (1, 3, 1, 1)}
    keys["conv1.weight"] = (16, 3, 3, 3)
    channels = [16, 16 * k, 32 * k, 64 * k]
    for b in range(3):
        for i in range((depth - 4) // 6):
            cin, cout = (channels[b] if i == 0 else channels[b + 1]), channels[b + 1]
            p = f"block{b + 1}.layer.{i}"
            keys |= _bn(f"{p}.bn1", cin)
            keys[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
            keys |= _bn(f"{p}.bn2", cout)
            keys[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            if cin != cout:
                keys[f"{p}.convShortcut.weight"] = (cout, cin, 1, 1)
    keys |= _bn("bn1", channels[3])
    keys |= {"fc.weight": (num_classes, channels[3]), "fc.bias": (num_classes,)}
    return keys


def robustbench_resnext_keys(num_classes: int) -> dict[str, tuple[int, ...]]:
    """RobustBench's Hendrycks2020AugMixResNeXtNet: mu, sigma, conv_1_3x3, bn_1,
    stage_{1,2,3}.i.{conv_reduce,bn_reduce,conv_conv,bn,conv_expand,bn_expand[,downsample.0/1]},
    classifier; depth 29 (3 blocks), cardinality 4, base_width 32."""
    keys: dict[str, tuple[int, ...]] = {"mu": (1, 3, 1, 1), "sigma": (1, 3, 1, 1),
                                        "conv_1_3x3.weight": (64, 3, 3, 3)}
    keys |= _bn("bn_1", 64)
    inplanes = 64
    for s, planes in enumerate((64, 128, 256)):
        width = (planes * 32 // 64) * 4
        for i in range(3):
            p = f"stage_{s + 1}.{i}"
            keys[f"{p}.conv_reduce.weight"] = (width, inplanes, 1, 1)
            keys |= _bn(f"{p}.bn_reduce", width)
            keys[f"{p}.conv_conv.weight"] = (width, width // 4, 3, 3)
            keys |= _bn(f"{p}.bn", width)
            keys[f"{p}.conv_expand.weight"] = (planes * 4, width, 1, 1)
            keys |= _bn(f"{p}.bn_expand", planes * 4)
            if i == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                keys |= _bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    keys |= {"classifier.weight": (num_classes, 1024), "classifier.bias": (num_classes,)}
    return keys


def _random_state(keys: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key in ("mu", "sigma"):
            state[key] = torch.full(shape, 0.5)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


CASES = {  # registered name, kwargs, RobustBench keys (with mu/sigma where its definition has them)
    "Standard (cifar10)": ("wide_resnet28_10", {"num_classes": 10}, lambda: robustbench_wrn_keys(28, 10, 10, False)),
    "Hendrycks2020AugMix_WRN (cifar10)": ("wide_resnet40_2", {"num_classes": 10}, lambda: robustbench_wrn_keys(40, 2, 10, True)),
    "Hendrycks2020AugMix_WRN (cifar100)": ("wide_resnet40_2", {"num_classes": 100}, lambda: robustbench_wrn_keys(40, 2, 100, True)),
    "Hendrycks2020AugMix_ResNeXt (cifar100)": ("resnext29_32x4d", {"num_classes": 100}, lambda: robustbench_resnext_keys(100)),
    "Hendrycks2020AugMix_ResNeXt (cifar10)": ("resnext29_32x4d", {"num_classes": 10}, lambda: robustbench_resnext_keys(10)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_keys_and_shapes_are_robustbenchs(case):
    name, kwargs, keys = CASES[case]
    state = tta.models.get_model(name, **kwargs).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == keys()


LAYOUTS = ["bare", "state_dict", "model", "module", "nested_module", "no_mu_sigma"]


@pytest.mark.parametrize("case,layout", [(c, l) for c in CASES for l in LAYOUTS
                                         if not c.startswith("Standard") or l == "nested_module"])
def test_checkpoint_layouts_load_strictly(tmp_path, case, layout):
    name, kwargs, keys = CASES[case]
    state = _random_state(keys())
    if layout == "no_mu_sigma":  # RobustBench's released AugMix files lack them
        state = {k: v for k, v in state.items() if k not in ("mu", "sigma")}
    module = {f"module.{k}": v for k, v in state.items()}
    saved = {"bare": state, "state_dict": {"state_dict": state, "epoch": 3}, "model": {"model": state},
             "module": module, "nested_module": {"state_dict": module}, "no_mu_sigma": state}[layout]
    path = tmp_path / "ckpt.pt"
    torch.save(saved, path)
    model = tta.models.get_model(name, weights=str(path), **kwargs)
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    if "mu" in loaded:
        assert torch.equal(loaded["mu"], torch.full((1, 3, 1, 1), 0.5))


def test_augmix_models_normalise_with_half():
    torch.manual_seed(0)
    for model in (tta.models.get_model("wide_resnet40_2"), tta.models.get_model("resnext29_32x4d")):
        model = model.eval()
        x = torch.rand(1, 3, 32, 32)
        out = model(x)
        with torch.no_grad():
            model.mu.fill_(0.0), model.sigma.fill_(1.0)  # the bare network
        assert torch.allclose(out, model((x - 0.5) / 0.5), atol=1e-5)  # RobustBench: (x - mu) / sigma first


def test_resnext_forward_matches_a_functional_restatement():
    """RobustBench's CifarResNeXt.forward, written out with torch.nn.functional (float64)."""
    torch.manual_seed(0)
    model = tta.models.get_model("resnext29_32x4d", num_classes=10).double().eval()
    state = {k: v.double() if v.is_floating_point() else v for k, v in _random_state(robustbench_resnext_keys(10), 1).items()}
    model.load_state_dict(state)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)

    def bn(h, p):
        return torch.nn.functional.batch_norm(h, state[f"{p}.running_mean"], state[f"{p}.running_var"],
                                              state[f"{p}.weight"], state[f"{p}.bias"], False, 0.0, 1e-5)

    h = (x - 0.5) / 0.5
    h = torch.relu(bn(torch.nn.functional.conv2d(h, state["conv_1_3x3.weight"], padding=1), "bn_1"))
    for s in range(3):
        for i in range(3):
            p, stride = f"stage_{s + 1}.{i}", (2 if s > 0 and i == 0 else 1)
            b = torch.relu(bn(torch.nn.functional.conv2d(h, state[f"{p}.conv_reduce.weight"]), f"{p}.bn_reduce"))
            b = torch.relu(bn(torch.nn.functional.conv2d(b, state[f"{p}.conv_conv.weight"], stride=stride,
                                                         padding=1, groups=4), f"{p}.bn"))
            b = bn(torch.nn.functional.conv2d(b, state[f"{p}.conv_expand.weight"]), f"{p}.bn_expand")
            r = h if i else bn(torch.nn.functional.conv2d(h, state[f"{p}.downsample.0.weight"], stride=stride),
                               f"{p}.downsample.1")
            h = torch.relu(r + b)
    expected = torch.nn.functional.linear(torch.nn.functional.avg_pool2d(h, 8).flatten(1),
                                          state["classifier.weight"], state["classifier.bias"])
    assert torch.allclose(model(x), expected, atol=1e-10)


def test_imagenet_normalize_model_layout_loads_into_torchvision_resnets(tmp_path):
    """RobustBench's ImageNet models are normalize_model(torchvision model, mu, sigma): keys
    normalize.mean, normalize.std (persistent) and model.* (Standard_R50: resnet50;
    Salman2020Do_R18: resnet18, used here because it is smaller; same key scheme)."""
    reference = torchvision.models.resnet18()
    state = {"normalize.mean": torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
             "normalize.std": torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
             **{f"model.{k}": v for k, v in reference.state_dict().items()}}
    for i, saved in enumerate((state, {"state_dict": {f"module.{k}": v for k, v in state.items()}},
                               reference.state_dict())):
        path = tmp_path / f"r18_{i}.pt"
        torch.save(saved, path)
        model = tta.models.get_model("resnet18", weights=str(path))
        assert torch.equal(model.state_dict()["model.fc.weight"], reference.fc.weight)
    state["normalize.std"] = torch.ones(1, 3, 1, 1)  # another normalisation: refused, not ignored
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"normalize.std .*differs"):
        tta.models.get_model("resnet18", weights=str(tmp_path / "bad.pt"))


def test_wrong_checkpoints_are_refused_with_the_keys_named(tmp_path):
    wrn = robustbench_wrn_keys(40, 2, 10, True)
    torch.save(_random_state(wrn), tmp_path / "wrn40.pt")
    with pytest.raises(CheckpointError, match=r"wrn40.pt does not fit the CifarResNeXt.*missing keys \d+ \['bn_1"):
        tta.models.get_model("resnext29_32x4d", weights=str(tmp_path / "wrn40.pt"))
    with pytest.raises(CheckpointError, match=r"shape mismatches 2 \['fc.bias \(10,\) \(model: \(100,\)\)'"):
        load_weights(tta.models.get_model("wide_resnet40_2", num_classes=100), tmp_path / "wrn40.pt")
    state = _random_state(wrn)
    state["sigma"] = torch.full((1, 3, 1, 1), 0.25)
    with pytest.raises(ValueError, match=r"sigma \[0.25, 0.25, 0.25\] differs"):
        load_weights(tta.models.get_model("wide_resnet40_2"), state)
    state = _random_state(wrn)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys 1 \['extra.weight'\]"):
        load_weights(tta.models.get_model("wide_resnet40_2"), state)


def test_converted_model_keeps_robustbench_keys():
    model = tta.models.get_model("resnext29_32x4d")
    keys = list(model.state_dict())
    tta.convert(model, stats="batch")
    assert list(tta.revert(model).state_dict()) == keys
    assert isinstance(model, nn.Module)
