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

Checkpoints carry the SHA-256 of their serialized state and are fsync'ed before they
replace the old file; :func:`load_checkpoint` turns any unreadable or foreign file into one
:class:`CheckpointError`, and one whose checksum does not match (or that has none) into one
:class:`pad.runtime.IntegrityError`.  A non-finite loss raises :class:`TrainingDiverged`
before the optimizer step.
"""
from __future__ import annotations

import io
import math
import os
import random
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dyconv.layers import set_temperature, temperature_schedule
from pad.runtime import TEMPORARY_SUFFIX, atomic_link, atomic_write, predates, sha256_bytes, verify

LR_SCHEDULES = ("cosine", "step")
STEP_MILESTONES = (0.3, 0.6, 0.9)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, damaged, or of another model."""


class TrainingDiverged(FloatingPointError):
    """A non-finite loss, weight or BatchNorm statistic; raised before anything of that epoch is saved."""

    def __init__(self, epoch: int, step: int, what: str):
        super().__init__(f"training diverged in epoch {epoch} (iteration {step}): {what}")
        self.epoch, self.step, self.what = epoch, step, what


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


@dataclass
class EpochProgress:
    """Where a run is inside an epoch: batches done and the sum of their losses (a recovery checkpoint's record)."""
    batches: int = 0
    loss_sum: float = 0.0

    def mean_loss(self) -> float:
        return self.loss_sum / max(1, self.batches)


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                    settings: TrainSettings, step: int, device: torch.device, scaler=None, writer=None,
                    epoch: int = 0, progress: bool = True, distributed: bool = False,
                    resume_at: EpochProgress | None = None, on_resumed=None, after_step=None) -> tuple[float, int]:
    """One pass over ``loader`` (batches ``(images (B, C, H, W), labels (B,))``).

    Sets lr and temperature before every iteration from the global ``step``.  The loss
    (averaged over ranks with ``distributed``, so every rank decides alike) is checked
    before the backward pass: a non-finite one raises :class:`TrainingDiverged` before
    the weights take the step.  Returns ``(mean training loss, global step after the epoch)``.

    ``resume_at`` continues an epoch a recovery checkpoint stopped inside: its first ``batches`` batches are
    drawn and dropped (so the shuffle and every worker's random stream advance exactly as they did), then
    ``on_resumed()`` restores the saved random states.  ``after_step(step, progress)`` runs after every
    optimizer step (recovery checkpoints, stop signals).
    """
    model.train()
    done = EpochProgress() if resume_at is None else EpochProgress(resume_at.batches, resume_at.loss_sum)
    batches = iter(loader)
    for _ in range(done.batches):
        next(batches)
    if on_resumed is not None:
        on_resumed()
    bar = tqdm(batches, desc=f"epoch {epoch + 1} train", disable=None if progress else True, leave=False,
               initial=done.batches, total=len(loader))
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
        value = loss.detach().float()
        if distributed:
            dist.all_reduce(value)
            value /= dist.get_world_size()
        value = float(value)
        if not math.isfinite(value):
            raise TrainingDiverged(epoch + 1, step, f"the training loss is {value}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        done.batches, done.loss_sum = done.batches + 1, done.loss_sum + value
        if writer is not None:
            writer.add_scalar("train/loss", value, step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/temperature", temperature, step)
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.3g}", tau=f"{temperature:.2f}")
        step += 1
        if after_step is not None:
            after_step(step, done)
    return done.mean_loss(), step


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


# ---------------------------------------------------------------- divergence

def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers (BatchNorm statistics included) holding NaN or inf."""
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    if not state:
        return []
    finite = torch.stack([torch.isfinite(v).all() for v in state.values()]).cpu()  # one device sync
    return [name for name, ok in zip(state, finite.tolist()) if not ok]


# ---------------------------------------------------------------- random states

def random_states(device: torch.device) -> dict:
    """Every random state a training process uses: torch CPU (augmentation, mixup's Beta draw, dropout on CPU),
    CUDA on ``device`` (dropout, mixup's permutation), Python ``random`` and NumPy's global generator.

    Plain tensors, tuples and numbers only, so ``torch.load(weights_only=True)`` reads them back.
    """
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": {"bit_generator": numpy_state["bit_generator"],
                  "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
    }


def restore_random_states(states: dict, device: torch.device) -> None:
    """Inverse of :func:`random_states`; CheckpointError when ``states`` is not such a record."""
    try:
        torch.set_rng_state(states["torch"])
        if states["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(states["cuda"], device)
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
        numpy_state = states["numpy"]
        np.random.set_state({"bit_generator": numpy_state["bit_generator"],
                             "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
                             "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f"the checkpoint's random states are malformed ({type(err).__name__})") from None


# ---------------------------------------------------------------- checkpoints
#
# On disk a checkpoint is ``torch.save({"format": CHECKPOINT_FORMAT, "sha256": hex, "payload": uint8 tensor})``,
# where the payload is the ``torch.save`` serialisation of the state and ``sha256`` its digest: any changed
# byte of the state is reported on load instead of trained on.  ``torch.load(path, weights_only=True)`` also
# reads the wrapper; :func:`load_checkpoint` verifies it (:func:`pad.runtime.verify`) and returns the state.

CHECKPOINT_FORMAT = "dyconv-checkpoint-v2"
CHECKPOINT_KEYS = ("model", "meta", "epoch", "step")
CHECKPOINT_TEMPORARY_SUFFIX = TEMPORARY_SUFFIX
OPTIONAL_KEY_TYPES = {"optimizer": dict, "scaler": dict, "rng": list, "metrics": dict, "partition": dict,
                      "epoch_progress": dict,
                      "best_top1": (int, float), "train_loss": (int, float), "temperature": (int, float)}


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Writes ``state`` (tensors and plain Python values only) with its SHA-256, atomically and durably
    (:func:`pad.runtime.atomic_write`: a failed write raises ``WriteError`` and leaves ``path`` as it was)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    wrapper = {"format": CHECKPOINT_FORMAT, "sha256": sha256_bytes(payload),
               "payload": torch.frombuffer(payload, dtype=torch.uint8)}  # a view of the buffer, not a copy
    # serialised in memory, so that a full disk surfaces as the OSError of a plain write, not a zip-writer error
    outer = io.BytesIO()
    torch.save(wrapper, outer)
    del wrapper, payload
    atomic_write(path, outer.getbuffer())


def copy_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies a checkpoint file atomically and durably (``best.pt`` from ``checkpoint.pt``)."""
    atomic_write(target, Path(source).read_bytes())


def link_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Gives the checkpoint file ``source`` the second name ``target``, atomically and durably, without
    writing it again.  Checkpoints are only ever replaced by rename, never written in place, so replacing
    one name later leaves the other's contents intact.  Copies where the file system cannot link."""
    if not atomic_link(source, target):
        copy_checkpoint(source, target)


def _deserialize(data, path: Path, map_location):
    """``torch.load(weights_only=True)`` of untrusted bytes.

    Whatever the unpickler or the zip reader raises on damaged bytes (``RuntimeError``, ``UnpicklingError``,
    ``IndexError``, ``KeyError``, ``struct.error``, ``UnicodeDecodeError``, ...) means "not a readable
    checkpoint"; the broad ``except`` covers this one call only.
    """
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 115": noise about bytes about to be rejected
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to decode these bytes is the file's fault
        lines = str(err).strip().splitlines()
        # PyTorch's weights_only message advises weights_only=False, which is wrong advice for a damaged file
        reason = type(err).__name__ if not lines or "weights_only" in str(err) or "Weights only" in lines[0] \
            else f"{type(err).__name__}: {lines[0][:160]}"
        raise CheckpointError(f"checkpoint {path} is truncated, damaged or not a dyconv checkpoint ({reason})") from None


def _check_state(state, path: Path) -> dict:
    """The checkpoint state's structure: a mapping with the required keys of the right types, finite weights."""
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"checkpoint {path} is not a dyconv checkpoint (expected keys {CHECKPOINT_KEYS})")
    if not isinstance(state["model"], dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in state["model"].items()):
        raise CheckpointError(f"checkpoint {path} is not a dyconv checkpoint: 'model' is not a state dict")
    if not isinstance(state["meta"], dict):
        raise CheckpointError(f"checkpoint {path} is not a dyconv checkpoint: 'meta' is not a mapping")
    for key in ("epoch", "step"):
        if not isinstance(state[key], int) or isinstance(state[key], bool) or state[key] < 0:
            raise CheckpointError(f"checkpoint {path} is not a dyconv checkpoint: {key!r} is not a count")
    for key, kinds in OPTIONAL_KEY_TYPES.items():
        value = state.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise CheckpointError(f"checkpoint {path} is not a dyconv checkpoint: {key!r} is malformed")
    bad = [k for k, v in state["model"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values in {len(bad)} tensors (first: {bad[0]})")
    return state


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The state saved by :func:`save_checkpoint`, verified against its SHA-256.

    CheckpointError when ``path`` is missing, a directory, empty, truncated, foreign, or holds non-finite
    weights; :class:`pad.runtime.IntegrityError` when its contents do not match their checksum, the checksum
    record is malformed, or there is none (a bare state: nothing could tell a damaged one from an intact one).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    outer = _deserialize(data, path, "cpu")
    if not isinstance(outer, dict) or outer.get("format") != CHECKPOINT_FORMAT:
        _check_state(outer, path)  # a foreign file is reported as foreign, a bare state as unverifiable
        raise predates(f"checkpoint {path}", "checksummed checkpoints (it records no SHA-256)",
                       "retrain it with this version of dyconv/main.py")
    payload = outer.get("payload")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.ndim != 1:
        raise CheckpointError(f"checkpoint {path} is not a dyconv checkpoint: its payload is not a byte tensor")
    payload = payload.numpy()
    verify(path, outer.get("sha256"), sha256_bytes(payload))
    return _check_state(_deserialize(payload.tobytes(), path, map_location), path)


def check_compatible(checkpoint_meta: dict, run_meta: dict, path: str | os.PathLike = "checkpoint") -> None:
    """CheckpointError naming the first field where the checkpoint's model differs from the run's, or that the
    checkpoint does not record (it predates that field, so what it holds there is unknown)."""
    for key, value in run_meta.items():
        if key not in checkpoint_meta:
            raise CheckpointError(f"checkpoint {path} predates the model field {key!r} (it does not record it); "
                                  f"retrain it with this version of dyconv/main.py")
        held = checkpoint_meta[key]
        if held != value:
            raise CheckpointError(f"checkpoint {path} holds a model with {key}={held!r}, "
                                  f"but this run builds {key}={value!r}")
