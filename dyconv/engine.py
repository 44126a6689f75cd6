"""Training and evaluation loops, schedules, and checkpoints of the DY-Conv trainer.

Schedules are pure functions of the global iteration, so a checkpoint only needs
the step count to resume them exactly:

* learning rate: linear warmup, then ``cosine`` (to 0) or ``step`` (x0.1 at 30%, 60%
  and 90% of all iterations),
* temperature: ``dyconv.layers.temperature_schedule`` (init -> 1 over the first
  ``temp_epochs`` epochs, per iteration).

Weight decay applies to conv/linear weights and the PAD kernels and static weights;
BatchNorm parameters, biases and the PAD scale-factor logits ``phi`` (all tensors of
at most one dimension) get none, as decaying ``phi`` would pull both scale factors
towards 1 for no reason but the regulariser.
"""
from __future__ import annotations

import math
import os
import pickle
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dyconv.layers import set_temperature, temperature_schedule

LR_SCHEDULES = ("cosine", "step")
STEP_MILESTONES = (0.3, 0.6, 0.9)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of another model."""


# ---------------------------------------------------------------- schedules and optimiser

def learning_rate(step: int, total_steps: int, base_lr: float, schedule: str = "cosine", warmup_steps: int = 0) -> float:
    """The learning rate of iteration ``step`` (0-based) out of ``total_steps``."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    progress = step / max(1, total_steps)
    return base_lr * 0.1 ** sum(progress >= m for m in STEP_MILESTONES)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two SGD groups: decayed weights, and BN/bias/phi (ndim <= 1) without weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".phi") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------- mixup, accuracy

def mixup(images: torch.Tensor, targets: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al. 2018): ``lam x + (1 - lam) x[perm]``, ``lam ~ Beta(alpha, alpha)``.

    Returns ``(mixed images (B, ...), targets (B,), targets[perm] (B,), lam)``.
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(images.shape[0], device=images.device)
    return lam * images + (1.0 - lam) * images[perm], targets, targets[perm], lam


def correct_topk(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(targets[:, None])
    return [int(hits[:, :min(k, logits.shape[1])].any(dim=1).sum()) for k in ks]


# ---------------------------------------------------------------- loops

@dataclass
class TrainSettings:
    """Per-iteration schedules and the options of one training step."""
    base_lr: float
    lr_schedule: str
    warmup_steps: int
    total_steps: int
    temp_init: float
    temp_anneal_steps: int
    mixup_alpha: float = 0.0
    amp: bool = False

    def lr(self, step: int) -> float:
        return learning_rate(step, self.total_steps, self.base_lr, self.lr_schedule, self.warmup_steps)

    def temperature(self, step: int) -> float:
        return temperature_schedule(step, self.temp_anneal_steps, init=self.temp_init, final=1.0)


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CPU, float16 on CUDA (with a GradScaler), or nothing."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                    settings: TrainSettings, step: int, device: torch.device, scaler=None, writer=None,
                    epoch: int = 0, progress: bool = True) -> tuple[float, int]:
    """One pass over ``loader`` (batches ``(images (B, C, H, W), labels (B,))``).

    Sets lr and temperature before every iteration from the global ``step``.
    Returns ``(mean training loss, global step after the epoch)``.
    """
    model.train()
    total_loss, batches = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1} train", disable=None if progress else True, leave=False)
    for images, targets in bar:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        lr, temperature = settings.lr(step), settings.temperature(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        set_temperature(unwrap(model), temperature)
        with autocast(device, settings.amp):
            if settings.mixup_alpha > 0:
                images, targets_a, targets_b, lam = mixup(images, targets, settings.mixup_alpha)
                logits = model(images)
                loss = lam * criterion(logits, targets_a) + (1.0 - lam) * criterion(logits, targets_b)
            else:
                loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at iteration {step}")
        total_loss, batches = total_loss + value, batches + 1
        if writer is not None:
            writer.add_scalar("train/loss", value, step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/temperature", temperature, step)
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.3g}", tau=f"{temperature:.2f}")
        step += 1
    return total_loss / max(1, batches), step


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool = False, distributed: bool = False,
             progress: bool = True) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and mean cross entropy over ``loader``.

    With ``distributed``, every rank evaluates its shard and the sums are all-reduced.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, samples
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for images, targets in tqdm(loader, desc="evaluate", disable=None if progress else True, leave=False):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        top1, top5 = correct_topk(logits.float(), targets)
        sums += torch.tensor([float(criterion(logits.float(), targets)), top1, top5, len(targets)],
                             dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(sums)
    n = max(1.0, float(sums[3]))
    return {"top1": 100.0 * float(sums[1]) / n, "top5": 100.0 * float(sums[2]) / n, "loss": float(sums[0]) / n,
            "samples": int(sums[3])}


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Writes ``state`` (tensors and plain Python values only) to a temporary file, then renames it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("model", "meta", "epoch", "step")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Loads a checkpoint with ``weights_only=True``; CheckpointError when missing, truncated or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or not a checkpoint: {reason}") from None
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"checkpoint {path} is not a dyconv checkpoint (expected keys {CHECKPOINT_KEYS})")
    return state


def check_compatible(checkpoint_meta: dict, run_meta: dict, path: str | os.PathLike = "checkpoint") -> None:
    """CheckpointError naming the first field where the checkpoint's model differs from the run's."""
    for key, value in run_meta.items():
        if checkpoint_meta.get(key) != value:
            raise CheckpointError(f"checkpoint {path} holds a model with {key}={checkpoint_meta.get(key)!r}, "
                                  f"but this run builds {key}={value!r}")
