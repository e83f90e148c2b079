"""The state of an adapter and of the model it wraps: checks before any change, one owner per
model, empty batches, reset, state_dict round trips, tied parameters, and the number checks of
the core (float16 EMA estimate, huge numbers, NumPy scalars in tta.recalibrate). Expected
values come from plain torch models or float64 formulas written out here."""
from __future__ import annotations

import copy
import gc
import io
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.methods import adapt, list_methods
from tta.surgery import adaptive_layers

CLASSES = 4


def net(affine: bool = True, track: bool = True, seed: int = 0) -> nn.Module:
    """Two conv-BN-ReLU blocks, float64, non-trivial source statistics and affine parameters."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5, affine=affine, track_running_stats=track), nn.ReLU(),
        nn.Conv2d(5, 5, 3, padding=1), nn.BatchNorm2d(5, affine=affine, track_running_stats=track), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, CLASSES)).double()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            if track:
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
            if affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
    return model.eval()


def images(count: int, n: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(count)]


FISHER = images(1, n=8, seed=9)[0]
# every method, with arguments that keep it fast and make every batch change its state (every
# sample reliable and non-redundant, no SAR recovery); a new method must be added here
SELECT = {"margin_e0": 1.0, "d_margin": 1.0}
METHODS = {
    "source": {}, "batch": {}, "blend": {"prior": 4}, "ema": {"momentum": 0.3}, "recalibrate": {},
    "tent": {}, "eta": SELECT, "eata": {"fisher_images": FISHER, **SELECT},
    "sar": {"exclude_layers": (), "margin_e0": 1.0, "reset_constant": 0.0},
    "cotta": {"num_augmentations": 2, "ap": 1.0}, "dua": {"num_copies": 4},
}
# windows longer than a batch (6 images): earlier images are forwarded again
VARIANTS = [*METHODS.items(), ("batch", {"window": 8}), ("blend", {"prior": 2, "window": 10})]
GRADIENT = ["tent", "eta", "eata", "sar", "cotta"]


def test_every_method_is_covered():
    assert set(list_methods()) == set(METHODS)


def fingerprint(model: nn.Module) -> list:
    """Everything a method may change: module classes, train flags, requires_grad, parameters
    and buffers, adaptive layers' configuration."""
    return [[type(m) for m in model.modules()], [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [layer.stats_config() for layer in adaptive_layers(model)]]


def assert_same(a, b, where="state"):
    """Exact equality of nested dicts/lists/tuples of tensors and plain values."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def build(method: str, params: dict) -> tta.Adapter:
    return adapt(net(), method, **params)


def run(adapter: tta.Adapter, x: torch.Tensor) -> torch.Tensor:
    if adapter.name == "recalibrate":
        adapter.fit([x])
    return adapter(x)


# --- 1. every check before the first change ---------------------------------------------------

REFUSED = [
    ("tent", {}, {"affine": False}, "affine=False"),
    ("eta", {}, {"affine": False}, "affine=False"),
    ("eata", {"fisher_images": FISHER}, {"affine": False}, "affine=False"),
    ("sar", {}, {"affine": False}, "has none"),
    ("dua", {}, {"track": False}, "track_running_stats=False"),
    ("ema", {}, {"track": False}, "track_running_stats=False"),
    ("blend", {}, {"track": False}, "track_running_stats=False"),
    ("recalibrate", {}, {"track": False}, "track_running_stats=False"),
    ("batch", {"moments": "mean"}, {"track": False}, "track_running_stats=False"),
    ("cotta", {"seed": 2**64}, {}, r"seed must be an int >= 0 and < 2\*\*63, got 18446744073709551616"),
    ("cotta", {"seed": -1}, {}, "seed must be an int >= 0"),
    ("dua", {"seed": 2**63}, {}, r"seed must be an int >= 0 and < 2\*\*63"),
    ("blend", {"prior": 10**400}, {}, "prior must be a finite number"),
    ("tent", {"steps": 2**64}, {}, "steps must be an int >= 1 and < 2"),
]


@pytest.mark.parametrize("method, params, kind, message", REFUSED)
def test_bad_model_or_value_is_refused_before_any_change(method, params, kind, message):
    model = net(**kind).train()  # train mode: a premature model.eval() shows
    before = fingerprint(model)
    with pytest.raises(ValueError, match=message):
        adapt(model, method, **params)
    assert_same(fingerprint(model), before)


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"source"}))
def test_model_without_norm_layers_is_refused_before_any_change(method):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(CLASSES)).double().train()
    model(images(1)[0])  # materialise the lazy layer
    before = fingerprint(model)
    with pytest.raises(ValueError, match="BatchNorm|normalisation|has none"):
        adapt(model, method, **METHODS[method])
    assert_same(fingerprint(model), before)


# --- 2 and 9. an empty batch changes nothing -----------------------------------------------------

@pytest.mark.parametrize("method, params", VARIANTS, ids=[f"{m}-{'-'.join(p)}" for m, p in VARIANTS])
def test_empty_batch_returns_empty_logits_and_changes_nothing(method, params):
    x1, x2 = images(2)
    adapter, twin = build(method, params), build(method, params)
    run(adapter, x1), run(twin, x1)
    state, model = copy.deepcopy(adapter.state_dict()), fingerprint(adapter.model)
    out = adapter(x1[:0])
    assert out.shape == (0, CLASSES)
    assert_same(adapter.state_dict(), state)  # weights, statistics, optimizer, buffers, generators, counters
    assert_same(fingerprint(adapter.model), model)
    torch.testing.assert_close(adapter(x2), twin(x2), rtol=0, atol=0)  # as if it never came


# --- 3. source means source statistics ---------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("before", ["convert", "ema adapter", "recalibrate"])
def test_source_adapter_uses_the_source_statistics(before):
    x = images(1)[0]
    expected = net()(x)  # the plain torch model in eval mode
    model = net()
    if before == "convert":
        tta.convert(model, "batch")
    elif before == "ema adapter":
        adapt(model, "ema", momentum=0.5)(x)  # the adapter is gone after this line
    else:
        tta.convert(model, "blend")
        tta.recalibrate(model, [x])
    source = adapt(model, "source")
    assert all(layer.stats == "source" for layer in adaptive_layers(model))
    torch.testing.assert_close(source(x), expected, rtol=1e-12, atol=1e-12)


# --- 4. one adapter per model ------------------------------------------------------------------

@torch.no_grad()
def test_a_model_belongs_to_one_live_adapter():
    x1, x2 = images(2)
    model = net()
    first = adapt(model, "ema", momentum=0.5)
    reference = adapt(net(), "ema", momentum=0.5)
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"already wrapped by a live 'ema' adapter.*copy\.deepcopy.*release\(\)"):
        adapt(model, "batch")
    with pytest.raises(ValueError, match=r"module '0' is already wrapped"):
        adapt(nn.Sequential(model), "batch")
    with pytest.raises(ValueError, match=r"already a tta\.Adapter \(method 'ema'\)"):
        adapt(first, "tent")
    assert_same(fingerprint(model), before)
    torch.testing.assert_close(first(x1), reference(x1), rtol=0, atol=0)  # still EMA
    copied = adapt(copy.deepcopy(model), "batch")  # a copy is free
    copied(x2)
    torch.testing.assert_close(first(x2), reference(x2), rtol=0, atol=0)
    # release: the model may be adapted again, the old adapter refuses to run
    assert first.release() is model
    for call in (lambda: first(x1), first.reset):
        with pytest.raises(RuntimeError, match="released"):
            call()
    adapt(model, "batch")
    # deleting an adapter releases its model too
    other = net()
    adapter = adapt(other, "tent")
    del adapter
    gc.collect()
    adapt(other, "tent")


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda adapter: pickle.loads(pickle.dumps(adapter))}


@pytest.mark.parametrize("how", COPIES)
@torch.no_grad()
def test_a_copied_adapter_owns_its_copied_model(how):
    x1, x2 = images(2)
    first = adapt(net(), "ema", momentum=0.5)
    reference = adapt(net(), "ema", momentum=0.5)
    torch.testing.assert_close(first(x1), reference(x1), rtol=0, atol=0)
    copied = COPIES[how](first)
    assert copied.model is not first.model
    with pytest.raises(ValueError, match="already wrapped by a live 'ema' adapter"):
        adapt(copied.model, "source")
    with pytest.raises(ValueError, match="already wrapped by a live 'ema' adapter"):
        adapt(first.model, "source")  # the original keeps its own model
    torch.testing.assert_close(copied(x2), reference(x2), rtol=0, atol=0)  # still EMA
    # a copy of a released adapter is released too: its model is free, it refuses to run
    first.release()
    released = COPIES[how](first)
    adapt(released.model, "batch")
    with pytest.raises(RuntimeError, match="released"):
        released(x1)


def test_a_released_adapter_refuses_every_change():
    x = images(1)[0]
    model = net()
    old = adapt(model, "tent")
    old(x)
    state = copy.deepcopy(old.state_dict())
    assert old.release() is model
    new = adapt(model, "batch")
    with torch.no_grad():
        expected = new(x)
    before = fingerprint(model)
    calls = {"load_state_dict": lambda: old.load_state_dict(state), "to": lambda: old.to(torch.float32),
             "half": old.half, "float": old.float, "cpu": old.cpu, "share_memory": old.share_memory,
             "apply": lambda: old.apply(lambda m: m.train()), "requires_grad_": old.requires_grad_,
             "zero_grad": old.zero_grad, "reset": old.reset, "forward": lambda: old(x)}
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=r"'tent' adapter was released"):
            call()
        assert_same(fingerprint(model), before, name)
    old.train()  # the adapter's own flag only
    old.eval()
    assert_same(fingerprint(model), before, "train/eval")
    recalibrating = adapt(net(), "recalibrate")
    recalibrating.release()
    with pytest.raises(RuntimeError, match=r"'recalibrate' adapter was released"):
        recalibrating.fit([x])
    with torch.no_grad():
        torch.testing.assert_close(new(x), expected, rtol=0, atol=0)


def test_nested_adapt_is_refused_before_the_inner_adapter_steps():
    model = net()
    inner = adapt(model, "tent")
    weight = model[1].weight.detach().clone()
    with pytest.raises(ValueError, match="already a tta.Adapter"):
        adapt(inner, "tent")
    assert torch.equal(model[1].weight, weight)


# --- 5. reset restores flags, requires_grad and configuration; adapter.train() is harmless ------

def test_reset_restores_train_flags_requires_grad_and_stats_configuration():
    x = images(1)[0]
    with torch.no_grad():
        expected = net()(x)
    source = adapt(net(), "source")
    assert source.train() is source and source.training and not source.model.training
    torch.testing.assert_close(source(x), expected, rtol=0, atol=0)  # train() changed nothing
    source.model.train()  # the user switches the model itself: train-mode BatchNorm
    with torch.no_grad():
        source(x)
    assert not torch.equal(source.model[1].running_mean, net()[1].running_mean)
    source.reset()
    assert not source.model.training
    torch.testing.assert_close(source(x), expected, rtol=0, atol=0)

    tent = adapt(net(), "tent")
    fresh = adapt(net(), "tent")
    flags = fingerprint(tent.model)
    tent.model.train()
    tent.model[0].weight.requires_grad_(True)
    tta.set_stats(tent.model, "source")
    tent(x)
    tent.reset()
    assert_same(fingerprint(tent.model), flags)
    torch.testing.assert_close(tent(x), fresh(x), rtol=0, atol=0)


# --- 6. state_dict round trip --------------------------------------------------------------------

@pytest.mark.parametrize("method, params", VARIANTS, ids=[f"{m}-{'-'.join(p)}" for m, p in VARIANTS])
def test_state_dict_round_trip_continues_identically(method, params):
    xs = images(6, seed=3)
    saved = build(method, params)
    for x in xs[:3]:
        run(saved, x)
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    loaded = build(method, params)
    loaded.load_state_dict(state)
    for x in xs[3:]:
        torch.testing.assert_close(loaded(x), saved(x), rtol=0, atol=0)
    assert_same(loaded.state_dict(), saved.state_dict())


def test_state_dict_of_other_hyper_parameters_is_refused():
    saved = adapt(net(), "tent", lr=0.01)
    saved(images(1)[0])
    other = adapt(net(), "tent", lr=0.02)
    with pytest.raises(ValueError, match=r"hyper-parameters .*'lr': 0\.01.*'lr': 0\.02"):
        other.load_state_dict(saved.state_dict())
    assert other.optimizer.state_dict()["state"] == {}


@pytest.mark.parametrize("method, params", [("tent", {}), ("ema", {"momentum": 0.3})])
def test_state_dict_of_other_source_weights_is_refused(method, params):
    saved = adapt(net(seed=0), method, **params)
    run(saved, images(1)[0])
    other = adapt(net(seed=5), method, **params)
    before = fingerprint(other.model)
    optimizer = None if other.optimizer is None else copy.deepcopy(other.optimizer.state_dict())
    with pytest.raises(ValueError, match=r"other weights \(start_hash '(\w+)'\) than this one \(start_hash '(\w+)'\)") as error:
        other.load_state_dict(saved.state_dict())
    hashes = [m.group(1) for m in re.finditer(r"start_hash '(\w+)'", str(error.value))]
    assert hashes == [saved.start_hash(), other.start_hash()] and hashes[0] != hashes[1]
    assert_same(fingerprint(other.model), before)
    if optimizer is not None:
        assert_same(other.optimizer.state_dict(), optimizer)
    # the same source weights, on another adapter: accepted, and reset() returns to the common start
    same = adapt(net(seed=0), method, **params)
    same.load_state_dict(saved.state_dict())
    same.reset()
    assert_same(fingerprint(same.model), fingerprint(adapt(net(seed=0), method, **params).model))


# --- 7. float16 EMA estimate ---------------------------------------------------------------------

@torch.no_grad()
def test_half_ema_estimate_yields_to_buffers_written_through_data():
    bn = tta.AdaptiveBatchNorm2d(3).half().eval()
    bn.set_stats("ema", momentum=0.5)
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)).half()
    bn(x)
    bn.running_mean.data[0] = 3.0  # .data does not bump _version
    bn.running_var.data[0] = 1.0
    bn.set_stats("blend", alpha=0.0)  # normalise with the running statistics only
    x64 = x.double()
    mean = 0.5 * 0.0 + 0.5 * x64.mean((0, 2, 3))  # the float64 EMA estimate (source 0, 1)
    var = 0.5 * 1.0 + 0.5 * x64.var((0, 2, 3), unbiased=False)
    mean[0], var[0] = 3.0, 1.0
    out = bn(x).double()
    expected = (x64 - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-2)  # fp16 output (was off by 3.2 on channel 0)
    used_mean, used_var = bn._running_stats()  # channels 1, 2: still the float32 estimate
    torch.testing.assert_close(used_mean[1:].double(), mean[1:], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(used_var[1:].double(), var[1:], rtol=1e-6, atol=1e-7)


# --- 8. gradient methods are not built under inference mode ------------------------------------

@pytest.mark.parametrize("method", GRADIENT)
def test_gradient_methods_refuse_inference_mode_before_any_change(method):
    model = net()
    before = fingerprint(model)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=rf"{method} computes gradients.*inference_mode"):
        adapt(model, method, **METHODS[method])
    assert_same(fingerprint(model), before)


# --- 10. tied parameters -------------------------------------------------------------------------

def tied() -> nn.Module:
    model = net()
    model[4].weight = model[1].weight  # one Parameter in two BatchNorm layers
    return model


def batch_mode_reference(model: nn.Module) -> nn.Module:
    """A plain torch copy that normalises with batch statistics (train mode, no Dropout here)."""
    return copy.deepcopy(model).train()


def test_tied_parameter_takes_one_sgd_step():
    model, x, lr = tied(), images(1)[0], 0.1
    reference = batch_mode_reference(model)
    adapter = adapt(model, "tent", optimizer="sgd", lr=lr, momentum=0.0, nesterov=False)
    z = reference(x)
    loss = -(z.softmax(1) * z.log_softmax(1)).sum(1).mean()
    grad = torch.autograd.grad(loss, reference[1].weight)[0]  # both uses accumulated
    before = model[1].weight.detach().clone()
    adapter(x)
    torch.testing.assert_close(model[1].weight.detach(), before - lr * grad, rtol=1e-10, atol=1e-12)
    assert model[4].weight is model[1].weight


@pytest.mark.parametrize("method", GRADIENT)
def test_tied_parameter_is_optimised_once(method):
    adapter = adapt(tied(), method, **METHODS[method])
    params = [p for group in adapter.optimizer.param_groups for p in group["params"]]
    assert len({id(p) for p in params}) == len(params)


def test_eata_fisher_penalty_counts_a_tied_parameter_once():
    model, alpha = tied(), 2.0
    reference = batch_mode_reference(model)
    z = reference(FISHER)
    unique = [reference[1].weight, reference[1].bias, reference[4].bias]
    grads = torch.autograd.grad(F.cross_entropy(z, z.argmax(1)), unique)
    adapter = adapt(model, "eata", fisher_images=FISHER, fisher_alpha=alpha)
    assert len(adapter.params) == 3
    with torch.no_grad():
        for p in adapter.params:
            p.add_(0.1)
    expected = alpha * sum((g ** 2 * 0.01).sum() for g in grads)
    torch.testing.assert_close(adapter.regularizer().detach(), expected, rtol=1e-10, atol=1e-14)


# --- 11. huge numbers ----------------------------------------------------------------------------

def test_huge_numbers_raise_named_value_errors():
    with pytest.raises(ValueError, match="prior must be a finite number"):
        adapt(net(), "blend", prior=10**400)
    with pytest.raises(ValueError, match="momentum must be a finite number"):
        adapt(net(), "ema", momentum=-10**400)
    with pytest.raises(ValueError, match="num_augmentations must be an int"):
        adapt(net(), "cotta", num_augmentations=10**30)
    with pytest.raises(ValueError, match="prior must be a finite number >= 0"):
        tta.AdaptiveBatchNorm2d(3, stats="blend", prior=10**400)
    bn = tta.AdaptiveBatchNorm2d(3)
    with pytest.raises(ValueError, match="momentum must be a number in"):
        bn.set_stats("ema", momentum=10**400)
    assert bn.stats == "source"


# --- 12. NumPy scalars in tta.recalibrate ------------------------------------------------------

@torch.no_grad()
def test_recalibrate_takes_numpy_scalars():
    xs = images(3)
    model = net()
    tta.recalibrate(model, xs, max_batches=np.int64(2), exact=np.bool_(True))
    feats = net()[0](torch.cat(xs[:2]))  # the first layer's input over the two batches pulled
    torch.testing.assert_close(model[1].running_mean, feats.mean((0, 2, 3)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, feats.var((0, 2, 3), unbiased=True), rtol=1e-10, atol=1e-12)
    for bad in (np.int64(0), 10**30, 2.0):
        with pytest.raises(ValueError, match="max_batches must be a positive int"):
            tta.recalibrate(net(), xs, max_batches=bad)
