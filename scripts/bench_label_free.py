"""Benchmark of the label-free tools (issue 11 goals) on Fashion-MNIST-C, in one run.

    python scripts/bench_label_free.py                        # 1,000 images per cell (the goals' protocol)
    python scripts/bench_label_free.py --num-examples 200     # a quick run

Protocol (docs/label_free.md):

* model: the shipped ResNet-14 (``tta.models.load_pretrained("fashion_mnist")``);
* target cells: the first ``--num-examples`` Fashion-MNIST test images, clean and under all 19
  corruptions (``tta.CORRUPTIONS + tta.EXTRA_CORRUPTIONS``) x severities 1-5, corruption seed
  0, uint8 then / 255; each cell is one stream segment, read in order, reset before it;
* validation (the only labels used by any label-free method): ``--validation-examples`` test
  images from ``--validation-offset`` (5000; disjoint from the target images), clean and
  under the same 95 corruptions with seed 1. The estimators are refitted leaving out the
  target cell's corruption (leave-one-corruption-out), so every reported error is on a shift
  type the estimator never saw;
* the shift scores, the estimates and the choices never read a target label; target labels
  only score them.

Per cell the results are cached in ``--out`` (one ``.pt`` per cell, written atomically; a
re-run skips finished cells) and the goals table is printed at the end (also written to
``--out``/goals.md). Runtime: see docs/label_free.md.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

import tta
from tta._atomic import atomic_file
from tta.label_free import AccuracyEstimator, CumulativeBlend, observe
from tta.label_free.diagnosis import diagnosis_from
from tta.label_free.estimator import features
from tta.label_free.prior import CANDIDATES, DEFAULT_SCALE, _Evidence, snap_prior

BATCH_SIZES = (8, 64)
FINITE = [c for c in CANDIDATES if math.isfinite(c)]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-examples", type=int, default=1000, help="target images per cell (default 1000)")
    p.add_argument("--validation-examples", type=int, default=1000, help="labelled validation images (default 1000)")
    p.add_argument("--validation-offset", type=int, default=5000, help="first validation test image (default 5000)")
    p.add_argument("--corruptions", default="all", help="comma-separated subset of the 19 (default all)")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_label_free"), help="cache and table directory")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--calibrate-scale", action="store_true",
                   help="also sweep the candidate priors on the validation cells and report the empirical-Bayes "
                        "scale they choose (how DEFAULT_SCALE was set; about doubles the validation cost)")
    return p.parse_args()


# ----------------------------------------------------------------------------- per-cell work
def _save(path: Path, record: dict) -> None:
    buffer = io.BytesIO()
    torch.save(record, buffer)
    with atomic_file(path) as f:
        f.write(buffer.getvalue())


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@torch.no_grad()
def _blend_logits(converted: torch.nn.Module, x: torch.Tensor, batch_size: int, prior: float) -> torch.Tensor:
    with tta.use_stats(converted, "blend", prior=prior):
        return torch.cat([converted(b) for b in x.split(batch_size)])


def _unscaled_priors(obs) -> list[float]:
    """N* with scale 1 after each batch (the online choice for any scale is snap(scale * N*))."""
    evidence, out = _Evidence(), []
    for i in range(len(obs.sizes)):
        evidence.add(obs, i)
        out.append(evidence.prior(1.0))
    return out


def _validation_cell(model, converted, x, calibrate: bool) -> dict:
    obs = observe(model, x.split(64), batch_pass=True)
    diag = diagnosis_from(obs)
    record = {"source": torch.cat(obs.source_logits), "batch64": torch.cat(obs.batch_logits),
              "kl": torch.tensor(list(diag.kl.values())), "w2": torch.tensor(list(diag.w2.values()))}
    if calibrate:
        record["segment_prior"] = _unscaled_priors(obs)[-1]
        for bs in BATCH_SIZES:
            for prior in FINITE:
                record[f"b{bs}_N{prior:g}"] = _blend_logits(converted, x, bs, prior).argmax(1)
    return record


def _target_cell(model, converted, x) -> dict:
    record: dict = {}
    correct_logits = {}
    for bs in BATCH_SIZES:
        obs = observe(model, x.split(bs), batch_pass=True)
        record[f"online{bs}"] = _unscaled_priors(obs)
        record[f"batch{bs}"] = torch.cat(obs.batch_logits)
        if bs == 64:
            diag = diagnosis_from(obs)
            record["source"] = torch.cat(obs.source_logits)
            record["kl"], record["w2"] = torch.tensor(list(diag.kl.values())), torch.tensor(list(diag.w2.values()))
        for prior in FINITE:
            logits = record[f"batch{bs}"] if prior == 0 else _blend_logits(converted, x, bs, prior)
            correct_logits[f"b{bs}_N{prior:g}"] = logits.argmax(1)
        adapt = CumulativeBlend(model, prior="auto")
        correct_logits[f"cumulative{bs}"] = torch.cat([adapt(b) for b in x.split(bs)]).argmax(1)
        record[f"cumulative_priors{bs}"] = adapt.priors
    recalibrated = tta.recalibrate(tta.models.load_pretrained("fashion_mnist"), x.split(64))
    with torch.no_grad():
        correct_logits["adabn"] = torch.cat([recalibrated(b) for b in x.split(64)]).argmax(1)
    record["predictions"] = correct_logits
    return record


# ----------------------------------------------------------------------------- analysis
def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).double().mean())


def _spearman(a, b) -> float:
    return float(stats.spearmanr(a, b)[0])


def _mae(errors: dict[tuple, float]) -> tuple[float, float, str]:
    """Mean absolute error (points) over cells, and the worst corruption's mean."""
    per = collections.defaultdict(list)
    for (corruption, _), e in errors.items():
        per[corruption].append(e)
    worst = max(per, key=lambda c: np.mean(per[c]))
    return float(np.mean(list(errors.values()))), float(np.mean(per[worst])), worst


def _rows_of(record: dict, config: str) -> tuple[torch.Tensor, torch.Tensor]:
    logits = record["source"] if config == "source" else record["batch64"]
    return features(logits, record["source"], record["batch64"]), logits.argmax(1)


def analyse(val: dict, target: dict, y_val: torch.Tensor, y: torch.Tensor, calibrate: bool) -> str:
    cells = [k for k in target if k[0] != "clean"]
    corruptions = sorted({c for c, _ in cells})
    clean = target[("clean", 0)]
    acc = {k: {"source": _accuracy(r["source"].argmax(1), y), "batch": _accuracy(r["batch64"].argmax(1), y)}
           for k, r in target.items()}
    lines = [f"# Label-free goals (Fashion-MNIST-C, {len(cells)} cells x {len(y)} images; validation "
             f"{len(y_val)} labelled images, leave-one-corruption-out)", ""]

    # 1. shift scores
    drop = [acc[("clean", 0)]["source"] - acc[k]["source"] for k in cells]
    scores = {
        "symmetric KL, last BN layer (diagnose default)": [float(target[k]["kl"][-1]) for k in cells],
        "symmetric KL, mean over layers": [float(target[k]["kl"].mean()) for k in cells],
        "symmetric KL, first layer": [float(target[k]["kl"][0]) for k in cells],
        "2-Wasserstein, last layer": [float(target[k]["w2"][-1]) for k in cells],
        "2-Wasserstein, mean over layers": [float(target[k]["w2"].mean()) for k in cells],
        "1 - mean max-softmax (source)": [1 - float(target[k]["source"].softmax(1).max(1).values.mean()) for k in cells],
        "source/batch disagreement": [1 - _accuracy(target[k]["source"].argmax(1), target[k]["batch64"].argmax(1))
                                      for k in cells],
    }
    lines += ["## Shift score: Spearman with the source accuracy drop", "", "| score | Spearman |", "|---|---:|"]
    lines += [f"| {name} | {_spearman(v, drop):.3f} |" for name, v in scores.items()]
    summary: dict[str, float | tuple] = {"spearman": _spearman(next(iter(scores.values())), drop)}

    # 2. accuracy estimates (leave-one-corruption-out fits on the validation cells)
    from sklearn.isotonic import IsotonicRegression

    def labelled(keys, config):
        rows = [_rows_of(val[k], config) for k in keys]
        return torch.cat([r[0] for r in rows]), torch.cat([(r[1] == y_val).double() for r in rows])

    errors: dict[str, dict[tuple, float]] = collections.defaultdict(dict)
    # ATC (Garg et al. 2022): thresholds from the clean validation images.
    atc = AccuracyEstimator.fit_samples({c: labelled([("clean", 0)], c) for c in ("source", "batch")}, "atc")
    for held in corruptions:
        train = [k for k in val if k[0] != held]
        estimator = AccuracyEstimator.fit_samples({c: labelled(train, c) for c in ("source", "batch")}, "agreement")
        iso = IsotonicRegression(increasing=False, out_of_bounds="clip").fit(
            [float(val[k]["kl"][-1]) for k in train], [_accuracy(val[k]["source"].argmax(1), y_val) for k in train])
        for k in cells:
            if k[0] != held:
                continue
            r = target[k]
            for config, logits in (("source", r["source"]), ("batch", r["batch64"])):
                true = acc[k][config]
                for name, est in (("agreement", estimator), ("atc", atc)):
                    value = float(est.sample_correctness(logits, r["source"], r["batch64"], config).mean())
                    errors[f"{name} {config}"][k] = 100 * abs(value - true)
            errors["shift score only (isotonic on last-layer KL) source"][k] = \
                100 * abs(float(iso.predict([float(r["kl"][-1])])[0]) - acc[k]["source"])
    lines += ["", "## Accuracy estimates: absolute error in points (leave-one-corruption-out)", "",
              "| estimator | model | mean | worst corruption |", "|---|---|---:|---|"]
    for name, errs in errors.items():
        mean, worst, which = _mae(errs)
        method, config = name.rsplit(" ", 1)
        lines.append(f"| {method} | {config} | {mean:.2f} | {worst:.2f} ({which}) |")
        summary[name] = (mean, worst, which)
    constant = float(np.mean([abs(acc[k]["source"] - np.mean([acc[j]["source"] for j in cells])) for k in cells])) * 100
    lines.append(f"| constant (mean accuracy of the cells, with labels) | source | {constant:.2f} | |")
    lines += ["", "Per corruption (mean over severities, points): " + ", ".join(
        f"{c} {np.mean([e for k, e in errors['agreement source'].items() if k[0] == c]):.1f}"
        f"/{np.mean([e for k, e in errors['agreement batch'].items() if k[0] == c]):.1f}" for c in corruptions)
        + " (agreement, source/batch)"]

    # 3. choice of N
    lines += ["", "## Choice of the prior N (mean accuracy over the corrupted cells, %)", "",
              "| method | " + " | ".join(f"batch {bs}" for bs in BATCH_SIZES) + " |", "|---|" + "---:|" * len(BATCH_SIZES)]

    def pred(record, bs, prior):
        if prior == math.inf:
            return record["source"].argmax(1)
        return record["predictions"][f"b{bs}_N{prior:g}"]

    table: dict[str, list[str]] = collections.defaultdict(list)
    clean_rows: dict[str, list[str]] = collections.defaultdict(list)
    for bs in BATCH_SIZES:
        per = {k: {p: (pred(target[k], bs, p) == y).double() for p in CANDIDATES} for k in target}
        mean = lambda f: 100 * float(np.mean([f(k) for k in cells]))  # noqa: E731
        fixed = {p: mean(lambda k: per[k][p].mean()) for p in CANDIDATES}
        best = max(fixed, key=fixed.get)
        half = len(y) // 2
        table["per-cell best N with labels (oracle)"].append(f"{mean(lambda k: max(v.mean() for v in per[k].values())):.2f}")
        table["N chosen with labels on half the images, scored on the other half"].append(
            f"{mean(lambda k: per[k][max(CANDIDATES, key=lambda p: per[k][p][:half].mean())][half:].mean()):.2f}")
        table["best single fixed N with labels"].append(f"{fixed[best]:.2f} (N={best:g})")
        table["N = 16 (the default)"].append(f"{fixed[16.0]:.2f}")
        table["source statistics (N = inf)"].append(f"{fixed[math.inf]:.2f}")
        segment = lambda k: snap_prior(DEFAULT_SCALE * target[k][f"online{bs}"][-1])  # noqa: E731
        table["select_prior per segment (all its batches; offline)"].append(f"{mean(lambda k: per[k][segment(k)].mean()):.2f}")

        def online(k):
            priors = [snap_prior(DEFAULT_SCALE * n) for n in target[k][f"online{bs}"]]
            right = [per[k][p][i * bs:(i + 1) * bs] for i, p in enumerate(priors)]
            return torch.cat(right).mean()

        table["**select_prior online (batch t from batches 1..t)**"].append(f"**{mean(online):.2f}**")
        summary[f"online{bs}"], summary[f"fixed{bs}"] = mean(online), (fixed[best], best)
        summary[f"cumulative{bs}"] = mean(lambda k: (target[k]["predictions"][f"cumulative{bs}"] == y).double().mean())
        table["CumulativeBlend(prior='auto'): segment statistics so far (online)"].append(
            f"{mean(lambda k: (target[k]['predictions'][f'cumulative{bs}'] == y).double().mean()):.2f}")
        table["AdaBN on the whole cell (offline)"].append(
            f"{mean(lambda k: (target[k]['predictions']['adabn'] == y).double().mean()):.2f}")
        # The baselines were measured on the 15 ImageNet-C corruptions only.
        base = [k for k in cells if k[0] in tta.CORRUPTIONS]
        if base and len(base) < len(cells):
            sub = lambda f: 100 * float(np.mean([f(k) for k in base]))  # noqa: E731
            fixed15 = {p: sub(lambda k: per[k][p].mean()) for p in CANDIDATES}
            best15 = max(fixed15, key=fixed15.get)
            table["15 corruptions only: best fixed N / N = 16 / select_prior online / CumulativeBlend"].append(
                f"{fixed15[best15]:.2f} (N={best15:g}) / {fixed15[16.0]:.2f} / {sub(online):.2f} / "
                f"{sub(lambda k: (target[k]['predictions'][f'cumulative{bs}'] == y).double().mean()):.2f}")
        k0 = ("clean", 0)
        clean_rows["source statistics"].append(f"{100 * float(per[k0][math.inf].mean()):.2f}")
        clean_rows["select_prior online"].append(f"{100 * float(online(k0)):.2f}")
        summary[f"clean{bs}"] = 100 * float(online(k0) - per[k0][math.inf].mean())
        clean_rows["select_prior per segment"].append(f"{100 * float(per[k0][segment(k0)].mean()):.2f} (N={segment(k0):g})")
        clean_rows["CumulativeBlend(prior='auto')"].append(
            f"{100 * float((clean['predictions'][f'cumulative{bs}'] == y).double().mean()):.2f}")
        clean_rows[f"N = 16"].append(f"{100 * float(per[k0][16.0].mean()):.2f}")
    lines += [f"| {name} | " + " | ".join(v) + " |" for name, v in table.items()]
    lines += ["", "Clean data (accuracy %):", "", "| method | " + " | ".join(f"batch {bs}" for bs in BATCH_SIZES) + " |",
              "|---|" + "---:|" * len(BATCH_SIZES)]
    lines += [f"| {name} | " + " | ".join(v) + " |" for name, v in clean_rows.items()]
    if calibrate:
        lines += ["", "## Scale of the empirical-Bayes prior, chosen on the validation cells (per-segment choice)", "",
                  "| scale | " + " | ".join(f"batch {bs}" for bs in BATCH_SIZES) + " |", "|---|" + "---:|" * len(BATCH_SIZES)]
        vcells = [k for k in val if k[0] != "clean"]
        for scale in (1, 2, 4, 8, 16):
            values = []
            for bs in BATCH_SIZES:
                def vacc(k, p, bs=bs):
                    logits = val[k]["source"].argmax(1) if p == math.inf else val[k][f"b{bs}_N{p:g}"]
                    return _accuracy(logits, y_val)
                values.append(100 * np.mean([vacc(k, snap_prior(scale * val[k]["segment_prior"])) for k in vcells]))
            lines.append(f"| {scale} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    lines += ["", "## Goals", "", "| goal | target | measured | met |", "|---|---|---|:---:|"]
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    lines.append(f"| shift score (last-layer symmetric KL): Spearman with the accuracy drop | >= 0.95 | "
                 f"{summary['spearman']:.3f} | {yes(summary['spearman'] >= 0.95)} |")
    bn = summary["shift score only (isotonic on last-layer KL) source"]
    lines.append(f"| accuracy from BN statistics alone: mean abs. error | <= 3 points | {bn[0]:.2f} | {yes(bn[0] <= 3)} |")
    for config, label in (("source", "source model"), ("batch", "batch-adapted model (batch 64)")):
        ours, atc_row = summary[f"agreement {config}"], summary[f"atc {config}"]
        lines.append(f"| accuracy estimate, {label}: mean / worst corruption (ATC in this run: {atc_row[0]:.2f} / "
                     f"{atc_row[1]:.2f}) | <= 1.2 / <= 2.5 | {ours[0]:.2f} / {ours[1]:.2f} ({ours[2]}) | "
                     f"{yes(ours[0] <= 1.2)} / {yes(ours[1] <= 2.5)} |")
    lines.append(f"| online N, batch 8 | >= 85.7 % | {summary['online8']:.2f} % | {yes(summary['online8'] >= 85.7)} |")
    best64 = summary["fixed64"]
    lines.append(f"| online N, batch 64 | >= best fixed N ({best64[0]:.2f} %, N={best64[1]:g}) | {summary['online64']:.2f} % | "
                 f"{yes(summary['online64'] >= best64[0])} |")
    lines.append(f"| online N on clean data vs source | >= -0.5 points | {summary['clean8']:+.2f} (batch 8), "
                 f"{summary['clean64']:+.2f} (batch 64) | {yes(min(summary['clean8'], summary['clean64']) >= -0.5)} |")
    lines.append(f"| stretch: batch 8 online from better statistics (CumulativeBlend) | >= 87 % | "
                 f"{summary['cumulative8']:.2f} % | {yes(summary['cumulative8'] >= 87)} |")
    lines.append("| cost: diagnosis + estimate / choice of N | <= 2 passes / <= 2 + 1 per candidate on one batch | "
                 "2 / 1 | yes |")
    lines += ["", "Cost: diagnosis + both estimates = 2 forward passes per batch (source and batch statistics); "
              "select_prior = 1 pass (source statistics) and no candidate pass; CumulativeBlend(prior='auto') = 2 "
              "passes per batch."]
    return "\n".join(lines)


def main() -> None:
    args = _parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(tta.CORRUPTIONS) + list(tta.EXTRA_CORRUPTIONS)
    if args.corruptions != "all":
        names = [c for c in args.corruptions.split(",") if c]
        bad = sorted(set(names) - set(tta.CORRUPTIONS) - set(tta.EXTRA_CORRUPTIONS))
        if bad:
            raise SystemExit(f"unknown corruptions {bad}; valid: {', '.join(tta.CORRUPTIONS + tta.EXTRA_CORRUPTIONS)}")
    n, nv, offset = args.num_examples, args.validation_examples, args.validation_offset
    if not (0 < n <= offset and 0 < nv and offset + nv <= 10000):
        raise SystemExit(f"need 0 < --num-examples ({n}) <= --validation-offset ({offset}) and "
                         f"--validation-offset + --validation-examples ({offset + nv}) <= 10000")
    data = tta.data.get_dataset("fashion_mnist", split="test")
    x_target, y = data.images[:n], data.targets[:n]
    x_val, y_val = data.images[offset:offset + nv], data.targets[offset:offset + nv]
    model = tta.models.load_pretrained("fashion_mnist")
    converted = tta.convert(tta.models.load_pretrained("fashion_mnist"), stats="source")
    cells = [("clean", 0)] + [(c, s) for c in names for s in range(1, 6)]
    out = args.out / f"n{n}_v{offset}-{offset + nv}"
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results = {}
    for which, images, seed in (("validation", x_val, 1), ("target", x_target, 0)):
        results[which] = {}
        for i, (corruption, severity) in enumerate(cells):
            path = out / f"{which}_{corruption}_{severity}{'_cal' if which == 'validation' and args.calibrate_scale else ''}.pt"
            if not path.is_file():
                t = time.time()
                shifted = images if corruption == "clean" else tta.corrupt(images, corruption, severity, seed=seed)
                x = shifted.float() / 255
                record = (_validation_cell(model, converted, x, args.calibrate_scale) if which == "validation"
                          else _target_cell(model, converted, x))
                _save(path, record)
                print(f"[{time.time() - start:7.0f} s] {which} {i + 1}/{len(cells)} {corruption} {severity}: "
                      f"{time.time() - t:.1f} s", flush=True)
            results[which][(corruption, severity)] = _load(path)
    table = analyse(results["validation"], results["target"], y_val, y, args.calibrate_scale)
    print(table)
    with atomic_file(out / "goals.md", "w") as f:
        f.write(table + "\n")
    with atomic_file(out / "run.json", "w") as f:
        json.dump({"num_examples": n, "validation": [offset, offset + nv], "corruptions": names,
                   "threads": torch.get_num_threads(), "wall_s_this_run": time.time() - start}, f, indent=1)


if __name__ == "__main__":
    main()
