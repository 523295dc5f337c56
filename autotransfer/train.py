"""Run a Plan with PyTorch Lightning: linear head on cached features, then (partial/full)
fine-tuning from that head (LP-FT), the backbone at a lower learning rate.

Only this module imports Lightning. Output, in the RUN folder: model.pt, plan.json,
scan.json, metrics.json and Lightning CSV logs under logs/.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from autotransfer import __version__
from autotransfer.backbones import BackboneSpec, get_backbone, on_device
from autotransfer.checkpoint import MODEL_FILE, save_model
from autotransfer.data import DatasetScan
from autotransfer.errors import PlanError
from autotransfer.features import (
    cached_features,
    eval_transform,
    image_loader,
    train_transform,
    weights_id,
)
from autotransfer.metrics import balanced_accuracy, classification_report
from autotransfer.plan import Compute, Plan
from autotransfer.probe import ProbeFit, cv_splits, fit_probe, mean_of_best
from autotransfer.strategies import ALL_LEVELS, MultiLevelNet, Preprocessing, TransferNet, build_net


# Inside a run, fine-tuning replaces the linear probe it started from when its validation
# balanced accuracy is higher by at least this many images' worth (x 1/n_val). It was 2
# (a one-image lead is noise), and fine-tuning was then never kept (issue 15); a search
# now judges fine-tuning where it matters, against the best frozen trial on the same
# images, so here it only has to be better.
MIN_FINETUNE_GAIN_IMAGES = 1


# Fine-tuning takes at least this many steps per epoch (smaller batches on few images):
# with one step an epoch, one-cycle's warm-up never happens and Adam's first full-size
# step wrecks a pretrained network (measured: hymenoptera at 10/class, 16 training images
# at batch 32, train loss 0.5 -> 13 in one step, held-out accuracy at chance).
MIN_STEPS_PER_EPOCH = 4


def finetune_batch_size(plan: Plan, n_train: int) -> int:
    return max(2, min(plan.batch_size, n_train // MIN_STEPS_PER_EPOCH))


def finetune_loader(records: list, prep: Preprocessing, plan: Plan, devices: int = 1) -> DataLoader:
    """Shuffled, augmented batches of at least MIN_STEPS_PER_EPOCH per epoch; a last batch
    of one image is dropped (BatchNorm in train mode cannot normalise a single image).

    On several `devices` (DDP) each device takes its share of every batch, so that a step
    sees the Plan's batch and an epoch has as many steps as on one; Lightning's
    DistributedSampler pads each device's share of the images to the same count."""
    batch = max(2, -(-finetune_batch_size(plan, len(records)) // devices))
    share = -(-len(records) // devices)
    return image_loader(records, train_transform(prep, plan.augment), batch, True, plan.seed,
                        drop_last=share % batch == 1)


def finetune_wins(finetune_score: float, head_score: float, n_val: int) -> bool:
    """Does fine-tuning beat the linear head by MIN_FINETUNE_GAIN_IMAGES validation images?
    Scores are validation balanced accuracies (`metrics.balanced_accuracy`)."""
    return round((finetune_score - head_score) * n_val) >= MIN_FINETUNE_GAIN_IMAGES


class ClassifierTask(pl.LightningModule):
    """Cross-entropy training of `module` (inputs -> logits); keeps the best epoch in memory.

    `param_groups` carries the per-group learning rates (head vs backbone). The best
    weights by validation balanced accuracy (ties: lower loss) are restored by
    `restore_best()`; `best_acc` is that epoch's plain accuracy.
    """

    def __init__(
        self, module: nn.Module, param_groups: list[dict], weight_decay: float,
        class_weights: torch.Tensor | None = None,
        report: Callable[[int, float], None] | None = None, label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.module = module
        self.param_groups = param_groups
        self.weight_decay = weight_decay
        self.loss = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)
        self.best_score = -1.0  # validation balanced accuracy of the best epoch
        self.best_acc = -1.0
        self.best_loss = float("inf")
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_logits: torch.Tensor | None = None
        self.best_epoch = -1
        self._val_logits: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []
        self.train_losses: list[float] = []
        self.val_scores: list[float] = []  # val balanced accuracy after each epoch
        self.last_logits: torch.Tensor | None = None  # val logits and accuracy of the last epoch
        self.last_acc = -1.0
        self.report = report  # report(epoch, val balanced accuracy) after each epoch; may raise

    # What fitting found, carried in state_dict(): a spawned DDP worker hands its state dict
    # back to the main process when it ends (Lightning's launcher), and with it this.
    OUTCOME = ("best_score", "best_acc", "best_loss", "best_state", "best_logits", "best_epoch",
               "train_losses", "val_scores", "last_logits", "last_acc")

    def get_extra_state(self) -> dict:
        return {name: getattr(self, name) for name in self.OUTCOME}

    def set_extra_state(self, state: dict) -> None:
        for name in self.OUTCOME:
            setattr(self, name, state[name])

    def __getstate__(self) -> dict:
        """A DDP worker gets no `report`: it runs in another process (fit reports afterwards)."""
        return {**super().__getstate__(), "report": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.train_losses.append(float(loss.detach()))
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss(logits, y), prog_bar=False, on_epoch=True, sync_dist=True)
        self._val_logits.append(logits.detach().float().cpu())
        self._val_targets.append(y.cpu())

    def on_validation_epoch_end(self) -> None:
        logits, targets = torch.cat(self._val_logits), torch.cat(self._val_targets)
        self._val_logits, self._val_targets = [], []
        if self.trainer.world_size > 1:  # every device scores all of val, so all choose the same epoch
            logits, targets = self._all_val(logits), self._all_val(targets)
        acc = float((logits.argmax(1) == targets).float().mean())
        score = balanced_accuracy(logits, targets)
        loss = float(nn.functional.cross_entropy(logits, targets))
        self.log("val_acc", acc, prog_bar=True, sync_dist=True)
        self.log("val_balanced_acc", score, sync_dist=True)
        if self.trainer.sanity_checking:
            return
        self.val_scores.append(score)
        self.last_logits, self.last_acc = logits, acc
        if self.report is not None:
            self.report(self.current_epoch, score)
        # ties (common on small val sets) go to the lower loss: a better calibrated head
        if score > self.best_score or (score == self.best_score and loss < self.best_loss):
            self.best_score, self.best_acc, self.best_loss = score, acc, loss
            self.best_logits = logits
            self.best_epoch = self.current_epoch
            self.best_state = copy.deepcopy(self.module.state_dict())

    def _all_val(self, share: torch.Tensor) -> torch.Tensor:
        """This device's rows of val joined with the others', in val order: Lightning's
        DistributedSampler deals image i to device i % world and pads the end with the first."""
        rows = self.all_gather(share.to(self.device)).cpu()  # (world, share, ...)
        return rows.transpose(0, 1).reshape(-1, *share.shape[1:])[: len(self.trainer.val_dataloaders.dataset)]

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.module.load_state_dict(self.best_state)

    def configure_optimizers(self):
        """AdamW with a one-cycle schedule (warm-up over the first 30 % of the steps, then
        cosine annealing), each group peaking at its own lr: what both fine-tuning
        references of issue 15 (the LP-FT one and fastai's fine_tune) use."""
        optimizer = torch.optim.AdamW(self.param_groups, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in self.param_groups],
            total_steps=max(1, int(self.trainer.estimated_stepping_batches)),
            pct_start=0.3,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class OnInterrupt(pl.Callback):
    """Saves what has been learnt so far when training stops on Ctrl-C (Lightning then
    exits the process with status 1)."""

    def __init__(self, save: Callable[[], None]) -> None:
        self.save = save

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and self.save is not None:
            self.save()

    def __getstate__(self) -> dict:
        """DDP workers save nothing: the main process has the weights to keep (fit)."""
        return {"save": None}


# Lightning's logger for every stage trained: "csv", "tensorboard" or "mlflow" (`fit
# --logger`; api.fit checks the package is there). A context variable, not an argument:
# a search's trials are trained several calls below the fit that chooses it.
LOGGER: ContextVar[str] = ContextVar("autotransfer_logger", default="csv")


def stage_logger(out: Path, stage: str) -> pl.loggers.Logger:
    """One stage's logger: RUN/logs/<stage>/ holds its metrics.csv or TensorBoard events;
    an MLflow run is named <RUN>/<stage> (in MLFLOW_TRACKING_URI, else RUN/logs/mlruns)."""
    kind = LOGGER.get()
    if kind == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger

        return TensorBoardLogger(out / "logs", name=stage, version="", default_hp_metric=False)
    if kind == "mlflow":
        from pytorch_lightning.loggers import MLFlowLogger

        return MLFlowLogger("autotransfer", run_name=f"{out.name}/{stage}", save_dir=str(out / "logs" / "mlruns"))
    return CSVLogger(out / "logs", name=stage, version="")


def trainer_devices(compute: Compute) -> int:
    """How many devices `compute` trains on here; PlanError, in one line and before any
    work, where this machine has not got them or fp16 would run on a CPU."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException
    from pytorch_lightning.accelerators import CPUAccelerator

    if compute.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise PlanError(f"accelerator {compute.accelerator!r} needs a GPU, and torch sees none on this machine "
                        "(torch.cuda.is_available() is False); use --accelerator auto (a GPU where there is one) or cpu")
    try:
        probe = pl.Trainer(accelerator=compute.accelerator, devices=compute.devices, logger=False,
                           enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    except (MisconfigurationException, RuntimeError, ValueError) as exc:
        raise PlanError(f"cannot train on accelerator {compute.accelerator!r} with devices {compute.devices!r} here: "
                        f"{' '.join(str(exc).split())}; use fewer --devices, or --devices auto") from None
    if compute.precision == "16-mixed" and isinstance(probe.accelerator, CPUAccelerator):
        raise PlanError("precision 16-mixed (fp16 autocast) needs a GPU, and this run trains on the CPU; "
                        "use --precision bf16-mixed (the CPU's mixed precision) or 32")
    return probe.num_devices


def main_device(compute: Compute) -> str:
    """Where this process puts the network (features, the linear probe, test): the GPU if
    there is one, unless `compute` says otherwise."""
    return "cuda" if torch.cuda.is_available() and compute.accelerator in ("auto", "gpu", "cuda") else "cpu"


class _SpawnedDDP(pl.strategies.DDPStrategy):
    """DDP whose spawned workers close their process group before they exit: a worker that
    exits with it open can abort (SIGABRT) while gloo's threads still hold tensors
    (pytorch/pytorch#179291)."""

    def teardown(self) -> None:
        super().teardown()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # no worker leaves while another still talks to it
            torch.distributed.destroy_process_group()


def _trainer(
    out: Path, stage: str, epochs: int, callbacks: list[pl.Callback], progress: bool,
    max_seconds: float | None = None, compute: Compute | None = None,
) -> pl.Trainer:
    """A stage's Trainer. On several devices: DDP, its workers started afresh (spawn) for
    this stage alone, so that the run or search around it stays in this process (`_fit`).
    Frozen parameters do not require grad, so DDP looks for no unused ones."""
    compute = compute or Compute()
    several = trainer_devices(compute) > 1
    return pl.Trainer(
        max_epochs=epochs,
        max_time=None if max_seconds is None else timedelta(seconds=max(1.0, max_seconds)),
        accelerator=compute.accelerator,
        devices=compute.devices,
        precision=compute.precision,
        strategy=_SpawnedDDP(start_method="spawn", find_unused_parameters=False) if several else "auto",
        logger=stage_logger(out, stage),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        deterministic=False,
    )


def _fit(trainer: pl.Trainer, task: ClassifierTask, *loaders: DataLoader) -> None:
    """trainer.fit. DDP workers get the network from the CPU (not CUDA memory shared with
    this process) and hand back what they found (`ClassifierTask.OUTCOME`); the network then
    returns to its device, and `task.report` hears each epoch's score, late."""
    if trainer.world_size == 1:
        trainer.fit(task, *loaders)
        return
    for loader in loaders:  # Lightning gives each worker a DistributedSampler seeded by seed_everything
        # instead: a torch.Generator sent to a spawned worker is shared as a temporary
        # tensor whose file descriptor is closed before the worker starts
        loader.generator = None
        if isinstance(loader.sampler, RandomSampler):
            loader.sampler.generator = None
    device = next(task.parameters()).device
    trainer.fit(task.cpu(), *loaders)
    on_device(task, device)
    if task.report is not None:  # a pruned trial stops here, after its fine-tuning
        for epoch, score in enumerate(task.val_scores):
            task.report(epoch, score)


@dataclass
class FitResult:
    run_dir: str
    plan: Plan
    metrics: dict
    features_reused: bool
    seconds: float
    val_logits: torch.Tensor | None = None  # of the kept model, per val image (scan order)


def _feature_batches(feats: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    return DataLoader(
        TensorDataset(feats, labels), batch_size=batch_size, shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
    )


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over present classes: rare classes count more."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), 0.0)
    return weights


def backbone_param_groups(net: TransferNet, plan: Plan) -> list[dict]:
    """Head at `lr`, every trainable backbone parameter at `lr * backbone_lr_ratio`."""
    head = {id(p) for p in net.classifier.parameters()}
    backbone = [p for p in net.parameters() if p.requires_grad and id(p) not in head]
    groups = [{"params": list(net.classifier.parameters()), "lr": plan.lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": plan.lr * plan.backbone_lr_ratio, "name": "backbone"})
    return groups


def fit(
    scan: DatasetScan, plan: Plan, out: str | Path, progress: bool = True,
    log: Callable[[str], None] = print, report: Callable[[int, float], None] | None = None,
    max_seconds: float | None = None, evaluate_test: bool = True, select_on_val: bool = True,
) -> FitResult:
    """Train what `plan` says on `scan`, write the RUN folder `out`, return its metrics.

    `select_on_val` False (a cross-validation fold): fine-tuning keeps its last epoch and
    val only scores it, because a model chosen on the images it is scored on is flattered.

    `report(step, val_balanced_accuracy)` gets the head's best as step 0, then every
    fine-tuning epoch's as steps 1, 2, ...; it may raise to stop the run (pruning).
    Fine-tuning stops after `max_seconds` of the whole run (a search's time budget),
    keeping the best epoch so far. A search's trials skip test/ (`evaluate_test`): only the
    adopted winner is scored there. A frozen Plan's probe is cross-validated on train and
    val together and, where the tool drew val itself, refit on both (unless `plan.refit`
    is off); its val scores are then the out-of-fold ones.
    """
    start = time.perf_counter()
    trainer_devices(plan.compute)  # before any work: this machine has what plan.compute names
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_backbone(plan.backbone)
    classes = scan.classes
    net = build_net(spec, plan, len(classes))
    prep = Preprocessing.for_plan(spec, plan)
    plan.save(out / "plan.json")
    _write_scan(scan, out / "scan.json")
    pl.seed_everything(plan.seed, verbose=False)
    device = main_device(plan.compute)
    on_device(net, device)

    def save() -> None:
        save_model(out / MODEL_FILE, net, spec, plan.feature_level, classes, prep)

    def save_interrupted(stage: str, accuracy: float | None, balanced: float | None) -> None:
        """Ctrl-C: keep the best weights so far and say what they are, so nothing is lost."""
        save()
        (out / "metrics.json").write_text(json.dumps({
            "interrupted": stage,
            "val": {"accuracy": accuracy, "balanced_accuracy": balanced},
            "seconds": round(time.perf_counter() - start, 2), "versions": _versions(),
        }, indent=2) + "\n")

    wid = weights_id(spec, plan.weights, plan.seed)
    level = ALL_LEVELS if plan.all_levels else plan.feature_level  # what the features are cached as
    stages: dict[str, float] = {}  # val accuracy and balanced accuracy after each stage
    kept: str | None = None  # after fine-tuning: which stage's weights were kept, "head" or "finetuned"
    metrics_cv: dict | None = None  # frozen: the probe's cross-validation on every labelled image
    if plan.lp_init:
        features = {
            split: cached_features(
                net, scan, split, prep, spec.architecture, wid, level, progress=progress
            )
            for split in ("train", "val")
        }
        reused = all(reuse for _, _, reuse in features.values())
        log(f"features: {'reused from cache' if reused else 'computed and cached'}")
        (train_f, train_y, _), (val_f, val_y, _) = features["train"], features["val"]
        if plan.strategy == "frozen":  # the probe is the model: chosen and scored by CV on every labelled image
            pool_f, pool_y = torch.cat([train_f, val_f]), torch.cat([train_y, val_y])
            in_train = torch.arange(len(pool_y)) < len(train_y)
            refit = scan.val_drawn and plan.refit
            probe = probe_head(net, pool_f, pool_y, plan, len(classes), fit_on=None if refit else in_train)
            # refit: the head saw val, so its honest val scores are the out-of-fold ones
            val_logits = probe.cv_logits[~in_train] if refit else _logits(net.classifier, val_f)
            metrics_cv = {
                "balanced_accuracy": probe.cv_balanced_accuracy, "accuracy": probe.cv_accuracy,
                "n": len(pool_y), "folds": probe.folds, "C": probe.C, "refit": refit,
                "predicted": probe.cv_logits.argmax(1).tolist(), "target": pool_y.tolist(),
                **({"members": probe.members, "member_scales": probe.member_scales} if probe.members else {}),
            }
            head_score = probe.cv_balanced_accuracy
            log(f"linear probe ({'mean of ' + ', '.join(probe.members) if probe.members else f'C {probe.C:.2g}'}, "
                f"{probe.folds}-fold CV on {len(pool_y)} images): "
                f"accuracy {probe.cv_accuracy:.4f}, balanced {head_score:.4f}"
                + (", refit on all of them" if refit else ""))
        else:  # LP-FT: the probe on train only, so that val can judge the fine-tuning
            probe = probe_head(net, train_f, train_y, plan, len(classes))
            val_logits = _logits(net.classifier, val_f)
            head_score = balanced_accuracy(val_logits, val_y)
            log(f"linear probe on features (C {probe.C:.2g}): val balanced accuracy {head_score:.4f}")
        if report:
            report(0, head_score)
        stages["head_val_accuracy"] = float((val_logits.argmax(1) == val_y).float().mean())
        stages["head_val_balanced_accuracy"] = balanced_accuracy(val_logits, val_y)
        weights = class_weights(train_y, len(classes)) if plan.class_weighting else None
    else:  # plain fine-tuning from a random head: no features, nothing to fall back to
        reused, head_score = False, -1.0
        train_y, val_y = (torch.tensor([r.label for r in scan.splits[s]], dtype=torch.long) for s in ("train", "val"))
        weights = class_weights(train_y, len(classes)) if plan.class_weighting else None
        log("no linear probe first (lp_init false): fine-tuning starts from a random head")
    if plan.strategy != "frozen" and plan.epochs > 0:
        head_state = copy.deepcopy(net.state_dict())
        net.train()
        ft_task = ClassifierTask(
            net, backbone_param_groups(net, plan), plan.weight_decay, weights,
            report=(lambda epoch, acc: report(epoch + 1, acc)) if report else None,
            label_smoothing=plan.label_smoothing,
        )
        left = None if max_seconds is None else max_seconds - (time.perf_counter() - start)

        def keep_better_stage() -> str:
            """Model selection on validation: the fine-tuned weights only if they won by
            MIN_FINETUNE_GAIN_IMAGES, else the head on the pretrained backbone."""
            if not select_on_val:
                return "finetuned"  # the last epoch's weights, as trained
            if finetune_wins(ft_task.best_score, head_score, len(val_y)):
                ft_task.restore_best()
                return "finetuned"
            net.load_state_dict(head_state)
            return "head"

        def finetune_interrupted() -> None:
            if keep_better_stage() == "finetuned":
                save_interrupted("finetune", ft_task.best_acc, ft_task.best_score)
            else:
                save_interrupted("finetune", stages.get("head_val_accuracy"), stages.get("head_val_balanced_accuracy"))

        trainer = _trainer(out, "finetune", plan.epochs, [OnInterrupt(finetune_interrupted)], progress, left, plan.compute)
        train_loader = finetune_loader(scan.splits["train"], prep, plan, trainer.world_size)
        val_loader = image_loader(scan.splits["val"], eval_transform(prep), plan.batch_size)
        _fit(trainer, ft_task, train_loader, val_loader)
        stages["finetune_val_accuracy"] = ft_task.best_acc
        stages["finetune_val_balanced_accuracy"] = ft_task.best_score
        stages["finetune_best_epoch"] = ft_task.best_epoch + 1  # epochs run to reach it
        kept = keep_better_stage()
        if not select_on_val and ft_task.last_logits is not None:
            val_logits = ft_task.last_logits
            stages["finetune_val_accuracy"], stages["finetune_val_balanced_accuracy"] = ft_task.last_acc, ft_task.val_scores[-1]
            stages["finetune_epochs"] = len(ft_task.val_scores)
            log(f"fine-tuned ({plan.strategy}), last epoch: val accuracy {ft_task.last_acc:.4f}, balanced {ft_task.val_scores[-1]:.4f}")
        elif kept == "finetuned":
            val_logits = ft_task.best_logits
            log(f"fine-tuned ({plan.strategy}): val accuracy {ft_task.best_acc:.4f}, balanced {ft_task.best_score:.4f}")
        else:
            log(
                f"fine-tuning ({plan.strategy}) reached val balanced accuracy {ft_task.best_score:.4f}, not "
                f"{MIN_FINETUNE_GAIN_IMAGES} validation images above the linear head's {head_score:.4f}: "
                "keeping the head on the pretrained backbone"
            )
    net.eval()
    save()

    metrics = {
        **({"cv": metrics_cv} if metrics_cv else {}),
        "val": classification_report(val_logits, val_y, classes),
        # per image, so a search can tell a real lead from noise (metrics.balanced_accuracy_gap_se)
        "val_predictions": {"predicted": val_logits.argmax(1).tolist(), "target": val_y.tolist()},
    }
    if evaluate_test and scan.splits.get("test"):
        if plan.strategy == "frozen":
            test_f, test_y, _ = cached_features(
                net, scan, "test", prep, spec.architecture, wid, level, progress=progress
            )
            with torch.inference_mode():  # fresh features are inference tensors
                test_logits = net.classifier(test_f.to(device)).cpu()
        else:
            test_logits, test_y = predict_records(net, scan.splits["test"], prep)
        metrics["test"] = classification_report(test_logits, test_y, classes)
    seconds = time.perf_counter() - start
    metrics.update(
        stages=stages,
        kept=kept,
        seconds=round(seconds, 2),
        features_reused=reused,
        versions=_versions(),
        data_hash={split: scan.content_hash(split) for split in scan.splits},
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return FitResult(str(out), plan, metrics, reused, seconds, val_logits)


# Fine-tuning is cross-validated (k folds over train + val, each fold an LP-FT run) when
# the tool drew val and train + val hold at most this many images: there a val split of
# 20 % is a few images per class, and a fine-tuned trial won on 2 of 4 val images while
# scoring chance on 153 held-out ones (hymenoptera, 10/class). Above it, folds cost k
# fine-tunes and the val split is large enough to compare on.
CV_FINETUNE_MAX_IMAGES = 300


def cross_validate(
    scan: DatasetScan, plan: Plan, out: str | Path, log: Callable[[str], None] = print,
    after_fold: Callable[[int, list[int], list[int]], None] | None = None,
) -> FitResult:
    """Fine-tuning judged like the frozen probe: its k stratified folds over train + val
    (`probe.cv_splits`, the same folds for the same seed), each fold's model scored at its
    last epoch on the images it did not see. The refit on all of them for that many epochs
    (`refit`) is left to the trial the search adopts (`selector`): a trial that loses
    costs no refit (on 100 cifar10 images 8 s of a partial fine-tune's 49).
    No fold picks its best epoch, or its head, on the images it is
    scored on: on 10 images a fold, the best of 7 candidates there is flattered; at
    128 px, flowers 10/class, such a CV led the frozen probe by 6 points (0.88 vs 0.82)
    and lost 7 held-out points to it (benchmarks/results/bench_gpu_128px_seed0.md).

    metrics.json "cv" holds the out-of-fold predictions in train + val order, the order a
    frozen trial's probe uses, so the two are compared on the same images. `after_fold`
    hears (folds done, the pool indices scored so far, their predictions) after each fold
    and may stop the trial by raising (`search.stop_when_behind`)."""
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pool = scan.splits["train"] + scan.splits["val"]
    labels = torch.tensor([r.label for r in pool])
    splits = cv_splits(labels.numpy(), plan.seed)
    folds = len(splits)
    logits = torch.zeros(len(pool), len(scan.classes))
    epochs = []
    for i, (train_idx, val_idx) in enumerate(splits):
        fold = DatasetScan(scan.root, scan.classes, {"train": [pool[j] for j in train_idx], "val": [pool[j] for j in val_idx]},
                           scan.skipped, scan.layout)
        result = fit(fold, plan, out / f"fold{i}", progress=False, log=lambda _: None, evaluate_test=False,
                     select_on_val=False)
        logits[torch.as_tensor(val_idx)] = result.val_logits
        epochs.append(result.metrics["stages"].get("finetune_epochs", plan.epochs))
        log(f"  fold {i + 1} of {folds}: balanced accuracy {result.metrics['val']['balanced_accuracy']:.4f}")
        if after_fold is not None:
            scored = np.concatenate([val for _, val in splits[: i + 1]]).tolist()
            after_fold(i + 1, scored, logits[scored].argmax(1).tolist())
    epochs_refit = int(np.median(epochs))
    in_val = torch.arange(len(pool)) >= len(scan.splits["train"])
    cv_predicted = logits.argmax(1)
    plan.save(out / "plan.json")
    metrics = {
        "cv": {"balanced_accuracy": balanced_accuracy(logits, labels), "accuracy": float((cv_predicted == labels).float().mean()),
               "n": len(pool), "folds": folds, "refit": True,
               "predicted": cv_predicted.tolist(), "target": labels.tolist()},
        "val": classification_report(logits[in_val], labels[in_val], scan.classes),
        "val_predictions": {"predicted": cv_predicted[in_val].tolist(), "target": labels[in_val].tolist()},
        "refit": {"epochs": epochs_refit, "fold_epochs": epochs},  # "images" once the adopted trial is refit
        "stages": {}, "kept": "finetuned" if epochs_refit > 0 else "head",
        "seconds": round(time.perf_counter() - start, 2), "versions": _versions(),
        "data_hash": {split: scan.content_hash(split) for split in scan.splits},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_scan(scan, out / "scan.json")
    return FitResult(str(out), plan, metrics, False, metrics["seconds"], logits[in_val])


class StopAfter(pl.Callback):
    """Ends training after `epochs` epochs of a longer schedule (the Trainer's max_epochs)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def refit(scan: DatasetScan, plan: Plan, out: str | Path, epochs: int, progress: bool = False,
          schedule_epochs: int | None = None) -> int:
    """Retrain a fine-tuning Plan on train and val together: the linear probe on all of
    them, then `epochs` of fine-tuning (the count that was best on the split), with no
    validation left to select on. What a search adopts when it drew val itself: the
    model learns from every labelled image. Writes model.pt; returns the images used.

    The one-cycle schedule spans the `epochs` trained; with `schedule_epochs` it spans
    that many (the split run's) and training stops after `epochs`, where the split's
    best epoch stood in it: what a search ships after a split (benchmarks/bench_refit.py
    measures both)."""
    out = Path(out)
    images = scan.splits["train"] + scan.splits["val"]
    pool = DatasetScan(scan.root, scan.classes, {"train": images}, scan.skipped, scan.layout)
    spec = get_backbone(plan.backbone)
    net = build_net(spec, plan, len(scan.classes))
    prep = Preprocessing.for_plan(spec, plan)
    pl.seed_everything(plan.seed, verbose=False)
    on_device(net, main_device(plan.compute))
    feats, labels, _ = cached_features(
        net, pool, "train", prep, spec.architecture, weights_id(spec, plan.weights, plan.seed), plan.feature_level,
        progress=progress,
    )
    probe_head(net, feats, labels, plan, len(scan.classes))
    net.train()
    if epochs > 0:
        task = ClassifierTask(
            net, backbone_param_groups(net, plan), plan.weight_decay,
            class_weights(labels, len(scan.classes)) if plan.class_weighting else None, label_smoothing=plan.label_smoothing,
        )
        stop = [StopAfter(epochs)] if schedule_epochs and schedule_epochs > epochs else []
        trainer = _trainer(out, "refit", max(epochs, schedule_epochs or 0), stop, progress, compute=plan.compute)
        _fit(trainer, task, finetune_loader(images, prep, plan, trainer.world_size))
    net.eval()
    save_model(out / MODEL_FILE, net, spec, plan.feature_level, scan.classes, prep)
    return len(images)


# Members of an all_levels_mode "ensemble" head: the mean of the 3 best frozen probes by CV
# beat the single best by 0.8 +- 0.2 held-out points (benchmarks/results/frozen_selection.md).
ENSEMBLE_SIZE = 3


def probe_head(
    net: TransferNet | MultiLevelNet, feats: torch.Tensor, labels: torch.Tensor, plan: Plan, num_classes: int,
    fit_on: torch.Tensor | None = None,
) -> ProbeFit:
    """Fit `net`'s classifier as the cross-validated linear probe on cached features.

    A MultiLevelNet standardises with its own first layer, saved with the model: by
    default each level to the same norm (the probe's per-feature standardisation would
    give a level of 1,280 features 80 times the say of one of 16), or per feature
    (Plan.all_levels_mode "feature"). Mode "ensemble" averages the best probes of
    several depths instead (`ensemble_probe`).
    """
    if isinstance(net, MultiLevelNet):
        if plan.all_levels_mode == "ensemble":
            probe = ensemble_probe(net, feats, labels, plan, num_classes, fit_on)
            net.classifier[0].mean.zero_()  # its weights are on raw features
            net.classifier[0].scale.fill_(1.0)
        else:
            probe = levels_probe(net, feats, labels, plan.all_levels_mode, plan, num_classes, fit_on)
        layer = net.classifier[1]
    else:
        layer = net.classifier
        probe = fit_probe(feats, labels, num_classes, plan.class_weighting, plan.seed, fit_on=fit_on)
    with torch.no_grad():
        layer.weight.copy_(probe.weight)
        layer.bias.copy_(probe.bias)
    return probe


def levels_probe(
    net: MultiLevelNet, feats: torch.Tensor, labels: torch.Tensor, mode: str, plan: Plan, num_classes: int,
    fit_on: torch.Tensor | None = None,
) -> ProbeFit:
    """The probe on every level at once, standardised by net's first layer as `mode` says
    (set here); its weights apply after that layer."""
    net.set_standardisation(feats if fit_on is None else feats[fit_on], mode)
    with torch.no_grad():
        feats = net.classifier[0](feats.to(net.classifier[0].mean.device)).cpu()
    return fit_probe(feats, labels, num_classes, plan.class_weighting, plan.seed, standardise=False, fit_on=fit_on)


def ensemble_probe(
    net: MultiLevelNet, feats: torch.Tensor, labels: torch.Tensor, plan: Plan, num_classes: int,
    fit_on: torch.Tensor | None = None,
) -> ProbeFit:
    """The mean of the ENSEMBLE_SIZE best probes by CV among each feature level alone, the
    top, and every level at once in both modes (Plan.ensemble_levels_only: each level
    alone), on the same folds. Every member is affine in the raw features of every level,
    so the mean is one linear layer on them: the model is a MultiLevelNet like any other,
    for predict and export alike."""
    fits, start = {}, 0
    for name, dim in zip([*(f"level {i}" for i in net.levels), "top"], net.dims):
        if name == "top" and plan.ensemble_levels_only:
            break
        fit = fit_probe(feats[:, start:start + dim], labels, num_classes, plan.class_weighting, plan.seed, fit_on=fit_on)
        weight = torch.zeros(num_classes, feats.shape[1])
        weight[:, start:start + dim] = fit.weight
        fits[name] = replace(fit, weight=weight)
        start += dim
    for mode in () if plan.ensemble_levels_only else ("level", "feature"):
        fit = levels_probe(net, feats, labels, mode, plan, num_classes, fit_on)
        standardise = net.classifier[0]
        weight = fit.weight * standardise.scale.cpu()  # (x - mean) * scale, folded into the layer
        fits[f"every level ({mode})"] = replace(fit, weight=weight, bias=fit.bias - weight @ standardise.mean.cpu())
    return mean_of_best(fits, labels, ENSEMBLE_SIZE)


@torch.no_grad()
def _logits(classifier: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    device = next(classifier.parameters()).device
    return classifier(feats.to(device)).float().cpu()


@torch.inference_mode()
def predict_records(net: nn.Module, records, prep: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of `records` through a whole network (eval mode)."""
    net.eval()
    device = next(net.parameters()).device
    logits, labels = [], []
    for images, targets in image_loader(records, eval_transform(prep), 64):
        logits.append(net(images.to(device)).float().cpu())
        labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def _write_scan(scan: DatasetScan, path: Path) -> None:
    summary = {
        "root": scan.root,
        "layout": scan.layout,
        "classes": scan.classes,
        "images": {split: len(records) for split, records in scan.splits.items()},
        "skipped": [asdict(s) for s in scan.skipped],
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")


def _versions() -> dict[str, str]:
    import timm

    return {
        "autotransfer": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "pytorch_lightning": pl.__version__,
        "python": platform.python_version(),
    }
