"""GLUE task specs, readers and metrics (moe/glue.py): every task's TSV layout, CSV files, scores."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from moe import glue

RNG = np.random.default_rng(0)
CLASS_LABELS = RNG.integers(0, 2, size=50)
CLASS_PREDICTIONS = np.where(RNG.random(50) < 0.7, CLASS_LABELS, 1 - CLASS_LABELS)
MNLI_LABELS = RNG.integers(0, 3, size=60)
MNLI_PREDICTIONS = np.where(RNG.random(60) < 0.6, MNLI_LABELS, RNG.integers(0, 3, size=60))
SCORES = RNG.uniform(0, 5, size=40)
SCORE_PREDICTIONS = SCORES + RNG.normal(0, 1.0, size=40)


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli"])
def test_accuracy_tasks_match_sklearn(task):
    metrics = glue.compute_metrics(task, CLASS_PREDICTIONS, CLASS_LABELS)
    assert metrics == pytest.approx({"accuracy": accuracy_score(CLASS_LABELS, CLASS_PREDICTIONS)})


def test_mnli_accuracy_three_classes():
    metrics = glue.compute_metrics("mnli", MNLI_PREDICTIONS, MNLI_LABELS)
    assert metrics == pytest.approx({"accuracy": accuracy_score(MNLI_LABELS, MNLI_PREDICTIONS)})


def test_cola_matthews_matches_sklearn():
    metrics = glue.compute_metrics("cola", CLASS_PREDICTIONS, CLASS_LABELS)
    assert metrics == pytest.approx({"matthews_correlation": matthews_corrcoef(CLASS_LABELS, CLASS_PREDICTIONS)})


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1_match_sklearn(task):
    metrics = glue.compute_metrics(task, CLASS_PREDICTIONS, CLASS_LABELS)
    assert metrics == pytest.approx({"accuracy": accuracy_score(CLASS_LABELS, CLASS_PREDICTIONS),
                                     "f1": f1_score(CLASS_LABELS, CLASS_PREDICTIONS)})


def test_stsb_pearson_spearman_match_scipy():
    metrics = glue.compute_metrics("stsb", SCORE_PREDICTIONS, SCORES)
    assert metrics == pytest.approx({"pearson": pearsonr(SCORE_PREDICTIONS, SCORES)[0],
                                     "spearmanr": spearmanr(SCORE_PREDICTIONS, SCORES)[0]})


def test_metrics_without_task():
    assert glue.compute_metrics(None, CLASS_PREDICTIONS, CLASS_LABELS) == pytest.approx(
        {"accuracy": accuracy_score(CLASS_LABELS, CLASS_PREDICTIONS)})
    assert glue.compute_metrics(None, SCORE_PREDICTIONS, SCORES) == pytest.approx(
        {"mse": float(np.mean((SCORE_PREDICTIONS - SCORES) ** 2))})


def test_metric_errors():
    with pytest.raises(ValueError, match="unknown task 'glue9'"):
        glue.compute_metrics("glue9", CLASS_PREDICTIONS, CLASS_LABELS)
    with pytest.raises(ValueError, match="differ in shape"):
        glue.compute_metrics("sst2", CLASS_PREDICTIONS[:3], CLASS_LABELS)


def test_task_names():
    assert set(glue.TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert glue.get_task("SST-2") is glue.TASKS["sst2"]
    assert glue.get_task("STS-B").is_regression and glue.get_task("stsb").num_labels == 1
    assert glue.get_task("MNLI").num_labels == 3


# ---------------------------------------------------------------- GLUE TSV layouts

def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, fields)) + "\n" for fields in lines))
    return path


MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                     "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]

# task -> (train/dev lines, expected columns, expected label ids)
LAYOUTS = {
    "cola": ([["gj04", 1, "", "the cat sat ."], ["gj04", 0, "*", "sat cat the ."]],
             {"sentence": ["the cat sat .", "sat cat the ."]}, [1, 0]),
    "sst2": ([["sentence", "label"], ["a \"quoted\" gem", 1], ["dull", 0]],
             {"sentence": ['a "quoted" gem', "dull"]}, [1, 0]),
    "mrpc": ([["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], [1, 11, 12, "he ran", "he jogged"],
              [0, 13, 14, "yes", "no"]],
             {"sentence1": ["he ran", "yes"], "sentence2": ["he jogged", "no"]}, [1, 0]),
    "stsb": ([["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score"], [0, "main", "f", "2012", 1, "none", "none", "a man", "a person", "4.250"],
              [1, "main", "f", "2012", 2, "none", "none", "a dog", "a car", "0.5"]],
             {"sentence1": ["a man", "a dog"], "sentence2": ["a person", "a car"]}, [4.25, 0.5]),
    "qqp": ([["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], [7, 1, 2, "why?", "how come?", 1],
             [8, 3, 4, "who?", "when?", 0]],
            {"question1": ["why?", "who?"], "question2": ["how come?", "when?"]}, [1, 0]),
    "mnli": ([MNLI_DEV_HEADER, [0, 1, "1e", "fiction", "(a)", "(b)", "(S a)", "(S b)", "a cat", "an animal",
                                "entailment", "entailment", "neutral", "entailment", "entailment", "entailment"],
              [1, 2, "2c", "slate", "(c)", "(d)", "(S c)", "(S d)", "it rains", "it is dry", "contradiction",
               "contradiction", "contradiction", "neutral", "contradiction", "contradiction"]],
             {"premise": ["a cat", "it rains"], "hypothesis": ["an animal", "it is dry"]}, [0, 2]),
    "qnli": ([["index", "question", "sentence", "label"], [0, "who?", "Ann did.", "entailment"],
              [1, "what?", "No idea.", "not_entailment"]],
             {"question": ["who?", "what?"], "sentence": ["Ann did.", "No idea."]}, [0, 1]),
    "rte": ([["index", "sentence1", "sentence2", "label"], [0, "A b.", "B.", "not_entailment"],
             [1, "C d.", "C.", "entailment"]],
            {"sentence1": ["A b.", "C d."], "sentence2": ["B.", "C."]}, [1, 0]),
    "wnli": ([["index", "sentence1", "sentence2", "label"], [0, "He left.", "Tom left.", 1],
              [1, "It broke.", "The cup broke.", 0]],
             {"sentence1": ["He left.", "It broke."], "sentence2": ["Tom left.", "The cup broke."]}, [1, 0]),
}

TEST_HEADERS = {
    "cola": ["index", "sentence"], "sst2": ["index", "sentence"],
    "mrpc": ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"],
    "stsb": ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"],
    "qqp": ["id", "question1", "question2"], "mnli": MNLI_TRAIN_HEADER[:10],
    "qnli": ["index", "question", "sentence"], "rte": ["index", "sentence1", "sentence2"],
    "wnli": ["index", "sentence1", "sentence2"],
}


@pytest.mark.parametrize("task", sorted(LAYOUTS))
def test_tsv_reader_parses_every_layout(tmp_path, task):
    spec = glue.get_task(task)
    lines, texts, labels = LAYOUTS[task]
    columns = glue.read_glue_tsv(spec, str(write(tmp_path / "dev.tsv", lines)), labelled=True)
    assert {c: columns[c] for c in spec.text_columns} == texts
    assert columns["label"] == pytest.approx(labels)


@pytest.mark.parametrize("task", sorted(TEST_HEADERS))
def test_tsv_reader_test_files_have_no_labels(tmp_path, task):
    spec = glue.get_task(task)
    header = TEST_HEADERS[task]
    row = [f"t{i}" for i in range(len(header))]
    row[0] = 41  # index / id column
    columns = glue.read_glue_tsv(spec, str(write(tmp_path / "test.tsv", [header, row])), labelled=False)
    for col, tsv_name in (spec.tsv_columns or {"sentence": "sentence"}).items():
        if col != "label":
            assert columns[col] == [row[header.index(tsv_name)]]
    assert columns["label"] == [-1] and columns["idx"] == [41]


def test_mnli_train_gold_label_is_last_column(tmp_path):
    path = write(tmp_path / "train.tsv", [MNLI_TRAIN_HEADER,
                                          [0, 1, "1n", "travel", "", "", "", "", "p", "h", "entailment", "neutral"]])
    columns = glue.read_glue_tsv(glue.get_task("mnli"), str(path), labelled=True)
    assert columns["label"] == [1]  # gold_label, not label1


def test_glue_dir_mnli_splits(tmp_path):
    lines = LAYOUTS["mnli"][0]
    for name in ("train", "dev_matched", "dev_mismatched"):
        write(tmp_path / "MNLI" / f"{name}.tsv", lines)
    write(tmp_path / "MNLI" / "test_matched.tsv", [TEST_HEADERS["mnli"], list(range(10))])
    data = glue.load_glue_dir(glue.get_task("mnli"), str(tmp_path),
                              ["train", "validation_matched", "validation_mismatched", "test_matched"])
    assert data["validation_mismatched"]["label"] == [0, 2]
    assert data["train"].features["label"].names == ["entailment", "neutral", "contradiction"]
    assert data["test_matched"]["label"] == [-1]
    with pytest.raises(ValueError, match="test_mismatched.tsv: no such file"):
        glue.load_glue_dir(glue.get_task("mnli"), str(tmp_path), ["test_mismatched"])


@pytest.mark.parametrize("task, lines, message", [
    ("sst2", [["text", "label"], ["good", 1]], r"dev.tsv: missing column\(s\) \['sentence'\] for task sst2"),
    ("sst2", [["sentence", "label"], ["good", 2]], r"dev.tsv line 2: label '2' is not one of the sst2 labels"),
    ("rte", [["index", "sentence1", "sentence2", "label"], [0, "a", "b", "neutral"]],
     r"label 'neutral' is not one of the rte labels \['entailment', 'not_entailment'\]"),
    ("stsb", LAYOUTS["stsb"][0][:1] + [[0, "m", "f", "y", 1, "s", "s", "a", "b", "high"]], r"score 'high' is not a number"),
    ("cola", [["gj04", 1, ""]], r"dev.tsv line 1: expected at least 4 tab-separated fields, got 3"),
    ("sst2", [["sentence", "label"]], r"dev.tsv: no examples"),
])
def test_tsv_reader_errors_name_the_file(tmp_path, task, lines, message):
    path = write(tmp_path / "dev.tsv", lines)
    with pytest.raises(ValueError, match=message):
        glue.read_glue_tsv(glue.get_task(task), str(path), labelled=True)


# ---------------------------------------------------------------- CSV / JSON files

def test_csv_files_with_a_task_map_label_names(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("sentence1,sentence2,label\na,b,entailment\nc,d,not_entailment\ne,f,1\n")
    data = glue.load_data_files({"train": str(train)}, glue.get_task("rte"), cache_dir=str(tmp_path / "cache"))
    assert data["train"]["label"] == [0, 1, 1]
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence1,label\na,entailment\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) \['sentence2'\] for task rte"):
        glue.load_data_files({"train": str(bad)}, glue.get_task("rte"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="nope.csv: no such file"):
        glue.load_data_files({"train": str(tmp_path / "nope.csv")}, None)


def test_infer_text_columns_follows_run_glue():
    assert glue.infer_text_columns(["label", "sentence2", "x", "sentence1"]) == ("sentence1", "sentence2")
    assert glue.infer_text_columns(["text", "label"]) == ("text",)
    assert glue.infer_text_columns(["a", "b", "c", "label"]) == ("a", "b")


# ---------------------------------------------------------------- STS-B scores, encodings, blank lines

STSB_ROW = [0, "main", "f", "2012", 1, "none", "none", "a man", "a person"]


@pytest.mark.parametrize("score", ["nan", "inf", "-inf", "-1", "5.5", "5.0001"])
def test_stsb_scores_must_be_finite_and_within_0_5(tmp_path, score):
    lines = LAYOUTS["stsb"][0][:2] + [STSB_ROW + [score]]
    path = write(tmp_path / "dev.tsv", lines)
    with pytest.raises(ValueError) as err:
        glue.read_glue_tsv(glue.get_task("stsb"), str(path), labelled=True)
    assert str(err.value) == f"{path} line 3: score {score!r} is not within [0, 5]"


def test_stsb_scores_at_the_bounds_are_kept(tmp_path):
    path = write(tmp_path / "dev.tsv", LAYOUTS["stsb"][0][:1] + [STSB_ROW + ["0"], STSB_ROW + ["5.000"]])
    assert glue.read_glue_tsv(glue.get_task("stsb"), str(path), labelled=True)["label"] == [0.0, 5.0]


@pytest.mark.parametrize("score, problem", [("nan", "score is missing"), ("", "score is missing"),
                                            ("inf", "score inf is not within [0, 5]"),
                                            ("-1", "score -1.0 is not within [0, 5]"),
                                            ("5.5", "score 5.5 is not within [0, 5]")])
def test_stsb_scores_in_csv_files(tmp_path, score, problem):
    path = tmp_path / "dev.csv"
    path.write_text(f"sentence1,sentence2,label\na,b,2.5\nc,d,{score}\n")
    with pytest.raises(ValueError) as err:
        glue.load_data_files({"validation": str(path)}, glue.get_task("stsb"), cache_dir=str(tmp_path / "cache"))
    assert str(err.value) == f"{path} row 2: {problem}"


def test_non_utf8_file_names_file_and_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_bytes(b"sentence\tlabel\ngood\t1\ncaf\xe9\t0\n")
    with pytest.raises(ValueError) as err:
        glue.read_glue_tsv(glue.get_task("sst2"), str(path), labelled=True)
    assert str(err.value) == f"{path} line 3: not UTF-8 text (byte 0xe9)"
    csv_path = tmp_path / "dev.csv"
    csv_path.write_bytes(b"sentence,label\ngood,1\nbad,0\ncaf\xe9,0\n")
    with pytest.raises(ValueError) as err:
        glue.load_data_files({"validation": str(csv_path)}, glue.get_task("sst2"), cache_dir=str(tmp_path / "c"))
    assert str(err.value) == f"{csv_path} line 4: not UTF-8 text (byte 0xe9)"


def test_trailing_blank_lines_are_skipped_inner_ones_rejected(tmp_path):
    spec = glue.get_task("sst2")
    path = tmp_path / "dev.tsv"
    path.write_text("sentence\tlabel\ngood\t1\nbad\t0\n\n\n  \n")
    columns = glue.read_glue_tsv(spec, str(path), labelled=True)
    assert columns["sentence"] == ["good", "bad"] and columns["label"] == [1, 0]
    path.write_text("sentence\tlabel\ngood\t1\n\nbad\t0\n")
    with pytest.raises(ValueError, match=r"dev.tsv line 3: expected at least 2 tab-separated fields, got 0"):
        glue.read_glue_tsv(spec, str(path), labelled=True)


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"sentence,label\n", "no examples"),
    (b'{"sentence": "good", "label": 1}\n{"sentence": "ba', "cannot read as JSON"),
])
def test_unreadable_csv_json_files_are_named(tmp_path, content, message):
    path = tmp_path / ("dev.json" if content.startswith(b"{") else "dev.csv")
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        glue.load_data_files({"validation": str(path)}, glue.get_task("sst2"), cache_dir=str(tmp_path / "cache"))
    assert str(err.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize("value", ["nan", "inf", ""])
def test_regression_labels_without_a_task_must_be_finite(tmp_path, value):
    path = tmp_path / "train.csv"
    path.write_text(f"text,label\ngood,1.5\nbad,{value}\n")
    with pytest.raises(ValueError) as err:
        glue.load_data_files({"train": str(path)}, None, cache_dir=str(tmp_path / "cache"))
    assert str(err.value) == f"{path} row 2: label {None if value in ('nan', '') else float(value)!r} " \
                             "is not a finite number"


def test_files_without_a_task_need_a_label_column_but_in_test_files(tmp_path):
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.csv").write_text("text,score\ngood,1\nbad,0\n")
    with pytest.raises(ValueError) as err:
        glue.load_data_files({"validation": str(tmp_path / "validation.csv")}, None, cache_dir=str(tmp_path / "cache"))
    assert str(err.value) == (f"{tmp_path / 'validation.csv'}: no 'label' column (without --task_name, train and "
                              "validation files need one)")
    raw = glue.load_data_files({"test": str(tmp_path / "test.csv")}, None, cache_dir=str(tmp_path / "cache"))
    assert raw["test"].column_names == ["text", "score"]
