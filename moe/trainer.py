"""A ``transformers.Trainer`` for MoE and PAD-MoE models.

:class:`MoETrainer` adds the gates' auxiliary loss to the task loss while
training, logs (to every ``report_to`` integration, TensorBoard included) the
running means of both losses, the PAD scale factors, the dynamic ratio and the
per-expert load, and runs Iterative Mode Partition once (:meth:`MoETrainer.partition`):
before training, or after a warm-up of the fully dynamic model
(:class:`PartitionAtStep`).  Upcycled experts all equal the static weight, so at
step 0 the taylor score ``|g (lambda_d W_e - lambda_s W_s)|`` is exactly zero
everywhere and IMP can only partition at random; a few warm-up steps let the
experts differ first.

Multi-GPU (``torchrun``): every rank runs IMP on its own partition batches and
then takes rank 0's masks (a broadcast of every mask buffer), so all ranks start
training with the same partition, the one rank 0 reports and saves.  Training a
MoE model on several GPUs in one process (``nn.DataParallel``, what ``Trainer``
does without ``torchrun``) is refused: the gates' aux loss and expert counts live
on the replicas, so the original model would see none of them.

Weight decay follows the dyconv pipeline: none on biases, LayerNorm and the PAD
scale-factor logits ``phi``.  :meth:`MoETrainer.save_model` writes, beside a PAD-MoE
model, its compact export ``model_compact.safetensors``.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

import pad
from pad.mixing import UnrecordedGranularity, weight_banks
from pad.partition import check_dynamic_ratio
from pad.runtime import atomic_write, predates, read_json
from moe import files
from moe.modeling import aux_loss, expert_load, moe_layers, save_compact_model

logger = logging.getLogger(__name__)


def model_statistics(model: torch.nn.Module) -> dict[str, float]:
    """PAD statistics of ``model``: ``dynamic_ratio`` and the mean ``lambda_d``/``lambda_s`` over
    PAD layers; empty for a model without PAD layers."""
    ratio = pad.dynamic_ratio(model)
    if ratio is None:
        return {}
    factors = list(pad.scale_factors(model).values())
    return {"dynamic_ratio": ratio,
            "lambda_d": sum(d for d, _ in factors) / len(factors),
            "lambda_s": sum(s for _, s in factors) / len(factors)}


def synflow_objective(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """SynFlow's objective for a text classifier: the sum of the logits for an all-ones input,
    i.e. ``inputs_embeds`` of ones ``(B, L, hidden)`` shaped like ``batch["input_ids"] (B, L)``."""
    ids = batch["input_ids"]
    embeds = torch.ones(*ids.shape, model.config.hidden_size, device=ids.device, dtype=model.dtype)
    return model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).logits.sum()


class MoETrainer(Trainer):
    """``Trainer`` whose training loss is ``task loss + moe.modeling.aux_loss(model)``.

    Evaluation losses stay the task loss alone, so ``eval_loss`` compares across
    dense, MoE and PAD-MoE models.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_not_data_parallel(self.args, self.model, self.train_dataset is not None)
        # The aux loss is a per-batch mean: let Trainer scale the whole loss for
        # gradient accumulation instead of normalising by tokens in the batch.
        self.model_accepts_loss_kwargs = False
        self.partition_report: pad.PartitionReport | None = None
        self.partition_step: int | None = None
        self.checkpoint_writers: list = []  # callables (folder) -> None, see save_model
        self._reset_running_means()

    def get_decay_parameter_names(self, model) -> list[str]:
        """``Trainer``'s choice (no decay on biases and LayerNorm) less the PAD scale-factor logits
        ``phi``, as in the dyconv pipeline: decaying ``phi`` would pull both scale factors to 1."""
        return [name for name in super().get_decay_parameter_names(model) if not is_scale_factor(name)]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, plus ``model_compact.safetensors`` (:func:`moe.modeling.save_compact_model`)
        for a PAD-MoE model when called from outside (checkpoints stay as they are), then
        ``checksums.json`` over the weight files written (:func:`moe.files.write_checksums`), in final
        folders and ``checkpoint-N/`` folders alike.

        In a ``checkpoint-N/`` folder each of :attr:`checkpoint_writers` (``writer(folder)``: the partition
        report, the run's arguments) writes its file first: the Trainer saves the weights here, before its
        optimizer and, last, ``trainer_state.json``, so a checkpoint holding that file (a complete one,
        :func:`moe.files.missing_checkpoint_files`) holds theirs too."""
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if not _internal_call and self.args.should_save and next(weight_banks(model), None) is not None:
            save_compact_model(model, output_dir)
        if self.args.should_save:
            if _internal_call and os.path.basename(os.path.normpath(output_dir)).startswith(f"{PREFIX_CHECKPOINT_DIR}-"):
                for write in self.checkpoint_writers:
                    write(output_dir)
            files.write_checksums(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """``Trainer``'s, which restores the PAD layers' granularity with their weights;
        :class:`pad.runtime.IntegrityError` naming the checkpoint when its weights predate that record."""
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except UnrecordedGranularity:
            raise predates(f"checkpoint {resume_from_checkpoint}", "PAD layers that record their partition "
                           "granularity (its weights hold no granularity_code)",
                           "train it again with this version of moe/run_glue.py") from None

    def _reset_running_means(self) -> None:
        self._task_loss_sum = self._aux_loss_sum = self._load_sum = None
        self._steps = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            aux = aux_loss(self.accelerator.unwrap_model(model)).to(loss.dtype)
            self._accumulate(loss.detach(), aux.detach())
            loss = loss + aux
        return (loss, outputs) if return_outputs else loss

    def _accumulate(self, task_loss: torch.Tensor, aux: torch.Tensor) -> None:
        loads = list(expert_load(self.accelerator.unwrap_model(self.model)).values())
        mean_load = torch.stack([load.float() for load in loads]).mean(0) if loads else None  # (E,) over layers
        if self._steps == 0:
            self._task_loss_sum, self._aux_loss_sum, self._load_sum = task_loss.float(), aux.float(), mean_load
        else:
            self._task_loss_sum = self._task_loss_sum + task_loss.float()
            self._aux_loss_sum = self._aux_loss_sum + aux.float()
            if mean_load is not None:
                self._load_sum = self._load_sum + mean_load
        self._steps += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds, to every training log (the ones holding ``loss``), the means since the last
        log of ``task_loss``, ``aux_loss`` and ``expert_load/e<i>`` (share of token assignments
        per expert, averaged over MoE layers; ``1/E`` is balanced), and the PAD statistics."""
        if "loss" in logs and self._steps:
            means = torch.stack([self._task_loss_sum, self._aux_loss_sum]) / self._steps
            task_loss, aux = self._nested_gather(means).view(-1, 2).mean(0).tolist()
            logs["task_loss"], logs["aux_loss"] = round(task_loss, 6), round(aux, 6)
            if self._load_sum is not None:
                for e, share in enumerate((self._load_sum / self._steps).tolist()):
                    logs[f"expert_load/e{e}"] = round(share, 6)
            logs.update({k: round(v, 6) for k, v in model_statistics(self.model).items()})
            self._reset_running_means()
        super().log(logs, start_time)

    def planned_training_steps(self) -> int:
        """The optimizer steps ``train()`` will take, computed as ``Trainer.set_initial_training_values``
        does: ``--max_steps`` when positive, else ``ceil(--num_train_epochs x steps per epoch)`` with
        ``steps per epoch = max(ceil(batches per process / --gradient_accumulation_steps), 1)``."""
        args = self.args
        if args.max_steps > 0:
            return args.max_steps
        with torch.random.fork_rng(devices=[]):  # building the loader draws nothing, and surely changes nothing
            batches = len(self.get_train_dataloader())
        accumulation = args.gradient_accumulation_steps
        per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
        return math.ceil(args.num_train_epochs * per_epoch)

    def describe_planned_steps(self) -> str:
        """How :meth:`planned_training_steps` came about, in flags."""
        if self.args.max_steps > 0:
            return f"--max_steps {self.args.max_steps}"
        return f"--num_train_epochs {self.args.num_train_epochs:g} of {len(self.train_dataset)} examples"

    def check_partition(self, dynamic_ratio: float, scope: str = "global", granularity: str = "element",
                        **_) -> None:
        """``ValueError`` naming ``--dynamic_ratio`` when it keeps no dynamic position of this model
        (:func:`pad.partition.check_dynamic_ratio`); checked before any batch is drawn or any step taken."""
        check_dynamic_ratio(dynamic_ratio, self.model, scope, granularity, name="--dynamic_ratio")

    def partition(self, dynamic_ratio: float, iterations: int, criterion: str = "taylor",
                  schedule: str = "exponential", scope: str = "global", num_batches: int = 8,
                  granularity: str = "element", batchnorm: str = "batch") -> pad.PartitionReport:
        """Iterative Mode Partition of every PAD layer on ``num_batches`` training batches.

        The loss is the task loss alone (``model(**batch).loss``); ``synflow`` uses
        :func:`synflow_objective`; ``random`` is seeded by ``args.seed``.  Logs the
        report and returns it; ``self.partition_batches_used`` holds how many batches
        there were (fewer than ``num_batches`` when the training set is small).
        """
        if num_batches < 1:
            raise ValueError(f"partition batches must be >= 1, got {num_batches}")
        self.check_partition(dynamic_ratio, scope, granularity)
        batches = [self._prepare_inputs(batch) for batch in itertools.islice(self.get_train_dataloader(), num_batches)]
        self.partition_batches_used = len(batches)
        generator = torch.Generator().manual_seed(self.args.seed)
        report = pad.iterative_mode_partition(
            self.model, batches, lambda m, b: m(**b).loss, dynamic_ratio, iterations=iterations,
            criterion=criterion, schedule=schedule, scope=scope, synflow_fn=synflow_objective, generator=generator,
            granularity=granularity, batchnorm=batchnorm)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            with torch.no_grad():
                for _, bank in weight_banks(self.model):
                    torch.distributed.broadcast(bank.mask, src=0)
        moe_settings = getattr(getattr(self.model, "config", None), "moe", None)
        if isinstance(moe_settings, dict):  # saved with the model: a reload declares it again
            moe_settings["partition_granularity"] = granularity
        self.partition_report, self.partition_step = report, self.state.global_step
        logger.info(report.format())
        self.log({"partition/dynamic_ratio": report.achieved, "partition/target": report.target,
                  "partition/batches": float(len(batches))})
        return report

    # ------------------------------------------------------------ non-finite losses stop the run

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step, then :func:`stop_if_non_finite` on its loss, before the optimizer
        step and before anything is saved (the Trainer's own NaN filter syncs here already)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        stop_if_non_finite(loss, "training", self.state.global_step + 1, self.args.output_dir)
        return loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer's evaluation; a non-finite ``<prefix>_loss`` raises :class:`NonFiniteLossError`, so a
        checkpoint save that would follow an evaluation during training never happens."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        loss = metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            # on the run's device: NCCL all-reduces only CUDA tensors
            loss = torch.tensor(float(loss), device=self.args.device)
            stop_if_non_finite(loss, "evaluation", self.state.global_step, self.args.output_dir)
        return metrics


def is_scale_factor(parameter_name: str) -> bool:
    """Whether ``parameter_name`` is a PAD scale-factor logit (``...scale.phi``)."""
    return parameter_name.endswith(".phi") or parameter_name == "phi"


def check_not_data_parallel(args, model: torch.nn.Module, training: bool) -> None:
    """Raises ``ValueError`` when ``model`` has MoE layers and would train under ``nn.DataParallel``
    (``args.n_gpu > 1`` in one process); ``torchrun`` (one process per GPU) is the supported way."""
    if training and args.n_gpu > 1 and moe_layers(model):
        raise ValueError(f"MoE training on {args.n_gpu} GPUs in one process (nn.DataParallel) is not supported: "
                         f"the gates' aux loss would be lost; run one process per GPU with "
                         f"torchrun --nproc_per_node={args.n_gpu} moe/run_glue.py ..., or one GPU "
                         f"(CUDA_VISIBLE_DEVICES=0)")


class PartitionAtStep(TrainerCallback):
    """Runs ``trainer.partition(**settings)`` once, when training reaches optimizer step ``step``
    (``step`` steps of the fully dynamic model come first).  A run resumed past ``step``
    keeps the masks of its checkpoint.

    Checked here, before training: ``step`` must come before the run's last step (at or past it, IMP
    would never run, or run with nothing left to train, and a fully dynamic MoE would be saved as
    ``pad``), and the dynamic ratio must keep a dynamic position (:meth:`MoETrainer.check_partition`)."""

    def __init__(self, trainer: MoETrainer, step: int, **settings):
        if step < 1:
            raise ValueError(f"partition warm-up steps must be >= 1 here, got {step}")
        total = trainer.planned_training_steps()
        if step >= total:
            raise ValueError(f"--partition_warmup_steps {step} is not below the run's {total} training steps "
                             f"({trainer.describe_planned_steps()}): the model would never be partitioned, or "
                             f"be partitioned after its last step, and end as a fully dynamic MoE labelled pad; "
                             f"use fewer warm-up steps (at most {total - 1}) or train longer")
        trainer.check_partition(**settings)
        self.trainer, self.step, self.settings = trainer, step, settings

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.trainer.partition(**self.settings)


# ---------------------------------------------------------------- non-finite losses

class NonFiniteLossError(ValueError):
    """A NaN or infinite training or evaluation loss; raised before the Trainer saves anything."""


def stop_if_non_finite(loss: torch.Tensor, kind: str, step: int, output_dir: str) -> None:
    """Raises :class:`NonFiniteLossError` naming ``step`` and the last checkpoint in ``output_dir``
    when ``loss`` (any shape) holds NaN or infinity on any process (all-reduced under torchrun,
    so every rank stops at the same step instead of waiting for the others)."""
    bad = (~torch.isfinite(loss.detach())).any().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.item() == 0:
        return
    values = loss.detach().flatten()
    value = values[~torch.isfinite(values)][0].item() if not torch.isfinite(values).all() else "on another process"
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    raise NonFiniteLossError(f"non-finite {kind} loss ({value}) at step {step}; stopped before saving, "
                             f"last checkpoint: {last or 'none'}")


# ---------------------------------------------------------------- the partition report across resumes

PARTITION_FILE = "partition.json"
PARTITION_KEYS = ("target", "achieved", "criterion", "schedule", "scope", "iterations", "batches", "step")


def read_partition_record(folder: str) -> dict | None:
    """``folder/partition.json`` (a checkpoint's), or ``None`` when it has none; ``ValueError``
    naming the file when it is unreadable or lacks one of :data:`PARTITION_KEYS`, the granularity or what decided
    the partition (``decided_by``)."""
    path = os.path.join(folder, PARTITION_FILE)
    if not os.path.lexists(path):
        return None
    record = read_json(path)
    missing = [key for key in PARTITION_KEYS if key not in record]
    if missing:
        raise ValueError(f"{path}: not a partition report (missing {', '.join(missing)})")
    if "granularity" not in record:
        raise predates(f"partition report {path}", "recorded partition granularities (it names none)",
                       "train the run again with this version of moe/run_glue.py")
    if "decided_by" not in record:
        raise predates(f"partition report {path}", "records of what decided the partition (it has no decided_by)",
                       "train the run again with this version of moe/run_glue.py")
    return record


def write_partition_record(folder: str, record: dict) -> None:
    """``folder/partition.json``: the report :func:`read_partition_record` reads back."""
    atomic_write(os.path.join(folder, PARTITION_FILE), json.dumps(record, indent=2))


class PartitionReportKeeper:
    """Keeps the partition report with the run: every checkpoint gets a ``partition.json`` (a
    :attr:`MoETrainer.checkpoint_writers` entry), and a run resumed from a checkpoint starts from that
    checkpoint's report (its masks come from the checkpoint, so IMP does not run again and its report
    would otherwise be lost)."""

    def __init__(self, trainer: MoETrainer, resumed_from: str | None = None):
        self.trainer = trainer
        self.restored = read_partition_record(resumed_from) if resumed_from else None
        trainer.checkpoint_writers.append(self.write)

    def record(self) -> dict | None:
        """The report of this run's IMP, else the resumed checkpoint's, else ``None``:
        :class:`pad.PartitionReport` fields plus ``batches`` and ``step``."""
        trainer = self.trainer
        if trainer.partition_report is not None:
            return {**trainer.partition_report.as_dict(), "batches": trainer.partition_batches_used,
                    "step": trainer.partition_step}
        return self.restored

    def write(self, folder: str) -> None:
        record = self.record()
        if record is not None:
            write_partition_record(folder, record)
