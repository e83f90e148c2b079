"""The gradient methods swept with ``-m`` through the joblib launcher (``hydra/launcher=local``):
``adapt=tent,eata,cotta`` on digits with the small ResNet-8, every job finished with its
hyper-parameters and throughput in results.json (a subprocess sweep, tens of seconds).

Per-method settings cannot be given in one multirun (``adapt.fisher_images=8`` would be an
unknown key of ``tent``), so the sweep adds a config directory (``hydra.searchpath``) with two
members of the ``adapt`` group that extend ``eata`` and ``cotta`` with tiny settings.
"""
from __future__ import annotations

import pytest

import tta
from test_evaluation_app import evaluate, results

SMALL = ["dataset=digits", "model=resnet8", "+model.kwargs.width=8", "corruption.names=[fog]",
         "corruption.severities=[1]", "num_examples=8", "batch_size=8", "progress=false", "num_threads=1"]

TINY = {  # adapt group member -> (method, its tiny settings)
    "eata_tiny": ("eata", {"fisher_images": 8, "fisher_batch_size": 8}),
    "cotta_tiny": ("cotta", {"num_augmentations": 2}),
}


@pytest.mark.slow
def test_gradient_methods_sweep_through_the_joblib_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    conf = tmp_path / "conf" / "adapt"
    conf.mkdir(parents=True)
    for member, (method, settings) in TINY.items():
        lines = ["defaults:", f"  - {method}", "  - _self_", *(f"{k}: {v}" for k, v in settings.items())]
        (conf / f"{member}.yaml").write_text("\n".join(lines) + "\n")
    sweep = tmp_path / "sweep"
    done = evaluate(["-m", "hydra/launcher=local", "adapt=tent,eata_tiny,cotta_tiny", *SMALL,
                     f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {r["method"]: r for r in results(sweep).values()}
    assert sorted(runs) == ["cotta", "eata", "tent"]
    expected = {"tent": {}, **dict(TINY.values())}
    for method, run in runs.items():
        assert run["status"] == "ok", method
        params = run["params"]
        assert set(params) == set(tta.methods.get_method(method).defaults()), method
        for key, value in expected[method].items():
            assert params[key] == value, (method, key)
        assert params["optimizer"] == "adam" and params["steps"] == 1  # the reference defaults
        assert run["images_per_second"] > 0, method
        assert run["cells"][0]["num_examples"] == 8
        assert 0.0 <= run["cells"][0]["accuracy"] <= 1.0
