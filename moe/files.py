"""Checks that turn any unreadable file of a model folder or a Trainer checkpoint into one
``ValueError`` naming the file, before transformers, safetensors or torch read it.

A file is checked by its kind, never trusted by its name:

* JSON (``config.json``, tokenizer files, ``partition.json``, ``trainer_state.json``, the
  ``*.safetensors.index.json`` of sharded weights): UTF-8 text holding one JSON value;
* text (``vocab.txt``, ``merges.txt``): UTF-8;
* safetensors: a complete header whose tensors cover the file exactly (the library
  reports truncation, random bytes and empty files as ``SafetensorError``);
* torch files (``pytorch_model.bin``, ``optimizer.pt``, ``scheduler.pt``,
  ``rng_state*.pth``, ``scaler.pt``, ``training_args.bin``): a zip archive whose members
  pass their CRC check, which rejects truncated, overwritten and random-byte files
  without unpickling anything.

A folder that :class:`moe.trainer.MoETrainer` saved also holds ``checksums.json`` (file name ->
SHA-256 of every weight file it wrote, :func:`write_checksums`; the Trainer writes the files, so a
manifest beside them is where their checksums can live); :func:`check_folder` verifies each listed
file against it (:func:`pad.runtime.verify`), so bytes overwritten inside ``model.safetensors`` (same
size, still a valid file) are reported instead of loaded.  A folder this project wrote (a Trainer
checkpoint or output folder, holding ``trainer_state.json``, or an MoE model, whose ``config.json`` has a
``moe`` entry) without the manifest is refused: it predates checksummed folders.  Other folders (a hub
model) are checked as above only.

Files that are absent are not checked here; whoever needs them reports their absence, except for the files
without which a Trainer checkpoint cannot be resumed (:func:`missing_checkpoint_files`).
"""
from __future__ import annotations

import glob
import json
import os
import zipfile

from pad.runtime import atomic_write, error_line, predates, read_json, read_text, sha256_file, verify

JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "generation_config.json", "partition.json", "trainer_state.json",
              "model.safetensors.index.json", "pytorch_model.bin.index.json")
TEXT_FILES = ("vocab.txt", "merges.txt")
CHECKSUMS_FILE = "checksums.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# A checkpoint resumes with its weights (one of these), optimizer, scheduler and trainer state; the Trainer writes
# trainer_state.json last, so a folder whose save was killed or failed lacks it at least.
CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")
CHECKPOINT_STATE = ("optimizer.pt", "scheduler.pt", "trainer_state.json")
TORCH_PATTERNS = ("pytorch_model*.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth",
                  "training_args.bin")


def check_safetensors(path: str) -> None:
    """``ValueError`` unless ``path`` is a complete safetensors file (header read, data length checked)."""
    from safetensors import SafetensorError, safe_open
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, expected a file")
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a complete safetensors file ({error_line(err)})") from None


def check_torch_file(path: str) -> None:
    """``ValueError`` unless ``path`` is an intact ``torch.save`` zip archive (every member's CRC checked)."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, expected a file")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: not a complete torch.save file ({err})") from None
    if bad is not None:
        raise ValueError(f"{path}: damaged torch.save file (member {bad} fails its CRC check)")


def write_checksums(folder: str) -> None:
    """Writes ``folder/checksums.json`` = ``{file name: sha256}`` for the weight files
    (:data:`WEIGHT_PATTERNS`) in ``folder``, atomically (:func:`pad.runtime.atomic_write`)."""
    names = sorted({os.path.basename(p) for pattern in WEIGHT_PATTERNS
                    for p in glob.glob(os.path.join(folder, pattern)) if os.path.isfile(p)})
    manifest = {name: sha256_file(os.path.join(folder, name)) for name in names}
    atomic_write(os.path.join(folder, CHECKSUMS_FILE), json.dumps(manifest, indent=2, sort_keys=True))


def written_by_this_project(folder: str) -> bool:
    """Whether ``folder`` is a Trainer checkpoint or output folder (``trainer_state.json``) or an MoE model
    (``config.json`` with a ``moe`` entry): folders that :class:`moe.trainer.MoETrainer` saves with a manifest."""
    if os.path.lexists(os.path.join(folder, "trainer_state.json")):
        return True
    config = os.path.join(folder, "config.json")
    return os.path.lexists(config) and "moe" in read_json(config)


def verify_checksums(folder: str) -> None:
    """:class:`pad.runtime.IntegrityError` naming the file unless every file listed in ``folder/checksums.json``
    that is present hashes to its recorded SHA-256, or when a folder :func:`written_by_this_project` has no
    manifest; other folders without one have nothing to verify.  An absent listed file is not an error here
    (a folder may keep only ``config.json`` and the compact export): whoever needs it reports its absence."""
    path = os.path.join(folder, CHECKSUMS_FILE)
    if not os.path.lexists(path):
        if written_by_this_project(folder):
            raise predates(f"model folder {folder}", f"checksummed folders (it has no {CHECKSUMS_FILE})",
                           "train it again with this version of moe/run_glue.py")
        return
    manifest = read_json(path)
    for name, recorded in sorted(manifest.items()):
        if not isinstance(recorded, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"{path}: entry {name!r} is not a file name with a SHA-256 string")
        listed = os.path.join(folder, name)
        if not os.path.lexists(listed):
            continue  # removed on purpose (e.g. model.safetensors beside the compact export); needed → reported by its loader
        try:
            actual = sha256_file(listed)
        except OSError as err:
            raise ValueError(f"{listed}: cannot read ({err.strerror or err})") from None
        verify(listed, recorded, actual, CHECKSUMS_FILE)


def missing_checkpoint_files(folder: str) -> list[str]:
    """The files a Trainer checkpoint needs to be resumed that ``folder`` lacks (empty: complete)."""
    present = set(os.listdir(folder))
    missing = [] if present.intersection(CHECKPOINT_WEIGHTS) else [CHECKPOINT_WEIGHTS[0]]
    return missing + [name for name in CHECKPOINT_STATE if name not in present]


def check_folder(folder: str) -> None:
    """Checks every file of a model folder or Trainer checkpoint that transformers may read
    (see the module docstring); ``ValueError`` for the first bad one."""
    if not os.path.isdir(folder):
        return
    for name in JSON_FILES:
        path = os.path.join(folder, name)
        if os.path.lexists(path):
            read_json(path)
    for name in TEXT_FILES:
        path = os.path.join(folder, name)
        if os.path.lexists(path):
            read_text(path)
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        check_safetensors(path)
    for pattern in TORCH_PATTERNS:
        for path in sorted(glob.glob(os.path.join(folder, pattern))):
            check_torch_file(path)
    verify_checksums(folder)
