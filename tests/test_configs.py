"""Every config composes; every config group member names a registered component and every
registered component has a config."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

import tta
from tta.evaluation import get_stream, list_streams
from tta.evaluation.runner import SWEEP_KEYS
from tta.methods import get_method, list_methods
from tta.evaluation.pipeline import check_cells
from tta.models.shipped import PRETRAINED

CONF = Path(__file__).resolve().parents[1] / "conf"


def members(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="test"):
        yield


def load(group: str, member: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / group / f"{member}.yaml"))


def test_defaults_compose_to_the_embedded_benchmark(hydra_conf):
    cfg = compose(config_name="evaluate")
    assert cfg.dataset.name == "fashion_mnist" and cfg.model.pretrained == "fashion_mnist"
    assert list(cfg.corruption.names) == list(tta.CORRUPTIONS)
    assert list(cfg.corruption.severities) == [1, 2, 3, 4, 5]
    assert cfg.adapt.name == "source" and cfg.stream.name == "reset"
    assert cfg.model.in_channels == 1 and cfg.model.num_classes == 10  # from the dataset


def test_the_fixed_command_line_composes(hydra_conf):
    cfg = compose(config_name="evaluate", overrides=[
        "dataset=fashion_mnist", "adapt=blend", "adapt.prior=16", "stream=reset",
        "corruption.names=[fog,contrast]", "corruption.severities=[5]", "num_examples=1000",
        "batch_size=64"])
    assert cfg.adapt.prior == 16 and list(cfg.corruption.names) == ["fog", "contrast"]
    assert cfg.num_examples == 1000 and cfg.batch_size == 64


@pytest.mark.parametrize("group", ["dataset", "model", "corruption", "adapt", "stream"])
def test_every_member_composes(hydra_conf, group):
    for member in members(group):
        overrides = [f"{group}={member}"]
        if group == "dataset" and load("dataset", member)["num_classes"] == "???":
            overrides.append("dataset.num_classes=3")
        cfg = compose(config_name="evaluate", overrides=overrides)
        OmegaConf.to_container(cfg[group], resolve=True)  # interpolations resolve


def test_adapt_configs_match_the_method_registry(hydra_conf):
    assert members("adapt") == list_methods()
    for name in list_methods():
        config = OmegaConf.to_container(compose(config_name="evaluate", overrides=[f"adapt={name}"]).adapt,
                                        resolve=True)
        assert config.pop("name") == name
        defaults = get_method(name).defaults()
        # every hyper-parameter is in the config, nothing else but the sweep keys
        assert set(defaults) <= set(config) <= set(defaults) | set(SWEEP_KEYS)
        source_images = get_method(name).source_images
        for key, value in defaults.items():
            if key == source_images:  # an image count in the config, images in the library
                assert isinstance(config[key], int) and config[key] > 0
            elif key == "seed":  # follows the run's seed
                assert config[key] == 0
            else:  # the config's defaults are the method's (tuples are lists in YAML)
                assert config[key] == (list(value) if isinstance(value, tuple) else value), (name, key)


def test_stream_configs_match_the_stream_registry():
    assert members("stream") == sorted(list_streams())
    for name in list_streams():
        config = load("stream", name)
        assert config.pop("name") == name
        assert get_stream(name).params(config) == config == dict(get_stream(name).defaults)


def test_dataset_configs_match_the_dataset_registry():
    assert members("dataset") == sorted(tta.data.list_datasets())
    for name in members("dataset"):
        config = load("dataset", name)
        assert config["name"] == name
        if config["precorrupted"] and config["clean"] is not None:
            assert config["clean"] in tta.data.list_datasets()


def test_model_configs_match_the_model_registry():
    registered = set(tta.models.list_models())
    pretrained = {m: load("model", m)["pretrained"] for m in members("model")}
    assert {m for m, p in pretrained.items() if p is None} == registered
    for member, name in pretrained.items():
        config = load("model", member)
        assert config["name"] in registered
        if name is not None:
            assert member == name and name in PRETRAINED
    assert set(PRETRAINED) <= {p for p in pretrained.values() if p}


def test_corruption_configs_name_valid_corruptions():
    covered = set()
    for member in members("corruption"):
        config = load("corruption", member)
        check_cells(config["names"], config["severities"])  # raises on unknown names
        covered |= set(config["names"])
    assert covered == set(tta.CORRUPTIONS) | set(tta.EXTRA_CORRUPTIONS)
    assert load("corruption", "all")["names"] == list(tta.CORRUPTIONS)


LAUNCHERS = {"local": "joblib", "slurm": "submitit", "slurm_gpu": "submitit"}


def test_every_launcher_preset_is_tested():
    assert members("hydra/launcher") == sorted(LAUNCHERS)


@pytest.mark.parametrize("preset", sorted(LAUNCHERS))
def test_launcher_presets_compose(hydra_conf, preset):
    pytest.importorskip(f"hydra_plugins.hydra_{LAUNCHERS[preset]}_launcher")
    cfg = compose(config_name="evaluate", overrides=[f"hydra/launcher={preset}",
                                                     "hydra.sweep.dir=/tmp/sweep"],
                  return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert LAUNCHERS[preset] in launcher["_target_"].lower()


@pytest.mark.parametrize("preset,gpus", [("slurm", None), ("slurm_gpu", "1")])
def test_slurm_presets_ask_for_gpus_only_in_the_gpu_variant(hydra_conf, tmp_path, monkeypatch,
                                                             preset, gpus):
    """The sbatch script that hydra-submitit-launcher would submit: the CPU preset asks for no
    GPU (a CPU cluster rejects --gpus/--gres with "Invalid generic resource")."""
    submitit = pytest.importorskip("submitit")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra.utils import instantiate

    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit checks that srun exists
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cfg = compose(config_name="evaluate", overrides=[f"hydra/launcher={preset}",
                                                     f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                  return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    executors = []

    def submit(executor, *args, **kwargs):
        executors.append(executor)
        raise InterruptedError  # stop before sbatch

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit)
    with pytest.raises(InterruptedError):
        launcher.launch([["adapt=source"]], initial_job_idx=0)
    sbatch = executors[0]._executor._make_submission_file_text("python evaluate.py", "0")
    flags = [line.split()[1] for line in sbatch.splitlines() if line.startswith("#SBATCH")]
    assert not any(f.startswith(("--gres", "--export")) for f in flags), flags
    assert [f.split("=")[1] for f in flags if f.startswith("--gpus")] == ([gpus] if gpus else [])
    assert "--cpus-per-task=8" in flags and "--mem=32GB" in flags


def test_job_directories_are_named_by_escaped_overrides(hydra_conf):
    import tta.evaluation.sweeps  # noqa: F401  (registers the resolver, as evaluate.py does)

    cfg = compose(config_name="evaluate", return_hydra_config=True,
                  overrides=["adapt=source", "dataset.root=../../data", "force=true"])
    assert cfg.hydra.job.override_dirname == "adapt=source,dataset.root=../../data"
    assert cfg.hydra.sweep.subdir == "adapt=source,dataset.root=..%2F..%2Fdata"
    assert cfg.hydra.callbacks.sweep_status._target_ == "tta.evaluation.sweeps.SweepStatus"


def test_unknown_group_member_lists_the_options(hydra_conf):
    with pytest.raises(MissingConfigException, match="recalibrate"):
        compose(config_name="evaluate", overrides=["adapt=tnet"])
