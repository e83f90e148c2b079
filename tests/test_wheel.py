"""The tta-bn distribution (pyproject.toml): the wheel holds the package, its data files and the
Hydra configs; its ``tta`` command, installed in a fresh venv, evaluates and reports from an
empty directory; the dependency pins; optional dependencies name their extra; the command's
usage errors. The wheel is built offline from a copy of the checkout (no build/ left here)."""
from __future__ import annotations

import csv
import email.parser
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

import tta
from tta.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "tta", "conf")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp")


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300,
                          **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in BUILD_INPUTS:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, src / name,
                                                                      **({"ignore": IGNORE} if (ROOT / name).is_dir() else {}))
    done = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--no-index", "-w", out, src])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = out.glob("*.whl")
    return path


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        return email.parser.Parser().parsestr(zf.read(f"tta_bn-{tta.__version__}.dist-info/METADATA").decode())


def shipped_files() -> dict[str, Path]:
    """Wheel path -> checkout file: everything in tta/ and conf/ (as tta/conf/)."""
    files = {}
    for top, prefix in (("tta", ""), ("conf", "tta/")):
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".tmp"):
                files[prefix + path.relative_to(ROOT).as_posix()] = path
    return files


def test_wheel_holds_package_data_configs_licence_and_command(wheel):
    assert wheel.name == f"tta_bn-{tta.__version__}-py3-none-any.whl"
    dist_info = f"tta_bn-{tta.__version__}.dist-info/"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        expected = shipped_files()
        assert sorted(set(expected) - names) == []  # e.g. a subpackage missing in pyproject.toml
        for name, path in expected.items():
            assert zf.read(name) == path.read_bytes(), name
        assert {n for n in names if not n.startswith(("tta/", dist_info))} == set()
        assert sorted(n for n in names if n.startswith("tta/conf/")) == sorted(
            "tta/" + p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
        assert zf.read(dist_info + "licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        entry_points = zf.read(dist_info + "entry_points.txt").decode()
    assert re.search(r"\[console_scripts\]\s*tta = tta\.cli:main", entry_points)
    meta = metadata(wheel)
    assert (meta["Name"], meta["Version"]) == ("tta-bn", tta.__version__)
    assert meta["License-Expression"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def test_pins_admit_the_installed_releases_and_no_numpy1_build_with_numpy2(wheel):
    requirements = [Requirement(r) for r in metadata(wheel).get_all("Requires-Dist")]
    hard = {r.name: r.specifier for r in requirements if r.marker is None}
    extra = {r.name: r.specifier for r in requirements if r.marker is not None}
    for name, spec in hard.items():
        assert spec.contains(importlib.metadata.version(name)), (name, str(spec))
    # the current releases (pip index versions, 2026-12-01) are admitted
    for name, version in (("torch", "2.15.0"), ("torchvision", "0.29.2"), ("numpy", "2.4.6"),
                          ("scipy", "1.17.1"), ("matplotlib", "3.11.2"), ("hydra-core", "1.3.8")):
        assert hard[name].contains(version), (name, version)
    # numpy 2 is admitted, so no release built against numpy 1 may be (import fails)
    assert hard["numpy"].contains("2.0.0")
    for name, numpy1_build in (("torch", "2.3.1"), ("torchvision", "0.18.1"), ("scipy", "1.12.0"),
                               ("matplotlib", "3.8.3")):
        assert not hard[name].contains(numpy1_build), name
    assert not extra["scikit-learn"].contains("1.4.1")
    assert "scikit-learn" not in hard  # digits and the label-free estimator only: extra "sklearn"


def hide_sklearn(monkeypatch):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import sklearn...` raises ModuleNotFoundError


def test_features_of_an_extra_name_it_when_missing(monkeypatch):
    from tta._extras import require_extra
    from tta.data.digits import _resized_digits
    from tta.label_free.estimator import _fit_logistic

    hide_sklearn(monkeypatch)
    _resized_digits.cache_clear()
    try:
        with pytest.raises(ImportError, match=re.escape("the digits dataset needs scikit-learn, which is "
                                                        "not installed: pip install 'tta-bn[sklearn]'")):
            tta.data.get_dataset("digits")
    finally:
        _resized_digits.cache_clear()
    with pytest.raises(ImportError, match=re.escape("label-free accuracy estimator needs scikit-learn")):
        _fit_logistic(np.zeros((4, 2)), np.array([0, 1, 0, 1]))
    with pytest.raises(ModuleNotFoundError, match="no_such_module_xyz"):  # other modules: unchanged
        with require_extra("sklearn", "a feature"):
            import no_such_module_xyz  # noqa: F401
    with pytest.raises(ValueError, match=r"unknown extra 'sk'; valid: \['launchers', 'sklearn'\]"):
        with require_extra("sk", "a feature"):
            pass


def test_launcher_presets_name_the_launchers_extra_when_their_plugin_is_missing(monkeypatch):
    from tta.apps.evaluate import check_launchers

    check_launchers(["hydra/launcher=local", "hydra/launcher=slurm"])  # installed here: no error
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher", None)  # find_spec: None
    check_launchers(["-m", "hydra/launcher=local", "adapt=source"])
    with pytest.raises(ImportError, match=re.escape("hydra/launcher=slurm_gpu needs hydra-submitit-launcher, "
                                                    "which is not installed: pip install 'tta-bn[launchers]'")):
        check_launchers(["-m", "hydra/launcher=slurm_gpu", "adapt=source"])


def test_command_usage_errors(tmp_path, capsys):
    for argv, message in (([], "the following arguments are required: command"),
                          (["bogus"], "invalid choice: 'bogus' (choose from 'evaluate', 'report', "
                                      "'corrupt', 'train-source')"),
                          (["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")], "tta report: error")):
        with pytest.raises(SystemExit) as exit_:
            cli(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as exit_:
        cli(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"tta-bn {tta.__version__}"


@pytest.mark.slow
def test_installed_command_evaluates_and_reports_from_an_empty_directory(wheel, tmp_path):
    from hydra import compose, initialize_config_dir

    from tta.apps.evaluate import protocol_config

    venv, work = tmp_path / "venv", tmp_path / "empty"
    work.mkdir()
    assert run([sys.executable, "-m", "venv", "--without-pip", venv]).returncode == 0
    python = venv / "bin" / "python"
    done = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel])
    assert done.returncode == 0, done.stderr[-3000:]
    # the big packages (torch, ...) come from this environment: a path line, its .pth files unread
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    here = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (site / "_tta_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(here)))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("TTA_", "PYTHON"))},
           "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}

    where = run([python, "-c", "import tta.apps; print(tta.__file__); print(tta.apps.config_dir())"],
                cwd=work, env=env)
    assert where.stdout.split() == [str(site / "tta" / "__init__.py"), str(site / "tta" / "conf")], where.stderr
    overrides = ["dataset=digits", "model=resnet8", "corruption.names=[fog]", "corruption.severities=[2]",
                 "num_examples=32", "batch_size=16", "progress=false"]
    done = run(["tta", "evaluate", "-m", *overrides, "adapt=source,batch", "hydra.sweep.dir=sweep"],
               cwd=work, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {r["method"]: r for r in (json.loads(p.read_text()) for p in (work / "sweep").rglob("results.json"))}
    assert sorted(runs) == ["batch", "source"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for method, result in runs.items():  # the wheel's configs compose as the checkout's
            expected = protocol_config(compose(config_name="evaluate", overrides=[*overrides, f"adapt={method}"]))
            assert result["config"] == json.loads(json.dumps(expected))
    source_accuracy = runs["source"]["cells"][0]["accuracy"]
    for result in runs.values():
        (cell,) = result["cells"]
        assert (cell["corruption"], cell["severity"], cell["num_examples"]) == ("fog", 2, 32)
        confusion = np.array(cell["confusion"], dtype=np.float64)
        assert confusion.sum() == 32 and cell["accuracy"] == np.trace(confusion) / 32
        assert cell["source_accuracy"] == source_accuracy
        assert cell["recovered"] == pytest.approx(cell["accuracy"] - source_accuracy, abs=1e-12)

    done = run(["tta", "report", "sweep", "--out", "report"], cwd=work, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in (work / "report").iterdir()} >= {"report.md", "report.csv", "recovered_heatmap.png"}
    with open(work / "report" / "report.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f) if (r["corruption"], r["severity"]) == ("fog", "2")}
    assert sorted(rows) == ["batch", "source"]
    for method, row in rows.items():
        cell = runs[method]["cells"][0]
        assert float(row["accuracy"]) == pytest.approx(cell["accuracy"], abs=1e-12)
        assert float(row["recovered"]) == pytest.approx(cell["accuracy"] - source_accuracy, abs=1e-12)
    recovered = 100 * (runs["batch"]["cells"][0]["accuracy"] - source_accuracy)
    assert re.search(rf"\| batch \| {recovered:+.1f} \|", (work / "report" / "report.md").read_text())

    done = run(["tta", "corrupt", "dataset=digits", "corruptions=[fog]", "num_examples=4", "out_dir=corrupted",
                "progress=false"], cwd=work, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    digits = tta.data.get_dataset("digits", num_examples=4)
    fog = np.load(work / "corrupted" / "fog.npy")
    assert fog.shape == (5 * 4, 28, 28, 1) and fog.dtype == np.uint8
    assert np.array_equal(fog[4:8], tta.corrupt(digits.images, "fog", 2).permute(0, 2, 3, 1).numpy())
    assert np.array_equal(np.load(work / "corrupted" / "labels.npy"), np.tile(digits.targets.numpy(), 5))
    assert sorted(p.name for p in work.iterdir()) == [".cache", "corrupted", "report", "sweep"]  # all in cwd

    check = run([sys.executable, "-m", "pip", "--python", python, "check"], env=env)
    assert "tta-bn" not in check.stdout, check.stdout  # every hard pin holds in this environment
