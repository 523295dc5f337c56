"""How should the frozen candidates (each depth, every level at once) be chosen between?

Many seeds are needed to see a selection rule's worth at 10 images per class, and a whole
`autotransfer bench` cell per seed is too slow for that on a CPU. Here the features of
every depth are computed once per dataset (for a labelled pool and the held-out images),
then for each seed and size a stratified sample of the pool is drawn, the product's own
probe (`probe.fit_probe`, as `train.probe_head` calls it) is cross-validated and refit at
every depth, and each selection rule's pick is scored on the held-out images.

    python benchmarks/bench_frozen_selection.py /work/shared/datasets/{hymenoptera,flowers,cifar10,pneumoniamnist} \
        --seeds 10 --out benchmarks/results/frozen_selection

Rules compared: the product's before the every-level modes (highest CV balanced
accuracy, ties to the lower out-of-fold log-loss, among each level, the top and every
level at once), the same with the per-feature every-level head added, the mean
probabilities or logits of the best three of those by CV, the "ensemble" candidate
competing by CV, the ensemble unless the best single probe leads it by more than 1 or 2
paired SEs (search.ENSEMBLE_LEAD_STANDARD_ERRORS), wider ensembles (every probe within 1
or 2 paired SEs of the best by CV; the 3 best or more when more are within 1 SE, with the
same guard; the best single depth and its neighbours), the same guarded ensemble with the
top, or the top and the per-feature head, or everything but single levels left out (the
rule far from ImageNet, Plan.ensemble_levels_only; run on the far sets only:
frozen_selection_far.md), lowest CV log-loss, each fixed depth, and the mean of all depths. Mean held-out accuracy per rule, and each rule's paired gap
to the first with its standard error over cells x seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from autotransfer.backbones import get_backbone
from autotransfer.bench import BenchSettings, cap_split, resolve_image_size, scan_datasets
from autotransfer.features import cache_feature_levels, use_cache
from autotransfer.metrics import balanced_accuracy_gap_se, balanced_accuracy_of
from autotransfer.plan import Plan
from autotransfer.probe import cv_log_loss, fit_probe, logit_scale
from autotransfer.references import depth_features
from autotransfer.strategies import ALL_LEVELS, build_net


ALL_BY_FEATURE = "all-feature"  # every level at once, Plan.all_levels_mode "feature"
ENSEMBLE = "ensemble"  # Plan.all_levels_mode "ensemble"


def depth_label(level) -> str:
    return {ALL_LEVELS: "all", ALL_BY_FEATURE: "all (per feature)"}.get(level, "top" if level is None else f"L{level}")


def dataset_features(scan, base: Plan, levels: list) -> dict:
    """{depth: (pool features, pool labels, held-out features, held-out labels)}."""
    spec = get_backbone(base.backbone)
    cache_feature_levels(spec, base, scan, [lv for lv in levels if lv != ALL_LEVELS], progress=True, all_levels=True)
    out = {}
    for level in levels:
        x, y = depth_features(spec, base, scan, level, "train")
        tx, ty = depth_features(spec, base, scan, level, "test")
        out[level] = (torch.from_numpy(x), torch.from_numpy(y).long(), torch.from_numpy(tx), torch.from_numpy(ty).long())
    return out


def probe_at(level, feats: dict, index: np.ndarray, num_classes: int, seed: int, multi) -> dict:
    """The product's probe at one depth on the sampled images: CV scores and held-out probabilities."""
    x, y, tx, ty = feats[ALL_LEVELS if level == ALL_BY_FEATURE else level]
    x, y = x[index], y[index]
    standardise = True
    if level in (ALL_LEVELS, ALL_BY_FEATURE):  # as train.probe_head does for a MultiLevelNet
        multi.set_standardisation(x, "feature" if level == ALL_BY_FEATURE else "level")
        with torch.no_grad():
            x, tx = multi.classifier[0](x), multi.classifier[0](tx)
        standardise = False
    fit = fit_probe(x, y, num_classes, seed=seed, standardise=standardise)
    logits = tx.float() @ fit.weight.T + fit.bias
    cv = fit.cv_logits.float()
    cv_loss = cv_log_loss(cv, y)
    return {
        "cv_balanced": fit.cv_balanced_accuracy, "cv_loss": cv_loss, "cv_y": y,
        "proba": torch.softmax(logits, 1).numpy(), "logits": logits.numpy(), "C": fit.C, "cv_logits": cv,
    }


def best_by_cv(results: dict, order: list):
    """The product's pick: highest CV balanced accuracy, ties to the lower log-loss, then rank."""
    return max(order, key=lambda lv: (results[lv]["cv_balanced"], -results[lv]["cv_loss"], -order.index(lv)))


def within_se_of_best(results: dict, candidates: list, k: float) -> list:
    """The candidates whose CV balanced accuracy trails the best's by at most k paired SEs
    (on the same out-of-fold images), the best included."""
    best = best_by_cv(results, candidates)
    y = results[None]["cv_y"].tolist()
    best_pred = results[best]["cv_logits"].argmax(1).tolist()
    members = []
    for lv in candidates:
        pred = results[lv]["cv_logits"].argmax(1).tolist()
        lead = results[best]["cv_balanced"] - results[lv]["cv_balanced"]
        if lv == best or lead <= k * balanced_accuracy_gap_se(best_pred, pred, y):
            members.append(lv)
    return members


def guarded_ensemble(results: dict, candidates: list, y: torch.Tensor, guard: list | None = None,
                     calibrate: bool = False, standard_errors: float = 2.0) -> np.ndarray:
    """The product's rule on `candidates`: the mean logits of the 3 best by CV unless the
    best single one (of `guard`, by default the candidates) leads that mean's CV by more
    than `standard_errors` paired SEs (search.ENSEMBLE_LEAD_STANDARD_ERRORS). `calibrate`:
    each member's logits scaled to its best CV log-loss first (probe.logit_scale), so that
    no member outweighs the others by its scale alone: the product's rule since commit
    d3a82de; without it, the rule before (the rows the committed results name so)."""
    top3 = sorted(candidates, key=lambda lv: (-results[lv]["cv_balanced"], results[lv]["cv_loss"]))[:3]
    scale = {lv: logit_scale(results[lv]["cv_logits"], y) if calibrate else 1.0 for lv in top3}
    mean_cv = torch.stack([results[lv]["cv_logits"] * scale[lv] for lv in top3]).mean(0).argmax(1).tolist()
    single = best_by_cv(results, guard or candidates)
    single_pred = results[single]["cv_logits"].argmax(1).tolist()
    lead = results[single]["cv_balanced"] - balanced_accuracy_of(mean_cv, y.tolist())
    if lead > standard_errors * balanced_accuracy_gap_se(single_pred, mean_cv, y.tolist()):
        return results[single]["proba"]
    return torch.softmax(torch.from_numpy(np.mean([results[lv]["logits"] * scale[lv] for lv in top3], 0)), 1).numpy()


def rules(results: dict, order: list) -> dict[str, np.ndarray]:
    """Each selection rule's held-out probabilities. `order`: the rules' rank of depths
    (ties of the product's rule go to the earlier one), the every-level head with
    per-feature scaling left out but for the rules that name it."""
    picks = {}
    picks["product (CV bal. acc, ties log-loss)"] = results[best_by_cv(results, order)]["proba"]
    both = [order[0], order[1], ALL_BY_FEATURE, *order[2:]]  # the rules' order with both scalings
    picks["product + all per feature"] = results[best_by_cv(results, both)]["proba"]
    top3 = sorted(both, key=lambda lv: (-results[lv]["cv_balanced"], results[lv]["cv_loss"]))[:3]
    picks["+ all per feature, mean of best 3 by CV"] = np.mean([results[lv]["proba"] for lv in top3], 0)
    picks["+ all per feature, mean logits of best 3"] = np.mean([results[lv]["logits"] for lv in top3], 0)
    # the product with the "ensemble" candidate too (Plan.all_levels_mode): its CV is that of the
    # mean out-of-fold log-probabilities of the 3 best, and it competes with the single depths
    mean_cv = torch.log_softmax(torch.stack([results[lv]["cv_logits"] for lv in top3]).mean(0), 1)
    y = results[None]["cv_y"]
    results[ENSEMBLE] = {
        "cv_balanced": balanced_accuracy_of(mean_cv.argmax(1).tolist(), y.tolist()),
        "cv_loss": cv_log_loss(mean_cv, y),
        "proba": torch.softmax(torch.from_numpy(picks["+ all per feature, mean logits of best 3"]), 1).numpy(),
    }
    picks["product + all per feature + ensemble"] = results[best_by_cv(results, [*both[:3], ENSEMBLE, *both[3:]])]["proba"]
    # the ensemble unless the best single probe leads it on CV by more than k paired SEs
    for k in (1.0, 2.0):
        picks[f"ensemble unless a single leads by > {k:g} SE"] = guarded_ensemble(results, both, y, standard_errors=k)
    single = best_by_cv(results, both)
    single_pred = results[single]["cv_logits"].argmax(1).tolist()
    # wider ensembles where CV cannot tell the candidates apart (20 images at 10/class)
    for k in (1.0, 2.0):
        members = within_se_of_best(results, both, k)
        picks[f"mean logits of all within {k:g} SE of the best"] = np.mean([results[lv]["logits"] for lv in members], 0)
    members = within_se_of_best(results, both, 1.0)
    wide = members if len(members) > len(top3) else top3
    wide_cv = torch.log_softmax(torch.stack([results[lv]["cv_logits"] for lv in wide]).mean(0), 1)
    wide_lead = results[single]["cv_balanced"] - balanced_accuracy_of(wide_cv.argmax(1).tolist(), y.tolist())
    wide_se = balanced_accuracy_gap_se(single_pred, wide_cv.argmax(1).tolist(), y.tolist())
    wide_logits = np.mean([results[lv]["logits"] for lv in wide], 0)
    picks["best 3, or all within 1 SE if more; unless a single leads by > 2 SE"] = (
        results[single]["proba"] if wide_lead > 2 * wide_se else torch.softmax(torch.from_numpy(wide_logits), 1).numpy())
    # far from ImageNet (profile distance >= rules.THRESHOLDS.far_distance): the same guarded
    # ensemble with the most ImageNet-specific candidates left out (Yosinski et al. 2014: the
    # top layers transfer worst to a distant task; the per-feature head is top-heavy)
    levels_only = [lv for lv in both if lv not in (None, ALL_LEVELS, ALL_BY_FEATURE)]
    for name, candidates in (
        ("far: guarded ensemble without the top", [lv for lv in both if lv is not None]),
        ("far: guarded ensemble without the top and the per-feature head", [lv for lv in both if lv not in (None, ALL_BY_FEATURE)]),
        ("far: guarded ensemble of the levels below the top", levels_only),
    ):
        picks[name] = guarded_ensemble(results, candidates, y)
    # as the product does it (Plan.ensemble_levels_only): the single-level ensemble, kept unless
    # the best of every frozen probe (the top and the every-level heads still run alone) leads it by > 2 SE
    picks["far: single-level ensemble unless any single probe leads by > 2 SE"] = guarded_ensemble(results, levels_only, y, guard=both)
    picks["far: single-level ensemble, members temperature-scaled on CV, guarded"] = guarded_ensemble(
        results, levels_only, y, guard=both, calibrate=True)
    picks["every candidate, members temperature-scaled on CV, guarded"] = guarded_ensemble(results, both, y, calibrate=True)
    depths = [lv for lv in order if lv != ALL_LEVELS]  # the single depths, top first
    best_depth = best_by_cv(results, depths)
    by_depth = sorted(depths, key=lambda lv: 99 if lv is None else lv)
    at = by_depth.index(best_depth)
    picks["best single depth by CV and its neighbours"] = np.mean([results[lv]["logits"] for lv in by_depth[max(0, at - 1):at + 2]], 0)
    del results[ENSEMBLE]
    picks["fixed all (per feature)"] = results[ALL_BY_FEATURE]["proba"]
    picks["lowest CV log-loss"] = results[min(order, key=lambda lv: results[lv]["cv_loss"])]["proba"]
    for lv in order:
        picks[f"fixed {depth_label(lv)}"] = results[lv]["proba"]
    picks["mean of all depths"] = np.mean([results[lv]["proba"] for lv in order], 0)
    top3 = sorted(order, key=lambda lv: (-results[lv]["cv_balanced"], results[lv]["cv_loss"]))[:3]
    picks["mean of best 3 by CV"] = np.mean([results[lv]["proba"] for lv in top3], 0)
    return picks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="+")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--per-class", type=int, action="append", default=None, help="[default: 10 and 50]")
    parser.add_argument("--pool", type=int, default=150, help="Labelled pool per class the samples are drawn from.")
    parser.add_argument("--heldout", type=int, default=300, help="Held-out images per class (cap).")
    parser.add_argument("--image-size", type=int, default=None, help="[default: fit's choice: 128 px for small images, else the backbone's]")
    parser.add_argument("--cache", type=Path, default=Path("runs/frozen_selection_cache"))
    parser.add_argument("--out", type=Path, required=True, help="Writes OUT.json and OUT.md.")
    args = parser.parse_args()
    sizes = args.per_class or [10, 50]
    settings = BenchSettings(image_size=args.image_size, val_cap=None, test_cap=args.heldout, seed=0)
    started = time.time()
    cells = []
    with use_cache(args.cache):
        for scan in scan_datasets(args.data, settings):
            scan = cap_split(scan, "train", args.pool, 0)
            name = Path(scan.root).name
            base = Plan("efficientnet_lite0", image_size=resolve_image_size(scan, settings), seed=0)
            spec = get_backbone(base.backbone)
            net = build_net(spec, replace(base, strategy="frozen", all_levels=False), len(scan.classes))
            n_levels = len(net.model.feature_info) if hasattr(net, "model") else 5
            levels = [*range(n_levels), None, ALL_LEVELS]
            multi = build_net(spec, replace(base, strategy="frozen", all_levels=True), len(scan.classes))
            t0 = time.time()
            feats = dataset_features(scan, base, levels)
            print(f"[{name}] {len(feats[None][1])} pool, {len(feats[None][3])} held-out, {base.image_size or 'backbone'} px, features {time.time() - t0:.0f}s", flush=True)
            pool_y = feats[None][1].numpy()
            ty = feats[None][3].numpy()
            for per_class in sizes:
                for seed in range(args.seeds):
                    rng = np.random.default_rng(1000 * seed + per_class)
                    index = np.sort(np.concatenate([
                        rng.permutation(np.flatnonzero(pool_y == c))[:per_class] for c in np.unique(pool_y)
                    ]))
                    t1 = time.time()
                    results = {lv: probe_at(lv, feats, index, len(scan.classes), seed, multi) for lv in [*levels, ALL_BY_FEATURE]}
                    # the rules' order of frozen Plans today: top, every level, then the levels below the top
                    order = [None, ALL_LEVELS, *reversed(range(n_levels))]
                    accuracy = {rule: round(float((p.argmax(1) == ty).mean()), 4) for rule, p in rules(results, order).items()}
                    cells.append({
                        "dataset": name, "per_class": per_class, "seed": seed, "heldout_accuracy": accuracy,
                        "cv": {depth_label(lv): [results[lv]["cv_balanced"], results[lv]["cv_loss"], results[lv]["C"]] for lv in results},
                    })
                    line = ", ".join(f"{r.split(' (')[0]} {a:.3f}" for r, a in accuracy.items() if not r.startswith("fixed"))
                    print(f"  {per_class}/class seed {seed} ({time.time() - t1:.0f}s): {line}", flush=True)
    summary = summarise(cells)
    summary["command"] = " ".join(sys.argv)
    summary["minutes"] = round((time.time() - started) / 60, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**summary, "cells": cells}) + "\n")
    args.out.with_suffix(".md").write_text(format_summary(summary))
    print(format_summary(summary))
    return 0


def summarise(cells: list[dict]) -> dict:
    """Mean held-out accuracy of each rule per dataset and size (over seeds), overall, and
    its paired gap to the product's rule with the standard error over cells x seeds."""
    base = "product (CV bal. acc, ties log-loss)"
    names = list(cells[0]["heldout_accuracy"])
    groups = sorted({(c["dataset"], c["per_class"]) for c in cells}, key=lambda g: (g[1], g[0]))
    table = {}
    for rule in names:
        per_group = {f"{d} {k}/class": float(np.mean([c["heldout_accuracy"][rule] for c in cells if (c["dataset"], c["per_class"]) == (d, k)]))
                     for d, k in groups}
        gaps = np.array([c["heldout_accuracy"][rule] - c["heldout_accuracy"][base] for c in cells])
        table[rule] = {
            "per_group": per_group, "mean": float(np.mean(list(per_group.values()))),
            "gap_to_product": float(gaps.mean()), "gap_se": float(gaps.std(ddof=1) / np.sqrt(len(gaps))) if len(gaps) > 1 else 0.0,
        }
    return {"rules": table, "groups": [f"{d} {k}/class" for d, k in groups], "seeds": len({c["seed"] for c in cells})}


def format_summary(summary: dict) -> str:
    groups = summary["groups"]
    lines = [
        "# Frozen selection rules (benchmarks/bench_frozen_selection.py)", "",
        f"Command: `{summary.get('command', '')}`; {summary['seeds']} seeds; {summary.get('minutes', '?')} min.", "",
        "Held-out accuracy, mean over seeds; gap = rule - product's rule, mean over every (cell, seed) ± its standard error, points.", "",
        "| rule | " + " | ".join(groups) + " | mean | gap to product |",
        "|---|" + "---|" * (len(groups) + 2),
    ]
    for rule, row in summary["rules"].items():
        lines.append(f"| {rule} | " + " | ".join(f"{row['per_group'][g]:.3f}" for g in groups)
                     + f" | {row['mean']:.3f} | {100 * row['gap_to_product']:+.1f} ± {100 * row['gap_se']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
