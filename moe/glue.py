"""GLUE tasks: what each task reads, where its data come from, and how it is scored.

Every source ends as a ``datasets.DatasetDict`` in the Hub's ``nyu-mll/glue``
schema, so the rest of the pipeline never knows where the data came from:

* columns: the task's text columns (``sentence``, ``premise``/``hypothesis``, ...),
  ``label`` (int class id in the Hub's label order, float for STS-B, -1 on test
  splits) and ``idx``;
* splits: ``train``, ``validation``, ``test``; MNLI has ``validation_matched``,
  ``validation_mismatched``, ``test_matched``, ``test_mismatched`` instead.

Sources: the Hub (``datasets.load_dataset("nyu-mll/glue", task)``), GLUE's own
TSV download (``DIR/<TASK>/{train,dev,test}.tsv``) and CSV/JSON files as in
transformers' ``run_glue``.  Metrics are computed offline with scikit-learn and
scipy (no ``evaluate`` downloads).
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

from pad.runtime import error_line, read_text

# STS-B similarity scores are annotated from 0 (unrelated) to 5 (equivalent).
STSB_RANGE = (0.0, 5.0)


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task.

    Attributes:
        name: the Hub config name (``sst2``).
        folder: the folder of the official GLUE download (``SST-2``).
        text_columns: one or two text columns, Hub names.
        label_names: class names in the Hub's id order; empty for regression.
        tsv_labels: how each class id is written in GLUE's TSV files.
        tsv_columns: Hub column -> TSV header name (``label`` included); ``None``
            for CoLA's header-less train/dev files, read by position.
        metric: ``matthews``, ``accuracy``, ``accuracy_f1`` or ``pearson_spearman``.
    """
    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    tsv_labels: tuple[str, ...]
    tsv_columns: dict | None
    metric: str

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    @property
    def split_files(self) -> dict[str, str]:
        """Hub split name -> TSV file name inside ``DIR/<folder>``."""
        if self.name == "mnli":
            return {"train": "train.tsv", "validation_matched": "dev_matched.tsv",
                    "validation_mismatched": "dev_mismatched.tsv", "test_matched": "test_matched.tsv",
                    "test_mismatched": "test_mismatched.tsv"}
        return {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


_PAIR = {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("0", "1"),
             None, "matthews"),
    TaskSpec("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("0", "1"),
             {"sentence": "sentence", "label": "label"}, "accuracy"),
    TaskSpec("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("0", "1"),
             {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}, "accuracy_f1"),
    TaskSpec("stsb", "STS-B", ("sentence1", "sentence2"), (), (),
             {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}, "pearson_spearman"),
    TaskSpec("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("0", "1"),
             {"question1": "question1", "question2": "question2", "label": "is_duplicate"}, "accuracy_f1"),
    TaskSpec("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
             ("entailment", "neutral", "contradiction"),
             {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"}, "accuracy"),
    TaskSpec("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"),
             ("entailment", "not_entailment"),
             {"question": "question", "sentence": "sentence", "label": "label"}, "accuracy"),
    TaskSpec("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
             ("entailment", "not_entailment"), _PAIR, "accuracy"),
    TaskSpec("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("0", "1"),
             _PAIR, "accuracy"),
]}
# CoLA's train/dev TSVs have no header: source, label, original label, sentence.
_COLA_POSITIONS = {"label": 1, "sentence": 3}


def get_task(task_name: str) -> TaskSpec:
    """The spec of ``task_name`` (Hub name, case-insensitive; GLUE folder names such as ``SST-2`` too)."""
    key = task_name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[key]


# ---------------------------------------------------------------- GLUE TSV files

def _tsv_rows(path: str) -> list[list[str]]:
    """The rows of a tab-separated UTF-8 file, trailing blank lines dropped; ``ValueError`` naming
    the file and line of the first undecodable byte."""
    csv.field_size_limit(sys.maxsize)
    rows = list(csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    while rows and not "".join(rows[-1]).strip():
        rows.pop()
    return rows


def check_score(value, where: str) -> float:
    """An STS-B score as a float; ``ValueError`` at ``where`` (``"FILE line N"``) unless it is a
    finite number within GLUE's [0, 5]."""
    if value is None:  # an empty CSV cell (pandas also reads "nan" and "NA" as one)
        raise ValueError(f"{where}: score is missing")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: score {value!r} is not a number") from None
    if not math.isfinite(score) or not STSB_RANGE[0] <= score <= STSB_RANGE[1]:
        raise ValueError(f"{where}: score {value!r} is not within [{STSB_RANGE[0]:g}, {STSB_RANGE[1]:g}]")
    return score


def _parse_label(spec: TaskSpec, value: str, path: str, line: int) -> float | int:
    if spec.is_regression:
        return check_score(value, f"{path} line {line}")
    if value not in spec.tsv_labels:
        raise ValueError(f"{path} line {line}: label {value!r} is not one of the {spec.name} labels "
                         f"{list(spec.tsv_labels)}")
    return spec.tsv_labels.index(value)


def read_glue_tsv(spec: TaskSpec, path: str, labelled: bool) -> dict[str, list]:
    """Reads one GLUE TSV file into Hub-schema columns.

    Args:
        labelled: ``True`` for train/dev files; test files carry no label (``label`` = -1).
    Returns:
        ``{text column: [str], "label": [int|float], "idx": [int]}``.
    Raises:
        ValueError naming the file for a missing column, a short row or an unknown label.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    rows = _tsv_rows(path)
    header = None
    if spec.tsv_columns is None and labelled:          # CoLA train/dev: no header, fixed positions
        positions, first_line = dict(_COLA_POSITIONS), 1
    else:
        if not rows:
            raise ValueError(f"{path}: empty file, expected a header line")
        header, rows, first_line = rows[0], rows[1:], 2
        wanted = dict(spec.tsv_columns or {"sentence": "sentence"})
        if not labelled:
            wanted.pop("label", None)
        missing = [name for name in wanted.values() if name not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} for task {spec.name} (header: {header})")
        # MNLI's gold_label is the last column; every other name is unique in its header.
        positions = {col: len(header) - 1 if name == "gold_label" else header.index(name)
                     for col, name in wanted.items()}
    index_position = next((header.index(n) for n in ("index", "id") if header and n in header), None)
    columns: dict[str, list] = {c: [] for c in spec.text_columns}
    columns["label"], columns["idx"] = [], []
    needed = max(positions.values()) + 1
    for offset, row in enumerate(rows):
        line = first_line + offset
        if len(row) < needed:
            raise ValueError(f"{path} line {line}: expected at least {needed} tab-separated fields, got {len(row)}")
        for col in spec.text_columns:
            columns[col].append(row[positions[col]])
        columns["label"].append(_parse_label(spec, row[positions["label"]], path, line) if labelled else -1)
        index = row[index_position] if index_position is not None else ""
        columns["idx"].append(int(index) if index.isdigit() else offset)
    if not columns["idx"]:
        raise ValueError(f"{path}: no examples")
    return columns


def load_glue_dir(spec: TaskSpec, glue_dir: str, splits: list[str]):
    """``DatasetDict`` of the requested Hub splits from ``glue_dir/<folder>/*.tsv``."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    features = Features({**{c: Value("string") for c in spec.text_columns},
                         "label": Value("float32") if spec.is_regression else ClassLabel(names=list(spec.label_names)),
                         "idx": Value("int32")})
    folder = os.path.join(glue_dir, spec.folder)
    out = DatasetDict()
    for split in splits:
        path = os.path.join(folder, spec.split_files[split])
        columns = read_glue_tsv(spec, path, labelled=not split.startswith("test"))
        if split.startswith("test") and not spec.is_regression:
            features_split = Features({**features, "label": Value("int64")})
        else:
            features_split = features
        out[split] = Dataset.from_dict(columns, features=features_split)
    return out


def diagnostic_file(glue_dir: str) -> str | None:
    """GLUE's diagnostic set (AX), ``glue_dir/diagnostic/diagnostic.tsv``, if the download has it."""
    path = os.path.join(glue_dir, "diagnostic", "diagnostic.tsv")
    return path if os.path.isfile(path) else None


def load_diagnostic(spec: TaskSpec, path: str):
    """The diagnostic set (``index, sentence1, sentence2``, no labels) as an MNLI test split."""
    from datasets import Dataset, Features, Value
    features = Features({**{c: Value("string") for c in spec.text_columns}, "label": Value("int64"),
                         "idx": Value("int32")})
    return Dataset.from_dict(read_glue_tsv(spec, path, labelled=False), features=features)


# ---------------------------------------------------------------- Hub and CSV/JSON

def load_hub(spec: TaskSpec, cache_dir: str | None = None):
    """``load_dataset("nyu-mll/glue", task)``; a clear ValueError when the Hub is out of reach."""
    import datasets
    try:
        return datasets.load_dataset("nyu-mll/glue", spec.name, cache_dir=cache_dir)
    except Exception as err:  # offline, no such dataset, proxy errors: all mean "no data from the Hub"
        raise ValueError(f"could not load GLUE task {spec.name} from the Hub ({error_line(err)}); "
                         f"pass --glue_dir DIR (GLUE TSV layout) or --train_file/--validation_file") from None


def load_data_files(files: dict[str, str], spec: TaskSpec | None, cache_dir: str | None = None):
    """CSV or JSON files as in transformers' run_glue: ``{split: path}`` -> ``DatasetDict``.

    With a task, the files must hold the task's Hub columns and labels (class names
    or ids; STS-B scores within [0, 5]); without one, the columns are inferred later by
    :func:`infer_text_columns`.  Each file is read on its own, so an unreadable one
    (not UTF-8, not CSV/JSON, no rows) is named in the ``ValueError``.
    """
    import datasets
    for split, path in files.items():
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file (--{split}_file)")
    extension = os.path.splitext(next(iter(files.values())))[1].lstrip(".")
    if extension not in ("csv", "json", "jsonl"):
        raise ValueError(f"data files must be .csv or .json, got {extension!r}")
    if any(os.path.splitext(p)[1].lstrip(".") != extension for p in files.values()):
        raise ValueError("all data files must have the same extension")
    raw = datasets.DatasetDict({split: _read_data_file(path, split, extension, cache_dir)
                                for split, path in files.items()})
    if spec is None:  # files without a task: a label column (but in test files), finite regression targets
        for split, ds in raw.items():
            if split != "test" and "label" not in ds.column_names:
                raise ValueError(f"{files[split]}: no 'label' column (without --task_name, train and validation "
                                 f"files need one)")
            if "label" in ds.column_names and ds.features["label"].dtype in ("float32", "float64"):
                bad = next((row for row, value in enumerate(ds["label"], start=1)
                            if value is None or not math.isfinite(value)), None)
                if bad is not None:
                    raise ValueError(f"{files[split]} row {bad}: label {ds['label'][bad - 1]!r} is not a finite number")
    if spec is not None:
        for split, ds in raw.items():
            needed = list(spec.text_columns) + ([] if split == "test" else ["label"])
            missing = [c for c in needed if c not in ds.column_names]
            if missing:
                raise ValueError(f"{files[split]}: missing column(s) {missing} for task {spec.name}")
            if "label" in ds.column_names and split != "test":
                labels = [_file_label(spec, value, f"{files[split]} row {row}")
                          for row, value in enumerate(ds["label"], start=1)]
                raw[split] = ds.remove_columns("label").add_column("label", labels)
    return raw


def _read_data_file(path: str, split: str, extension: str, cache_dir: str | None):
    """One CSV/JSON file as a ``Dataset``; ``ValueError`` naming the file for anything unreadable."""
    import datasets
    text = read_text(path)  # names the line of a non-UTF-8 byte, which the CSV/JSON builders do not
    if not text.strip():
        raise ValueError(f"{path}: empty file")
    if extension == "csv" and sum(1 for line in text.splitlines() if line.strip()) < 2:
        raise ValueError(f"{path}: no examples")  # a header alone, which the CSV builder reports obscurely
    try:
        ds = datasets.load_dataset("csv" if extension == "csv" else "json", data_files={split: path},
                                   cache_dir=cache_dir)[split]
    except Exception as err:  # the builders raise pyarrow, pandas and datasets errors of many types
        detail = _first_line(err)
        raise ValueError(f"{path}: cannot read as {'CSV' if extension == 'csv' else 'JSON'} ({detail})") from None
    if len(ds) == 0:
        raise ValueError(f"{path}: no examples")
    return ds


def _first_line(err: BaseException) -> str:
    """The innermost cause's first line (datasets wraps parser errors in a generic one)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _file_label(spec: TaskSpec, value, where: str):
    if spec.is_regression:
        return check_score(value, where)
    if isinstance(value, str) and value in spec.label_names:
        return spec.label_names.index(value)
    if isinstance(value, str) and value in spec.tsv_labels:
        return spec.tsv_labels.index(value)
    if isinstance(value, str) and value.strip().isdigit():  # ids in a column that also holds names
        value = int(value)
    if isinstance(value, (int, np.integer)) and 0 <= int(value) < spec.num_labels:
        return int(value)
    raise ValueError(f"{where}: label {value!r} is not one of the {spec.name} labels {list(spec.label_names)}")


def infer_text_columns(column_names: list[str]) -> tuple[str, ...]:
    """run_glue's rule for files without a task: ``sentence1``/``sentence2`` if present,
    else the first two (or one) non-label columns."""
    names = [n for n in column_names if n not in ("label", "idx")]
    if "sentence1" in names and "sentence2" in names:
        return ("sentence1", "sentence2")
    if not names:
        raise ValueError("the data files hold no text column besides 'label'")
    return tuple(names[:2])


def check_max_seq_length(tokenizer, text_columns: tuple[str, ...], max_seq_length: int) -> None:
    """``ValueError`` naming ``--max_seq_length`` when sequences of ``max_seq_length`` tokens (after the
    tokenizer's own ``model_max_length`` cap) cannot hold the tokenizer's special tokens plus one token of
    each text column: below the special tokens the tokenizer does not truncate at all (sequences come
    out longer than asked), and at them every text is cut to nothing."""
    pair = len(text_columns) == 2
    special = tokenizer.num_special_tokens_to_add(pair=pair)
    needed = special + len(text_columns)
    length = min(max_seq_length, tokenizer.model_max_length)
    if length < needed:
        cap = "" if length == max_seq_length else f" (capped to the tokenizer's model_max_length {length})"
        raise ValueError(f"--max_seq_length {max_seq_length}{cap} leaves no room for the text: the tokenizer adds "
                         f"{special} special tokens to {'a pair of texts' if pair else 'a text'} "
                         f"({', '.join(text_columns)}), so sequences need at least {needed} tokens "
                         f"(one token per text)")


def check_labels_known(labels: list, label_to_id: dict, where: str) -> list[int]:
    """Class ids of the raw ``labels`` of files without a task; ``ValueError`` at the first value that
    is not a key of ``label_to_id`` (the classes training has), naming ``where`` (``--validation_file``)
    and the row: the model has no output for it, and evaluation would crash after training."""
    ids = []
    for row, value in enumerate(labels, start=1):
        if str(value) not in label_to_id:
            known = ", ".join(repr(k) for k in sorted(label_to_id))
            raise ValueError(f"{where} row {row}: label {value!r} never occurs in the training data (its labels: "
                             f"{known[:200]}); the model could not predict it")
        ids.append(label_to_id[str(value)])
    return ids


# ---------------------------------------------------------------- metrics

def compute_metrics(task_name: str | None, predictions, labels) -> dict[str, float]:
    """GLUE metrics, offline.

    Args:
        task_name: a GLUE task, or ``None`` for files without a task (accuracy, or
            ``mse`` when ``predictions`` are floats).
        predictions: ``(N,)`` class ids, or scores for STS-B.
        labels: ``(N,)`` class ids, or gold scores for STS-B.
    Returns:
        CoLA ``matthews_correlation``; MRPC/QQP ``accuracy``, ``f1``; STS-B
        ``pearson``, ``spearmanr``; every other task ``accuracy``.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
    if task_name is None:
        if np.issubdtype(predictions.dtype, np.floating):
            return {"mse": float(((predictions - labels) ** 2).mean())}
        return {"accuracy": float((predictions == labels).mean())}
    metric = get_task(task_name).metric
    if metric == "matthews":
        from sklearn.metrics import matthews_corrcoef
        return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    if metric == "pearson_spearman":
        from scipy.stats import pearsonr, spearmanr
        return {"pearson": float(pearsonr(predictions, labels)[0]),
                "spearmanr": float(spearmanr(predictions, labels)[0])}
    accuracy = float((predictions == labels).mean())
    if metric == "accuracy_f1":
        from sklearn.metrics import f1_score
        return {"accuracy": accuracy, "f1": float(f1_score(labels, predictions))}
    return {"accuracy": accuracy}
