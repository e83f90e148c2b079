"""Label-free diagnosis, accuracy estimation and prior choice (tta.label_free).

Numbers are checked against independent float64 computations: numerical integration of the
KL divergence and of the quantile form of W2, numpy formulas written out here, and a
synthetic classifier whose probability of being right is known per sample.
"""
from __future__ import annotations

import functools
import math

import matplotlib
import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

import tta
from tta.label_free import (AccuracyEstimator, CumulativeBlend, OnlinePriorSelector, diagnose,
                            fit_accuracy_estimator, select_prior)
from tta.label_free.diagnosis import symmetric_kl, wasserstein2
from tta.label_free.prior import prior_estimate, snap_prior
from tta.label_free._observe import observe

matplotlib.use("Agg")


# ----------------------------------------------------------------------------- helpers
class Net(nn.Module):
    """conv -> BN(a) -> relu -> conv -> BN(b) -> pool -> linear, with the BNs registered in
    reverse forward order (so forward order must come from the pass, not from modules())."""

    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn_late = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn_early = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = torch.relu(self.bn_early(self.conv1(x)))
        x = self.bn_late(self.conv2(x))
        return self.fc(x.mean((2, 3)))


@functools.lru_cache(maxsize=1)
def _trained_state() -> dict:
    net = Net()
    net.train()
    with torch.no_grad():
        for _ in range(150):  # momentum 0.1: the running statistics converge (0.9^150 ~ 1e-7)
            net(torch.rand(64, 1, 8, 8))
    return net.state_dict()


def _trained_net() -> Net:
    """A small net whose running statistics are those of U(0, 1) images (a fresh copy)."""
    net = Net()
    net.load_state_dict(_trained_state())
    return net.eval()


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class NoLabels(tuple):
    """An (input, target) batch whose target must never be read."""

    def __getitem__(self, index):
        if index != 0:
            raise AssertionError(f"a target label was read (index {index!r})")
        return tuple.__getitem__(self, 0)

    def __iter__(self):
        raise AssertionError("the batch was unpacked (a target label was read)")


class NoLabelsDataset(torch.utils.data.Dataset):
    """Yields images only; reading its labels raises."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    @property
    def targets(self):
        raise AssertionError("dataset labels were read")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


# ----------------------------------------------------------------------------- divergences
@pytest.mark.parametrize("m1,v1,m2,v2", [(0.0, 1.0, 0.0, 1.0), (0.3, 2.0, -0.5, 0.7), (2.0, 0.25, 1.0, 4.0)])
def test_symmetric_kl_and_w2_match_numerical_integration(m1, v1, m2, v2):
    p, q = stats.norm(m1, math.sqrt(v1)), stats.norm(m2, math.sqrt(v2))
    lo, hi = min(m1, m2) - 12 * math.sqrt(max(v1, v2)), max(m1, m2) + 12 * math.sqrt(max(v1, v2))
    kl_pq = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi, limit=200)[0]
    kl_qp = integrate.quad(lambda x: q.pdf(x) * (q.logpdf(x) - p.logpdf(x)), lo, hi, limit=200)[0]
    # W2 between two 1-D laws: the L2 distance of their quantile functions.
    w2 = math.sqrt(integrate.quad(lambda u: (p.ppf(u) - q.ppf(u)) ** 2, 0, 1, limit=200)[0])
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    assert symmetric_kl(t(m1), t(v1), t(m2), t(v2)).item() == pytest.approx(kl_pq + kl_qp, rel=1e-6, abs=1e-9)
    assert wasserstein2(t(m1), t(v1), t(m2), t(v2)).item() == pytest.approx(w2 / math.sqrt(v2), rel=1e-5, abs=1e-7)


def test_diagnose_layers_match_float64_moments_in_forward_order():
    net = _trained_net()
    torch.manual_seed(1)
    x = torch.rand(40, 1, 8, 8) * 2 + 0.5  # shifted and rescaled input
    diag = diagnose(net, x.split(16), progress=False)
    assert list(diag.layers) == ["bn_early", "bn_late"]  # forward order, not registration order
    # Independent: each BN input under the source (eval) model, float64 moments by numpy.
    with torch.no_grad():
        a = net.conv1(x).double().numpy()
        b = net.conv2(torch.relu(net.bn_early(net.conv1(x)))).double().numpy()
    for name, inp, bn in [("bn_early", a, net.bn_early), ("bn_late", b, net.bn_late)]:
        mean, var = inp.mean((0, 2, 3)), inp.var((0, 2, 3))
        src_m, src_v = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
        v1, v2 = var + bn.eps, src_v + bn.eps
        kl = np.mean(0.5 * (v1 / v2 + v2 / v1) - 1 + 0.5 * (mean - src_m) ** 2 * (1 / v1 + 1 / v2))
        w2 = np.mean(np.sqrt((mean - src_m) ** 2 + (np.sqrt(v1) - np.sqrt(v2)) ** 2) / np.sqrt(v2))
        assert diag.kl[name] == pytest.approx(kl, rel=1e-6)
        assert diag.w2[name] == pytest.approx(w2, rel=1e-6)
    assert diag.score == diag.kl["bn_late"]  # default: the last layer's symmetric KL
    assert diagnose(net, x.split(16), aggregate="mean", divergence="w2").score == pytest.approx(
        np.mean(list(diag.w2.values())))
    assert len(diag.batch_scores) == 3 and diag.num_samples == 40


def test_diagnose_score_is_small_on_source_data_and_grows_with_the_shift():
    net = _trained_net()
    torch.manual_seed(2)
    clean = torch.rand(256, 1, 8, 8)
    scores = [diagnose(net, (clean * (1 - s) + s).split(64)).score for s in (0.0, 0.2, 0.5)]
    assert scores[0] < 0.02 and scores[0] < scores[1] < scores[2]


def test_diagnosis_prints_a_table_and_plots():
    diag = diagnose(_trained_net(), [torch.rand(16, 1, 8, 8) + 1])
    text = str(diag)
    assert "shift score" in text and "bn_early" in text and "bn_late" in text and f"{diag.kl['bn_late']:.4f}" in text
    ax = diag.plot()
    assert len(ax.patches) == 4 and [t.get_text() for t in ax.get_xticklabels()] == ["bn_early", "bn_late"]
    assert diag.top(1)[0][1] == max(diag.layers.values())
    assert diag.to_dict()["layers"] == diag.layers


def test_bad_arguments_are_refused_before_anything_runs():
    net = _trained_net()
    x = torch.rand(8, 1, 8, 8)
    with pytest.raises(TypeError, match="single tensor"):
        diagnose(net, x)
    with pytest.raises(ValueError, match="divergence must be one of"):
        diagnose(net, [x], divergence="js")
    with pytest.raises(ValueError, match="no .*batch"):
        diagnose(net, [])
    with pytest.raises(ValueError, match="no BatchNorm"):
        diagnose(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), [x])
    for bad in ([], [-1.0], [float("nan")]):
        with pytest.raises(ValueError, match="candidate|empty"):
            select_prior(net, [x], candidates=bad)
    with pytest.raises(ValueError, match="scale"):
        select_prior(net, [x], scale=0)
    with pytest.raises(ValueError, match="method must be one of"):
        fit_accuracy_estimator(net, [(x, torch.zeros(8, dtype=torch.long))], method="doc")
    with pytest.raises(ValueError, match="unknown corruption"):
        fit_accuracy_estimator(net, [(x, torch.zeros(8, dtype=torch.long))], corruptions=["rain"])
    with pytest.raises(TypeError, match=r"\(input, target\)"):
        fit_accuracy_estimator(net, [x])


# ----------------------------------------------------------------------------- no state leaks
def test_passes_restore_the_model_also_on_errors():
    net = tta.convert(_trained_net(), stats="blend", prior=4)
    net.train()
    before, configs = _state(net), [m.stats_config() for m in tta.surgery.adaptive_layers(net)]

    def failing():
        yield torch.rand(8, 1, 8, 8) + 1
        raise RuntimeError("data broke")

    with pytest.raises(RuntimeError, match="data broke"):
        observe(net, failing(), configured_pass=True)
    observe(net, [torch.rand(8, 1, 8, 8) + 1], configured_pass=True)
    assert _same_state(before, _state(net))
    assert [m.stats_config() for m in tta.surgery.adaptive_layers(net)] == configs
    assert all(m.training for m in net.modules())


def test_batch_pass_equals_batch_statistics_and_configured_pass_equals_the_model():
    net = tta.convert(_trained_net(), stats="blend", prior=4)
    x = torch.rand(16, 1, 8, 8) + 0.5
    obs = observe(net, [x], configured_pass=True)
    with torch.no_grad():
        configured = net(x)
        with tta.use_stats(net, "batch"):
            batch = net(x)
        with tta.use_stats(net, "source"):
            source = net(x)
    torch.testing.assert_close(obs.logits[0], configured)
    torch.testing.assert_close(obs.batch_logits[0], batch, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(obs.source_logits[0], source)


# ----------------------------------------------------------------------------- no target label is read
def test_no_target_label_is_ever_read():
    net = _trained_net()
    images = torch.rand(32, 1, 8, 8) + 0.3
    batches = [NoLabels((x, torch.zeros(len(x)))) for x in images.split(8)]
    loader = torch.utils.data.DataLoader(NoLabelsDataset(images), batch_size=8)
    labelled = [(x, torch.randint(0, 4, (len(x),))) for x in torch.rand(64, 1, 8, 8).split(16)]
    estimator = fit_accuracy_estimator(net, labelled, corruptions=())
    for data in (batches, loader):
        diagnose(net, data)
        select_prior(net, data, online=True)
        assert 0.0 <= estimator(net, data) <= 1.0


# ----------------------------------------------------------------------------- accuracy estimator
class Scalar(nn.Module):
    """Image (N, 1, H, W) of constant value a -> logits (a, -a): P(class 0) = sigmoid(2a), the
    same with source or batch statistics (the BatchNorm only feeds a zero-weight side path)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(1).eval()

    def forward(self, x):
        a = x.mean((1, 2, 3)) + 0.0 * self.bn(x).mean((1, 2, 3))
        return torch.stack([a, -a], 1)


def _constant_images(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()


def _confidence(a: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-2 * np.abs(np.float32(a).astype(np.float64))))


def _labels(a: np.ndarray, p_right: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    pred = np.where(a > 0, 0, 1)
    return torch.from_numpy(np.where(rng.random(len(a)) < p_right, pred, 1 - pred))


def test_atc_against_its_definition():
    rng = np.random.default_rng(0)
    a_val, a_target = rng.uniform(-3, 3, 2000), rng.uniform(-1.5, 1.5, 1000)
    labels = _labels(a_val, np.full(2000, 0.8), rng)
    model = Scalar()
    atc = fit_accuracy_estimator(model, list(zip(_constant_images(a_val).split(100), labels.split(100))), method="atc")
    # Independent: the score is -entropy (decreasing in |a|); the threshold leaves
    # round(accuracy * n) clean samples above it; the estimate counts target samples above it.
    clean_accuracy = np.mean(np.where(a_val > 0, 0, 1) == labels.numpy())
    conf = _confidence
    neg_entropy = lambda a: conf(a) * np.log(conf(a)) + (1 - conf(a)) * np.log(1 - conf(a))  # noqa: E731
    threshold = np.sort(neg_entropy(a_val))[::-1][int(round(clean_accuracy * 2000))]
    expected = np.mean(neg_entropy(a_target) > threshold)
    assert atc(model, _constant_images(a_target).split(100)) == pytest.approx(expected, abs=2.5e-3)
    assert atc(model, _constant_images(a_val).split(100)) == pytest.approx(clean_accuracy, abs=2.5e-3)


def test_agreement_estimator_on_a_classifier_with_known_confidence_distribution():
    """Labels drawn so that P(prediction right) = sigmoid(4 confidence - 2.5) exactly (a
    logistic law of the features: the estimator's model is well specified); under shifts of
    the confidence distribution the estimate must follow the known expected accuracy."""
    rng = np.random.default_rng(0)
    model = Scalar()
    p_right = lambda a: 1 / (1 + np.exp(-(4 * _confidence(a) - 2.5)))  # noqa: E731
    a_val = rng.uniform(-2.5, 2.5, 20000)
    labels = _labels(a_val, p_right(a_val), rng)
    estimator = fit_accuracy_estimator(model, list(zip(_constant_images(a_val).split(1000), labels.split(1000))),
                                       corruptions=())
    for low, high in [(-0.5, 0.5), (-2.5, 2.5), (1.0, 2.5)]:
        a = rng.uniform(low, high, 5000)
        estimate = estimator(model, _constant_images(a).split(1000))
        assert estimate == pytest.approx(np.mean(p_right(a)), abs=0.01), (low, high)


def test_estimate_reports_source_batch_and_configured_and_refuses_unfitted_configs(tmp_path):
    net = tta.convert(_trained_net(), stats="source")
    labelled = [(x, torch.randint(0, 4, (len(x),))) for x in torch.rand(64, 1, 8, 8).split(16)]
    estimator = fit_accuracy_estimator(net, labelled, corruptions=())
    target = (torch.rand(32, 1, 8, 8) + 1).split(16)
    calls = []
    handle = net.register_forward_hook(lambda *args: calls.append(1))
    result = estimator.estimate(net, target)
    handle.remove()
    assert len(calls) == 2 * 2  # two passes per batch give diagnosis + both estimates
    assert set(result.accuracy) == {"source", "batch"} and result.diagnosis is not None
    assert len(result.batch_accuracy["batch"]) == 2
    assert np.mean(result.batch_accuracy["source"]) == pytest.approx(result.accuracy["source"])
    tta.set_stats(net, "blend", prior=16)
    with pytest.raises(ValueError, match="fitted for the configurations"):
        estimator(net, target)
    path = tmp_path / "est.json"
    estimator.save(path)
    again = AccuracyEstimator.load(path)
    tta.set_stats(net, "batch")
    assert again(net, target) == estimator(net, target)


# ----------------------------------------------------------------------------- prior choice
def test_prior_estimate_matches_the_empirical_bayes_formula():
    net = _trained_net()
    torch.manual_seed(3)
    x = torch.rand(48, 1, 8, 8) * 1.5 + 0.2
    obs = observe(net, x.split(12), batch_pass=False)
    # Independent float64 computation from each BN layer's input.
    with torch.no_grad():
        inputs = {"bn_early": net.conv1(x), "bn_late": net.conv2(torch.relu(net.bn_early(net.conv1(x))))}
    noise = bias = 0.0
    for name, inp in inputs.items():
        z = inp.double().numpy()
        bn = getattr(net, name)
        k = z.shape[0]
        var = z.var((0, 2, 3)) + bn.eps
        per_sample = z.mean((2, 3))
        v = per_sample.var(0, ddof=1) / var
        noise += v.sum()
        bias += ((bn.running_mean.double().numpy() - z.mean((0, 2, 3))) ** 2 / var).sum() - v.sum() / k
    assert prior_estimate(obs, scale=1.0) == pytest.approx(noise / bias, rel=1e-6)
    assert prior_estimate(obs, scale=4.0) == pytest.approx(4 * noise / bias, rel=1e-6)


def test_snapping_and_online_choices_use_only_past_batches():
    assert snap_prior(0.2) == 0 and snap_prior(3.0) == 4 and snap_prior(20) == 16 and snap_prior(1500) == 1024
    assert snap_prior(2048) == math.inf and snap_prior(math.inf) == math.inf
    assert snap_prior(1e9, candidates=(0, 8)) == 8
    net = _trained_net()
    batches = list((torch.rand(40, 1, 8, 8) * 1.3 + 0.1).split(8))
    online = select_prior(net, batches, online=True)
    assert online == [select_prior(net, batches[: i + 1]) for i in range(len(batches))]
    selector = OnlinePriorSelector(net)
    assert [selector.step(x) for x in batches] == online


def test_no_shift_gives_source_statistics():
    net = _trained_net()
    torch.manual_seed(4)
    # Source-like data: the distribution the running statistics were collected on.
    assert select_prior(net, torch.rand(512, 1, 8, 8).split(64)) >= 256


def test_select_prior_on_clean_fashion_mnist_keeps_the_source_accuracy():
    model = tta.models.load_pretrained("fashion_mnist")
    data = tta.data.get_dataset("fashion_mnist", split="test")
    x, y = data.images[:320].float() / 255, data.targets[:320]
    converted = tta.convert(tta.models.load_pretrained("fashion_mnist"), stats="source")
    with torch.no_grad():
        source = (model(x).argmax(1) == y).float().mean().item()
        for batch_size in (8, 64):
            batches = x.split(batch_size)
            priors = select_prior(model, batches, online=True)
            right = 0
            for xb, yb, prior in zip(batches, y.split(batch_size), priors):
                stats = {"stats": "source"} if prior == math.inf else {"stats": "blend", "prior": prior}
                with tta.use_stats(converted, **stats):
                    right += (converted(xb).argmax(1) == yb).sum().item()
            assert right / len(y) >= source - 0.005, (batch_size, priors)


def _one_bn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(108, 4))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net.eval()


def test_cumulative_blend_pools_the_segment_and_resets():
    net = _one_bn()
    batches = list((torch.rand(24, 1, 8, 8) * 2).split(8))
    before = _state(net)
    adapt = CumulativeBlend(net, prior=0)
    outputs = [adapt(x) for x in batches]
    assert _same_state(before, _state(net))
    with torch.no_grad():
        # Batch t is normalised with the exact statistics of batches 1..t (AdaBN on them).
        for t in (0, 2):
            expected = tta.recalibrate(_one_bn(), [torch.cat(batches[: t + 1])])(batches[t])
            torch.testing.assert_close(outputs[t], expected, rtol=1e-4, atol=1e-5)
        adapt.reset()
        expected = tta.recalibrate(_one_bn(), [batches[2]])(batches[2])
        torch.testing.assert_close(adapt(batches[2]), expected, rtol=1e-4, atol=1e-5)
        # With prior=inf the source statistics: the model itself.
        torch.testing.assert_close(CumulativeBlend(net, prior=math.inf)(batches[0]), net(batches[0]))


def test_diagnose_script_on_an_unlabelled_folder(tmp_path, capsys):
    import importlib.util

    from PIL import Image

    data = tta.data.get_dataset("fashion_mnist", split="test")
    folder = tmp_path / "images"
    folder.mkdir()
    shifted = tta.corrupt(data.images[:48], "fog", 3, seed=0)
    for i, image in enumerate(shifted):
        Image.fromarray(image[0].numpy()).save(folder / f"{i:03d}.png")
    model = tta.models.load_pretrained("fashion_mnist")
    x, y = data.images[5000:5064].float() / 255, data.targets[5000:5064]
    estimator = fit_accuracy_estimator(model, list(zip(x.split(16), y.split(16))), corruptions=())
    estimator.save(tmp_path / "estimator.json")
    spec = importlib.util.spec_from_file_location("diagnose_script", "scripts/diagnose.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--data", str(folder), "--batch-size", "16", "--estimator", str(tmp_path / "estimator.json"),
                 "--plot", str(tmp_path / "diag.png")])
    out = capsys.readouterr().out
    expected = diagnose(model, (script._folder_images(folder, 1, None).float() / 255).split(16))
    assert "48 images" in out and f"shift score {expected.score:.4f}" in out
    assert "before adaptation" in out and "after adaptation" in out and "select_prior" in out
    assert (tmp_path / "diag.png").stat().st_size > 0
