from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from statistics import mean

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from autotransfer.backbones import get_backbone
from autotransfer.checkpoint import load_model
from autotransfer.data import DatasetScan, scan_folder
from autotransfer.errors import PlanError
from autotransfer.features import cached_features, eval_transform, image_loader, train_transform
from autotransfer.plan import Compute, Plan
from autotransfer.probe import fit_probe
from autotransfer.strategies import Preprocessing, build_net
from autotransfer.features import weights_id
from autotransfer.train import (
    ClassifierTask, backbone_param_groups, finetune_batch_size, finetune_loader, finetune_wins, fit, predict_records,
    trainer_devices,
)
from conftest import CLASSES, FAST

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode"),  # frozen blocks: by design
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]


def quiet_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )


# ---------------------------------------------------------------- LP-FT


def probe_then_finetune(image_folder, bn_mode: str) -> tuple[float, list[float]]:
    """Linear probe on cached features, then 3 fine-tuning steps of the whole network."""
    spec = get_backbone("test_efficientnet")  # has BatchNorm everywhere
    plan = Plan("test_efficientnet", strategy="full", bn_mode=bn_mode, weights="random",
                image_size=32, lr=0.01)
    scan = scan_folder(image_folder)
    net = build_net(spec, plan, num_classes=len(CLASSES))
    prep = Preprocessing.for_plan(spec, plan)
    feats, labels, _ = cached_features(net, scan, "train", prep, "test_efficientnet", "random", None, progress=False)

    pl.seed_everything(0, verbose=False)
    probe = ClassifierTask(net.classifier, [{"params": list(net.classifier.parameters()), "lr": 0.2}], 0.0)
    quiet_trainer(max_epochs=50).fit(probe, DataLoader(TensorDataset(feats, labels), batch_size=64, shuffle=True))
    with torch.no_grad():
        lp_loss = float(torch.nn.functional.cross_entropy(net.classifier(feats), labels))

    net.train()  # as train.fit does before fine-tuning
    finetune = ClassifierTask(net, backbone_param_groups(net, plan), plan.weight_decay)
    loader = image_loader(scan.splits["train"], train_transform(prep), batch_size=6, shuffle=True, seed=0)
    quiet_trainer(max_steps=3).fit(finetune, loader)
    return lp_loss, finetune.train_losses


def test_lp_ft_with_frozen_bn_starts_where_the_linear_probe_ended(image_folder):
    lp_loss, ft_losses = probe_then_finetune(image_folder, bn_mode="frozen")
    assert lp_loss < 0.5  # the probe learnt: chance is ln 3 = 1.1
    assert len(ft_losses) == 3
    assert mean(ft_losses) <= 2 * lp_loss + 0.05, (lp_loss, ft_losses)


def test_lp_ft_check_is_sensitive_to_batch_statistics(image_folder):
    """Control: BN on batch statistics (bn_mode 'train') breaks the probe's features."""
    lp_loss, ft_losses = probe_then_finetune(image_folder, bn_mode="train")
    assert ft_losses[0] > 2 * lp_loss + 0.05, (lp_loss, ft_losses)


class ModeProbe(pl.Callback):
    """Records, at every training step, which modules Lightning left in train mode."""

    def __init__(self) -> None:
        self.steps: list[dict[str, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append({n: m.training for n, m in pl_module.module.model.named_modules()})


def test_frozen_modules_stay_in_eval_mode_inside_lightning_training(image_folder):
    """Lightning switches modes around each validation loop; the frozen part must not move."""
    spec = get_backbone("test_efficientnet")
    plan = Plan("test_efficientnet", strategy="partial", cut=3, bn_mode="frozen", **FAST)
    net = build_net(spec, plan, num_classes=len(CLASSES))
    prep = Preprocessing.for_plan(spec, plan)
    scan = scan_folder(image_folder)
    net.train()
    task = ClassifierTask(net, backbone_param_groups(net, plan), plan.weight_decay)
    probe = ModeProbe()
    quiet_trainer(max_epochs=2, limit_train_batches=2, callbacks=[probe]).fit(
        task,
        image_loader(scan.splits["train"], train_transform(prep), 4, shuffle=True),
        image_loader(scan.splits["val"], eval_transform(prep), 4),
    )
    assert len(probe.steps) == 4  # 2 epochs x 2 batches; a validation loop between them
    modules = dict(net.model.named_modules())
    for training in probe.steps:
        assert training[""] and training["classifier"]
        for name, module in modules.items():
            if isinstance(module, torch.nn.BatchNorm2d) or name.startswith(("conv_stem", "bn1", "blocks.0", "blocks.1")):
                assert not training[name], name
        assert training["blocks.2.0.conv_exp"] and training["blocks.4.0.conv_pw"] and training["conv_head"]


# ---------------------------------------------------------------- fit


def test_fit_frozen_writes_a_complete_run(split_folder, tmp_path):
    scan = scan_folder(split_folder)
    plan = Plan("test_efficientnet", **FAST)
    lines: list[str] = []
    result = fit(scan, plan, tmp_path / "run", progress=False, log=lines.append)

    run = tmp_path / "run"
    for name in ("model.pt", "plan.json", "scan.json", "metrics.json"):
        assert (run / name).is_file(), name
    assert not (run / "logs" / "finetune").exists()
    assert Plan.load(run / "plan.json") == plan
    assert json.loads((run / "scan.json").read_text())["images"] == {"train": 18, "val": 6, "test": 6}

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert metrics["val"]["accuracy"] == 1.0  # colour classes: separable even by a random net
    assert metrics["test"]["accuracy"] == 1.0
    assert metrics["val"]["n"] == 6 and metrics["test"]["n"] == 6
    assert list(metrics["val"]["per_class_accuracy"]) == CLASSES
    assert metrics["stages"] == {"head_val_accuracy": 1.0, "head_val_balanced_accuracy": 1.0}
    cv = metrics["cv"]  # the probe's cross-validation on train and val together
    assert cv["n"] == 24 and len(cv["predicted"]) == len(cv["target"]) == 24 and cv["folds"] == 5
    assert cv["refit"] is False  # val/ came with the data: it stays a validation set
    assert set(metrics["data_hash"]) == {"train", "val", "test"}
    assert metrics["features_reused"] is False and result.features_reused is False
    assert "features: computed and cached" in lines

    again = fit(scan, plan, tmp_path / "again", progress=False, log=lines.append)
    assert again.features_reused is True
    assert lines[-2:] == ["features: reused from cache", lines[-1]]
    assert again.metrics["val"] == result.metrics["val"]


def test_fit_partial_saves_the_model_whose_metrics_it_reports(split_folder, tmp_path):
    scan = scan_folder(split_folder)
    plan = Plan("test_resnet", strategy="partial", cut=2, **FAST)
    result = fit(scan, plan, tmp_path / "run", progress=False, log=lambda _: None)

    stages = result.metrics["stages"]
    assert set(stages) == {f"{stage}_val_{score}" for stage in ("head", "finetune") for score in ("accuracy", "balanced_accuracy")} | {
        "finetune_best_epoch"}
    assert stages["finetune_best_epoch"] == 1  # FAST: one epoch
    kept = result.metrics["kept"]
    wins = finetune_wins(stages["finetune_val_balanced_accuracy"], stages["head_val_balanced_accuracy"], result.metrics["val"]["n"])
    assert kept == ("finetuned" if wins else "head")
    stage = "finetune" if kept == "finetuned" else "head"
    for score in ("accuracy", "balanced_accuracy"):
        assert result.metrics["val"][score] == pytest.approx(stages[f"{stage}_val_{score}"])
    assert (tmp_path / "run" / "logs" / "finetune" / "metrics.csv").is_file()

    model, classes, prep = load_model(tmp_path / "run")
    assert classes == CLASSES and prep.input_size == 32
    for split in ("val", "test"):
        logits, labels = predict_records(model, scan.splits[split], prep)
        accuracy = float((logits.argmax(1) == labels).float().mean())
        assert accuracy == pytest.approx(result.metrics[split]["accuracy"]), split
    logits, labels = predict_records(model, scan.splits["val"], prep)  # what a search judges noise by
    assert result.metrics["val_predictions"] == {"predicted": logits.argmax(1).tolist(), "target": labels.tolist()}


def test_fit_full_on_a_truncated_vit(image_folder, tmp_path):
    scan = scan_folder(image_folder)
    plan = Plan("test_vit", strategy="full", feature_level=3, **FAST)
    result = fit(scan, plan, tmp_path / "run", progress=False, log=lambda _: None)
    assert result.metrics["val"]["accuracy"] >= 5 / 6
    assert "test" not in result.metrics  # class folders: no test split
    model, _, _ = load_model(tmp_path / "run")
    assert len(model.blocks) == 4  # blocks above feature level 3 are gone


# ---------------------------------------------------------------- pieces


def test_backbone_param_groups_split_head_and_trainable_backbone():
    plan = Plan("test_resnet", strategy="partial", cut=2, weights="random", lr=0.1, backbone_lr_ratio=0.25)
    net = build_net(get_backbone("test_resnet"), plan, 3)
    head, backbone = backbone_param_groups(net, plan)
    assert (head["name"], head["lr"], backbone["name"], backbone["lr"]) == ("head", 0.1, "backbone", 0.025)
    assert {id(p) for p in head["params"]} == {id(p) for p in net.model.fc.parameters()}
    expected = {id(p) for n, p in net.model.named_parameters() if p.requires_grad and not n.startswith("fc.")}
    assert {id(p) for p in backbone["params"]} == expected
    assert all(p.requires_grad for p in backbone["params"])

    frozen = Plan("test_resnet", weights="random")
    assert [g["name"] for g in backbone_param_groups(build_net(get_backbone("test_resnet"), frozen, 3), frozen)] == ["head"]


def test_weights_id_identifies_the_weights(tmp_path):
    spec = get_backbone("test_resnet")
    assert weights_id(spec, "random", 3) == "random:seed=3"
    assert weights_id(spec, "pretrained", 0) == "pretrained:autotransfer:test_resnet"

    path = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(2)}, path)
    first = weights_id(spec, str(path), 0)
    assert str(path.resolve()) in first
    stat = path.stat()
    torch.save({"a": torch.ones(3)}, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert weights_id(spec, str(path), 0) != first


def test_classifier_task_keeps_and_restores_the_best_epoch():
    torch.manual_seed(0)
    x = torch.randn(30, 4)
    y = (x[:, 0] > 0).long()
    head = torch.nn.Linear(4, 2)
    task = ClassifierTask(head, [{"params": list(head.parameters()), "lr": 0.1}], 0.0)
    batches = DataLoader(TensorDataset(x, y), batch_size=10)
    quiet_trainer(max_epochs=8).fit(task, batches, batches)
    assert 0.0 <= task.best_acc <= 1.0 and task.best_state is not None
    best = float((task.best_logits.argmax(1) == y).float().mean())
    assert best == pytest.approx(task.best_acc)
    torch.nn.init.zeros_(head.weight)
    task.restore_best()
    with torch.no_grad():
        torch.testing.assert_close(head(x), task.best_logits)


class ScriptedPredictions(torch.nn.Module):
    """Predicts, in validation epoch e, the classes scripted for e (x[:, 0] is the index)."""

    def __init__(self, script: list[list[int]]) -> None:
        super().__init__()
        self.script, self.epoch = script, -1
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return torch.zeros(len(x), 2) + self.w
        preds = torch.tensor([self.script[self.epoch][int(i)] for i in x[:, 0]])
        return torch.nn.functional.one_hot(preds, 2).float()


def test_classifier_task_keeps_the_epoch_with_the_best_balanced_accuracy():
    """8 images of class 0, 2 of class 1: guessing the majority scores 0.8 accuracy but
    0.5 balanced; the epoch right on both classes (0.7 accuracy) is the one to keep."""
    y = torch.tensor([0] * 8 + [1] * 2)
    majority, both, majority_again = [0] * 10, [0] * 5 + [1] * 3 + [1] * 2, [0] * 10
    module = ScriptedPredictions([majority, both, majority_again])
    reported = []
    task = ClassifierTask(module, [{"params": [module.w], "lr": 0.1}], 0.0,
                          report=lambda epoch, score: reported.append((epoch, score)))

    class NextEpoch(pl.Callback):
        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            module.epoch += 1

    batches = DataLoader(TensorDataset(torch.arange(10.0).unsqueeze(1), y), batch_size=10)
    quiet_trainer(max_epochs=3, callbacks=[NextEpoch()]).fit(task, batches, batches)
    assert reported == [(0, 0.5), (1, pytest.approx(0.8125)), (2, 0.5)]
    assert task.best_score == pytest.approx(0.8125) and task.best_acc == pytest.approx(0.7)


def test_fine_tuning_must_beat_its_probe_by_a_validation_image():
    assert not finetune_wins(0.874, 0.87, 100)  # under half an image: a rounding difference
    assert finetune_wins(0.88, 0.87, 100)
    assert not finetune_wins(0.5, 0.5, 10)
    assert finetune_wins(0.2, -1.0, 10)  # no linear probe (head accuracy -1): fine-tuning is all there is
    assert finetune_wins(0.8012, 0.8010, 10000)


def test_ctrl_c_during_fine_tuning_keeps_the_best_model_and_says_so(split_folder, tmp_path):
    scan = scan_folder(split_folder)
    plan = Plan("test_resnet", strategy="full", **{**FAST, "epochs": 3})

    def report(step: int, _accuracy: float) -> None:
        if step == 2:  # the second fine-tuning epoch has been validated: press Ctrl-C
            raise KeyboardInterrupt

    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown exits with status 1
            fit(scan, plan, tmp_path / "run", progress=False, log=lambda _: None, report=report)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while exiting
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["interrupted"] == "finetune"
    model, _, prep = load_model(tmp_path / "run")
    logits, labels = predict_records(model, scan.splits["val"], prep)
    assert float((logits.argmax(1) == labels).float().mean()) == pytest.approx(metrics["val"]["accuracy"])


def test_frozen_fit_refits_the_probe_on_every_labelled_image_when_it_drew_val(image_folder, tmp_path):
    scan = scan_folder(image_folder, val_fraction=0.25, seed=1)
    assert scan.val_drawn
    plan = Plan("test_efficientnet", **FAST)
    refit = fit(scan, plan, tmp_path / "refit", progress=False, log=lambda _: None)
    kept = fit(scan, replace(plan, refit=False), tmp_path / "kept", progress=False, log=lambda _: None)
    assert refit.metrics["cv"]["refit"] is True and kept.metrics["cv"]["refit"] is False
    # the same cross-validation (so the same C and the same out-of-fold val scores)...
    assert refit.metrics["cv"] == {**kept.metrics["cv"], "refit": True}
    # ...but the refit head is the probe fitted on train + val, the other on train alone
    spec = get_backbone("test_efficientnet")
    net = build_net(spec, plan, len(CLASSES))
    prep = Preprocessing.for_plan(spec, plan)
    feats = {s: cached_features(net, scan, s, prep, spec.architecture, weights_id(spec, "random", 0), None, progress=False)
             for s in ("train", "val")}
    pool_f = torch.cat([feats["train"][0], feats["val"][0]])
    pool_y = torch.cat([feats["train"][1], feats["val"][1]])
    everything = fit_probe(pool_f, pool_y, len(CLASSES))
    train_only = fit_probe(pool_f, pool_y, len(CLASSES), fit_on=torch.arange(len(pool_y)) < len(feats["train"][1]))
    for run, probe in (("refit", everything), ("kept", train_only)):
        model, _, _ = load_model(tmp_path / run)
        head = model.get_classifier()
        assert torch.allclose(head.weight, probe.weight, atol=1e-5), run
        assert torch.allclose(head.bias, probe.bias, atol=1e-5), run
    assert not torch.allclose(everything.weight, train_only.weight, atol=1e-3)


def test_fine_tuning_batches_give_every_epoch_steps_and_never_a_single_image(image_folder):
    spec = get_backbone("test_efficientnet")
    plan = Plan("test_efficientnet", strategy="full", bn_mode="train", weights="random", image_size=32, batch_size=32)
    prep = Preprocessing.for_plan(spec, plan)
    records = scan_folder(image_folder).splits["train"]
    for n in (9, 16, 17):  # 9 at batch 2 would end on one image: BatchNorm in train mode fails on it
        sizes = [len(y) for _, y in finetune_loader(records[:n], prep, plan)]
        assert len(sizes) >= 4 and min(sizes) >= 2, (n, sizes)


# ---------------------------------------------------------------- compute: devices and precision


def test_two_cpu_processes_fine_tune_as_one_and_only_this_process_writes_the_run(image_folder, tmp_path):
    """DDP over 2 spawned CPU processes (gloo) on a partial Plan: the frozen groups trip no
    unused-parameter error, every val image is scored once and in order (5 images on 2
    devices: the sampler pads), the workers' best epoch and scores come back, and only
    this process writes: one model.pt, whose predictions are the ones reported."""
    scan = scan_folder(image_folder)
    train, val = scan.splits["train"], scan.splits["val"][:5]
    scan = DatasetScan(scan.root, scan.classes, {"train": train, "val": val}, scan.skipped, scan.layout)
    plan = Plan("test_resnet", strategy="partial", cut=1, lp_init=False, **{**FAST, "epochs": 2},
                compute=Compute("cpu", 2))
    reports = []
    result = fit(scan, plan, tmp_path / "run", progress=False, log=lambda _: None,
                 report=lambda step, score: reports.append((step, score)))

    stages = result.metrics["stages"]
    assert [step for step, _ in reports] == [1, 2]  # heard after the workers ended
    assert max(score for _, score in reports) == stages["finetune_val_balanced_accuracy"]
    assert result.metrics["kept"] == "finetuned"  # lp_init false: the DDP-trained weights are the model
    assert [p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*.pt")] == [Path("model.pt")]
    assert result.metrics["val_predictions"]["target"] == [r.label for r in val]
    model, _, prep = load_model(tmp_path / "run")
    logits, labels = predict_records(model, val, prep)
    assert result.metrics["val_predictions"]["predicted"] == logits.argmax(1).tolist()
    assert result.metrics["val"]["accuracy"] >= 0.6  # colours: a network that trained at all


def test_bf16_mixed_precision_fine_tunes_on_the_cpu(image_folder, tmp_path):
    scan = scan_folder(image_folder)
    plan = Plan("test_resnet", strategy="partial", cut=1, **FAST, compute=Compute("cpu", 1, "bf16-mixed"))
    result = fit(scan, plan, tmp_path / "run", progress=False, log=lambda _: None)
    assert result.metrics["stages"]["finetune_best_epoch"] == 1
    assert result.metrics["val"]["accuracy"] >= 5 / 6
    model, _, _ = load_model(tmp_path / "run")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # mixed: the weights stay fp32
    assert Plan.load(tmp_path / "run" / "plan.json").compute.precision == "bf16-mixed"


def test_compute_is_checked_against_this_machine_before_any_work():
    assert trainer_devices(Compute("cpu", 2)) == 2 and trainer_devices(Compute("cpu", "auto")) == 1
    with pytest.raises(PlanError, match=r"^precision 16-mixed \(fp16 autocast\) needs a GPU, .*use --precision bf16-mixed"):
        trainer_devices(Compute("cpu", 1, "16-mixed"))
    if not torch.cuda.is_available():
        with pytest.raises(PlanError, match=r"^accelerator 'gpu' needs a GPU, and torch sees none"):
            trainer_devices(Compute("gpu"))


def test_on_several_devices_each_takes_a_share_of_every_batch_and_never_a_single_image(image_folder):
    spec = get_backbone("test_efficientnet")
    plan = Plan("test_efficientnet", strategy="full", bn_mode="train", weights="random", image_size=32, batch_size=8)
    prep = Preprocessing.for_plan(spec, plan)
    records = scan_folder(image_folder).splits["train"]
    for n in (9, 13, 16):
        loader = finetune_loader(records[:n], prep, plan, devices=2)
        assert loader.batch_size == max(2, -(-finetune_batch_size(plan, n) // 2))  # half, rounded up
        for rank in (0, 1):  # as Lightning re-makes the loader in each DDP worker
            sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True)
            sizes = [len(y) for _, y in DataLoader(loader.dataset, loader.batch_size, sampler=sampler, drop_last=loader.drop_last)]
            assert min(sizes) >= 2, (n, rank, sizes)


def test_cross_validation_tells_after_each_fold_what_it_scored_and_stops_when_told(image_folder, tmp_path):
    """after_fold hears the pool indices scored so far and their predictions; raising there
    stops the trial before the next fold and before the refit (no model.pt)."""
    from autotransfer.probe import cv_splits
    from autotransfer.train import cross_validate

    class Stop(Exception):
        pass

    scan = scan_folder(image_folder)
    plan = Plan("test_resnet", strategy="partial", cut=1, **FAST)
    pool = scan.splits["train"] + scan.splits["val"]
    splits = cv_splits(torch.tensor([r.label for r in pool]).numpy(), plan.seed)
    heard = []

    def after_fold(folds, images, predicted):
        heard.append((folds, images, predicted))
        if folds == 2:
            raise Stop

    with pytest.raises(Stop):
        cross_validate(scan, plan, tmp_path / "trial", log=lambda _: None, after_fold=after_fold)
    assert [folds for folds, _, _ in heard] == [1, 2]
    assert heard[0][1] == splits[0][1].tolist() and sorted(heard[1][1]) == sorted(splits[0][1].tolist() + splits[1][1].tolist())
    assert all(len(predicted) == len(images) and set(predicted) <= set(range(len(CLASSES))) for _, images, predicted in heard)
    assert sorted(p.name for p in (tmp_path / "trial").iterdir()) == ["fold0", "fold1"]


def test_an_ensemble_head_is_one_linear_layer_giving_the_mean_of_its_members_scaled_logits():
    from autotransfer.probe import cv_log_loss, logit_scale
    from autotransfer.train import ENSEMBLE_SIZE, levels_probe, probe_head

    plan = Plan("test_resnet", weights="random", image_size=32, all_levels=True, all_levels_mode="ensemble")
    net = build_net(get_backbone("test_resnet"), plan, 3)
    torch.manual_seed(0)
    labels = torch.arange(3).repeat(8)
    with torch.no_grad():  # images whose class shifts their brightness: every level sees some of it
        feats = net.features(torch.randn(24, 3, 32, 32) + labels.view(-1, 1, 1, 1).float())
    probe = probe_head(net, feats, labels, plan, 3)
    assert len(probe.members) == ENSEMBLE_SIZE and len(set(probe.members)) == ENSEMBLE_SIZE
    # each member again, on its own: a probe on one level's (or the top's) features, or on every level
    other = build_net(get_backbone("test_resnet"), plan, 3)
    logits, fits, start = {}, {}, 0
    for name, dim in zip([*(f"level {i}" for i in net.levels), "top"], net.dims):
        fits[name] = fit_probe(feats[:, start:start + dim], labels, 3, seed=plan.seed)
        logits[name] = feats[:, start:start + dim] @ fits[name].weight.T + fits[name].bias
        start += dim
    for mode in ("level", "feature"):
        fits[f"every level ({mode})"] = levels_probe(other, feats, labels, mode, plan, 3)
        with torch.no_grad():
            logits[f"every level ({mode})"] = other.classifier[0](feats) @ fits[f"every level ({mode})"].weight.T + fits[f"every level ({mode})"].bias
    best = sorted(fits, key=lambda n: (-fits[n].cv_balanced_accuracy, cv_log_loss(fits[n].cv_logits, labels)))[:ENSEMBLE_SIZE]
    assert probe.members == best
    scales = [logit_scale(fits[n].cv_logits, labels) for n in best]  # each to its lowest out-of-fold log-loss
    assert probe.member_scales == pytest.approx(scales, abs=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(net.classifier(feats), torch.stack([s * logits[n] for s, n in zip(scales, best)]).mean(0),
                                   rtol=1e-4, atol=1e-3)


def test_a_far_ensemble_head_averages_single_levels_and_reads_nothing_of_the_top():
    from autotransfer.train import ENSEMBLE_SIZE, probe_head

    plan = Plan("test_resnet", weights="random", image_size=32, all_levels=True, all_levels_mode="ensemble",
                ensemble_levels_only=True)
    net = build_net(get_backbone("test_resnet"), plan, 3)
    torch.manual_seed(0)
    labels = torch.arange(3).repeat(8)
    with torch.no_grad():
        feats = net.features(torch.randn(24, 3, 32, 32) + labels.view(-1, 1, 1, 1).float())
    probe = probe_head(net, feats, labels, plan, 3)
    levels = [f"level {i}" for i in net.levels]
    assert len(probe.members) == min(ENSEMBLE_SIZE, len(levels)) and set(probe.members) <= set(levels)
    top = net.classifier[1].weight[:, -net.dims[-1]:]
    assert torch.count_nonzero(top) == 0
    assert torch.count_nonzero(net.classifier[1].weight) > 0


def test_a_refit_on_the_split_runs_schedule_stops_after_the_best_epoch(image_folder, tmp_path):
    """refit(schedule_epochs=N): the one-cycle spans N epochs and training stops after
    `epochs` (bench_refit compares it with the schedule squeezed into `epochs`)."""
    import csv

    from autotransfer.train import refit

    scan = scan_folder(image_folder, val_fraction=0.25, seed=1)
    plan = Plan("test_efficientnet", strategy="full", **{**FAST, "epochs": 3})

    def trained_epochs(folder: Path) -> int:
        with (folder / "logs" / "refit" / "metrics.csv").open() as f:
            return len({row["epoch"] for row in csv.DictReader(f) if row.get("train_loss")})

    def weights(folder: Path) -> dict:
        return torch.load(folder / "model.pt", weights_only=False)["state_dict"]

    refit(scan, plan, tmp_path / "squeezed", 2)
    refit(scan, plan, tmp_path / "along", 2, schedule_epochs=3)
    assert trained_epochs(tmp_path / "squeezed") == trained_epochs(tmp_path / "along") == 2
    squeezed, along = weights(tmp_path / "squeezed"), weights(tmp_path / "along")
    assert squeezed.keys() == along.keys()
    assert any(not torch.equal(squeezed[k], along[k]) for k in squeezed)  # same seed and images: only the schedule differs
