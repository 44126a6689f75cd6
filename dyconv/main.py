"""Train or evaluate a (PAD-)DY-Conv ResNet / MobileNetV2 on ImageNet-style folders or Fashion-MNIST.

    python dyconv/main.py --config configs/dyconv/fashion_mnist_quick.yaml --conv dyconv --pad --output runs/x
    torchrun --nproc_per_node=8 dyconv/main.py --config configs/dyconv/resnet50_dyconv_pad.yaml --data /imagenet

Flags and ``--config file.yaml`` (keys are flag names, dashes or underscores;
command-line flags override the file; ``--no-pad`` etc. turn off a boolean the file
turns on).  With ``--pad``, Iterative Mode Partition runs once before training on
``--partition-batches`` training batches (rank 0; the masks are then broadcast),
never when resuming.  Outputs in ``--output``: ``checkpoint.pt`` (latest),
``best.pt``, ``recovery.pt`` (with ``--save-steps``, until an epoch checkpoint supersedes it),
``summary.json``, ``tb/`` (TensorBoard) and, for PAD, ``model_compact.safetensors``.  A fresh run refuses an ``--output`` that already
holds a run (``checkpoint.pt``, ``best.pt`` or ``summary.json``) unless given
``--overwrite-output-dir``; ``--resume`` of a checkpoint inside ``--output``
continues that run there.  ``--evaluate`` writes ``summary.json`` into a folder
that holds no training run (never into one with ``checkpoint.pt``/``best.pt``).

Exact resume: a checkpoint holds the model, optimizer, scaler, schedules' step and
every random state of every rank (torch CPU and CUDA, Python, NumPy); the training
loader is reseeded per epoch, so a run resumed with the same flags ends bit for bit
where the uninterrupted run ends (on CPU, with or without workers).

Preemption: ``--save-steps N`` also writes ``recovery.pt`` every N optimizer steps (never replacing
``checkpoint.pt``; removed once an epoch checkpoint supersedes it).  SIGTERM, SIGINT or SIGUSR1 finish the
current step, save ``recovery.pt``, print one line naming it and exit with 128 + the signal number;
``--resume auto`` continues from the folder's newest checkpoint or starts fresh, so a requeue script passes the
same flags every time.  A run locks its ``--output`` folder (a second run into it is refused, naming the
holder's PID and host), and a resume that would change what the run computes is refused, naming the flag
(only ``RESUME_MAY_CHANGE`` may differ, e.g. ``--epochs`` to extend it).

Exit codes: 0 success; 128 + signal after a stop signal; 2 bad input (unknown arch/conv, a value out of range or not
finite, a bad ``--output``, a missing/empty/unreadable data folder or image, a
missing, truncated, damaged or foreign checkpoint or config) or a diverging run (a
non-finite loss, weight or BatchNorm statistic: stopped before anything of that
epoch is saved) or a failed write (disk full, read-only folder, I/O error: the last good checkpoint stays and
no temporary file is left), reported as one ``error: ...`` line on stderr.  Checkpoints carry
a SHA-256 of their contents, are flushed to disk in a temporary file and renamed,
so a failing run never leaves a broken checkpoint behind.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torch.utils.tensorboard import SummaryWriter

import pad
from pad.compact import model_granularity
from pad.mixing import GRANULARITIES, SCALE_FACTOR_VARIANTS, UnrecordedGranularity, set_granularity, weight_banks
from pad.partition import BATCHNORM_MODES, CRITERIA, SCHEDULES, SCOPES, check_dynamic_ratio
from pad.runtime import (FolderInUse, IntegrityError, OneLineParser, Preempted, StopSignals, UsageError,
                         WriteError, atomic_write, code_version, error_line, keep_freed_memory, lock_folder,
                         machine_description, predates, report_error)
from dyconv.data import DATASETS, DataError, DatasetInfo, build_datasets
from dyconv.engine import (LR_SCHEDULES, CHECKPOINT_TEMPORARY_SUFFIX, CheckpointError, EpochProgress, TrainingDiverged,
                           TrainSettings, check_compatible, evaluate, link_checkpoint, load_checkpoint,
                           nonfinite_tensors, parameter_groups, random_states, restore_random_states, save_checkpoint,
                           train_one_epoch)
from dyconv.inference import load_compact_model, to_inference
from dyconv.layers import (CONV_TYPES, ODCONV_STATIC_ATTENTIONS, conv_schemes, dynamic_conv_names, get_temperature,
                           named_dynamic_convs, restore_conv_schemes, set_temperature, static_attention_applies)
from dyconv.models import ARCHS, build_model, count_flops
from dyconv.schemes import POLICIES

MAX_IMAGE_SIZE = 4096  # one 3 x 4096^2 float image is 200 MB: larger sizes only exhaust memory
MAX_SEED = 2**63 - 1  # torch takes seeds below 2**64; the runs also seed with seed + 1 and seed + epoch
PARTITION_BUFFERS = (".mask", ".granularity_code")  # a PAD bank's partition, equal on every rank once set


# ---------------------------------------------------------------- arguments


def _bounded(kind, low=None, high=None, low_open=False):
    """argparse type: ``kind(text)`` within the bounds; floats must be finite (NaN would pass any comparison)."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value
    return convert


def _dynamic_ratio(text: str) -> float:
    value = _bounded(float)(text)
    try:
        check_dynamic_ratio(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags, in the groups ``--help`` shows."""
    parser = OneLineParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of flag values; command-line flags override it")
    _add_data_flags(parser.add_argument_group("data"))
    _add_model_flags(parser.add_argument_group("model"))
    _add_partition_flags(parser.add_argument_group("mode partition (IMP)"))
    _add_optimisation_flags(parser.add_argument_group("optimisation"))
    _add_run_flags(parser.add_argument_group("run"))
    return parser


def _add_data_flags(g: argparse._ArgumentGroup) -> None:
    """The flags of what the run trains and evaluates on."""
    g.add_argument("--data", help="ImageNet layout DIR/train/<class>/*, DIR/val/<class>/*; "
                                  "for fashion-mnist, a folder holding the IDX files (downloaded there if absent)")
    g.add_argument("--dataset", choices=DATASETS, help="default: imagenet with --data, else fashion-mnist")
    g.add_argument("--image-size", type=_bounded(int, 8, MAX_IMAGE_SIZE),
                   help=f"default 224 (imagenet), 28 (fashion-mnist); at most {MAX_IMAGE_SIZE}")
    g.add_argument("--train-subset", type=_bounded(int, 1), help="train on a seeded random subset of N samples")
    g.add_argument("--val-subset", type=_bounded(int, 1), help="evaluate on a seeded random subset of N samples")
    g.add_argument("--workers", type=_bounded(int, 0), default=4, help="DataLoader worker processes")


def _add_model_flags(g: argparse._ArgumentGroup) -> None:
    """The flags of the network and its dynamic convs."""
    g.add_argument("--arch", choices=ARCHS, default="resnet18")
    g.add_argument("--conv", choices=tuple(CONV_TYPES), default="dyconv")
    g.add_argument("--pad", action=argparse.BooleanOptionalAction, default=False, help="partially dynamic (PAD) convs")
    g.add_argument("--resnet-width", type=_bounded(int, 1), default=64,
                   help="a ResNet's stem and first-stage channels (the paper's 64; each stage doubles it)")
    g.add_argument("--kernels", type=_bounded(int, 1), default=4, help="K kernels per dynamic conv")
    g.add_argument("--reduction", type=_bounded(int, 1), default=4, help="attention reduction r")
    g.add_argument("--scale-factors", choices=SCALE_FACTOR_VARIANTS, default="both")
    g.add_argument("--odconv-static-attention", choices=ODCONV_STATIC_ATTENTIONS, default=None,
                   help="PAD-ODConv: which attentions also scale the static part: channel-filter (the default, "
                        "the authors' release: the input-channel and filter attentions scale the whole conv), "
                        "none (the static part of DESIGN's Omega) or all (ODConv over the folded kernels)")
    g.add_argument("--conv-scheme", choices=POLICIES, default="auto",
                   help="execution scheme of every dynamic conv: auto (per layer, by a cost model) or one forced "
                        "where exact; a resumed run keeps the schemes its checkpoint recorded")


def _add_partition_flags(g: argparse._ArgumentGroup) -> None:
    """The flags of Iterative Mode Partition of a PAD model."""
    g.add_argument("--dynamic-ratio", type=_dynamic_ratio, default=0.3, help="kappa in (0, 1]")
    g.add_argument("--partition-criterion", choices=CRITERIA, default="taylor")
    g.add_argument("--partition-iterations", type=_bounded(int, 1), default=10)
    g.add_argument("--partition-schedule", choices=SCHEDULES, default="exponential")
    g.add_argument("--partition-scope", choices=SCOPES, default="global")
    g.add_argument("--partition-batches", type=_bounded(int, 1), default=10)
    g.add_argument("--partition-granularity", choices=GRANULARITIES, default="element",
                   help="what IMP makes static: single positions (the paper's), kernel slices or whole output "
                        "filters (unit: the static filters then run as one ordinary conv); a resumed run keeps "
                        "its checkpoint's")
    g.add_argument("--partition-batchnorm", choices=BATCHNORM_MODES, default="batch",
                   help="BatchNorm statistics while IMP scores: the partition batches' own or the running ones")


def _add_optimisation_flags(g: argparse._ArgumentGroup) -> None:
    """The flags of the optimizer, its schedules and the attention temperature."""
    g.add_argument("--epochs", type=_bounded(int, 1), default=100)
    g.add_argument("--batch-size", type=_bounded(int, 1), default=256, help="per process")
    g.add_argument("--lr", type=_bounded(float, 0.0, low_open=True), default=0.1)
    g.add_argument("--momentum", type=_bounded(float, 0.0, 1.0), default=0.9)
    g.add_argument("--weight-decay", type=_bounded(float, 0.0), default=1e-4,
                   help="on conv/linear weights only (not BN, biases, PAD phi)")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                   help="per iteration: cosine to 0, or x0.1 at 30/60/90%% of training")
    g.add_argument("--warmup-epochs", type=_bounded(float, 0.0), default=0.0, help="linear lr warmup")
    g.add_argument("--label-smoothing", type=_bounded(float, 0.0, 0.99), default=0.1)
    g.add_argument("--mixup", type=_bounded(float, 0.0), default=0.0, help="mixup alpha; 0 = off")
    g.add_argument("--temp-init", type=_bounded(float, 0.0, low_open=True), default=30.0,
                   help="attention temperature at the start (and during IMP)")
    g.add_argument("--temp-epochs", type=_bounded(float, 0.0), default=10.0, help="epochs to anneal it to 1")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="autocast: bfloat16 on CPU, float16 + GradScaler on CUDA")


def _add_run_flags(g: argparse._ArgumentGroup) -> None:
    """The flags of seeds, the output folder, checkpoints, resuming and evaluating."""
    g.add_argument("--seed", type=_bounded(int, 0, MAX_SEED), default=0,
                   help="seeds torch generators with seed, seed + 1 and seed + epoch: 0 to 2**63 - 1")
    g.add_argument("--output", default="runs/dyconv", help="output folder (checked before any data is read)")
    g.add_argument("--overwrite-output-dir", action=argparse.BooleanOptionalAction, default=False,
                   help="let a fresh run replace the run already in --output (its checkpoint.pt, best.pt, "
                        "summary.json); without it such a folder is refused")
    g.add_argument("--save-checkpoints", action=argparse.BooleanOptionalAction, default=True,
                   help="write checkpoint.pt (and best.pt) after each epoch; --no-save-checkpoints writes only "
                        "summary.json, TensorBoard and the compact model, so the run cannot be resumed (for "
                        "throwaway runs: the --smoke rows, whose ResNet-50 checkpoints are about 1 GB)")
    g.add_argument("--save-steps", type=_bounded(int, 0), default=0,
                   help="also write a recovery checkpoint (recovery.pt) every N optimizer steps, replacing the "
                        "previous one and never checkpoint.pt; 0 = only at epoch ends. A stop signal (SIGTERM, "
                        "SIGINT, SIGUSR1) always saves one at the current step")
    g.add_argument("--resume", help="checkpoint to continue from (or to evaluate with --evaluate; --evaluate also "
                                    "takes a PAD run's model_compact.safetensors); a checkpoint inside --output "
                                    "continues that run in place. 'auto': the newest of --output's checkpoint.pt "
                                    "and recovery.pt if there is one, else a fresh run (for requeue scripts)")
    g.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=False,
                   help="only evaluate the --resume checkpoint and write summary.json into --output, which must "
                        "not hold a training run (checkpoint.pt or best.pt): a training folder is never overwritten")


def config_tokens(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The YAML file ``path`` as command-line tokens (placed before the real ones, which then win)."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except OSError as err:
        raise UsageError(f"cannot read config {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"config {path} is not UTF-8 text (byte {err.start})") from None
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: e.g. an impossible !!timestamp
        raise UsageError(f"config {path} is not valid YAML: {error_line(err)}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise UsageError(f"config {path} must be a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    tokens = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in actions or dest in ("config", "help"):
            raise UsageError(f"config {path}: unknown key {key!r}")
        option = actions[dest].option_strings[0]
        if value is None:
            continue
        if isinstance(actions[dest], argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UsageError(f"config {path}: {key} must be true or false, got {value!r}")
            tokens.append(option if value else "--no-" + option[2:])
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UsageError(f"config {path}: {key} must be a single value, got {value!r}")
        else:
            tokens += [option, str(value)]
    return tokens


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    pre = OneLineParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    tokens = config_tokens(known.config, parser) if known.config else []
    args = parser.parse_args(tokens + argv)
    if args.dataset is None:
        args.dataset = "imagenet" if args.data else "fashion-mnist"
    if args.image_size is None:
        args.image_size = 224 if args.dataset == "imagenet" else 28
    if args.pad and args.conv not in dynamic_conv_names():
        raise UsageError(f"--pad needs a dynamic --conv ({named_dynamic_convs()})")
    static_attention = static_attention_applies(args.conv, args.pad)
    if args.odconv_static_attention not in (None, "none") and not static_attention:
        raise UsageError("--odconv-static-attention needs --conv odconv --pad")
    if args.odconv_static_attention is None:  # the authors' placement where it applies (docs/choices.md)
        args.odconv_static_attention = "channel-filter" if static_attention else "none"
    if args.resnet_width != 64 and not args.arch.startswith("resnet"):
        raise UsageError(f"--resnet-width applies to the ResNets only; {args.arch} takes its width from its name")
    if args.evaluate and not args.resume:
        raise UsageError("--evaluate needs --resume CHECKPOINT")
    if args.evaluate and args.resume == AUTO:
        raise UsageError("--evaluate needs the checkpoint to evaluate named, not --resume auto")
    if args.save_steps and not args.save_checkpoints:
        raise UsageError("--save-steps writes recovery checkpoints, which --no-save-checkpoints turns off")
    if args.resume and args.resume.endswith(".safetensors") and not (args.evaluate and args.pad):
        raise UsageError("a compact .safetensors file can only be evaluated (--evaluate --pad); "
                         "resume training from checkpoint.pt")
    return args


# ---------------------------------------------------------------- the output folder

AUTO = "auto"
RECOVERY_FILE = "recovery.pt"
RUN_FILES = ("checkpoint.pt", "best.pt", "summary.json", RECOVERY_FILE)  # a folder holding any of these holds a run
TRAINING_FILES = ("checkpoint.pt", "best.pt", RECOVERY_FILE)
WRITTEN_FILES = RUN_FILES + ("model_compact.safetensors",)


def _inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().parent == folder.resolve()


def check_output_folder(args: argparse.Namespace, lock: bool = True):
    """``--output`` as a folder this run may write into, and its lock; UsageError otherwise (before any data
    is read).

    It must be a folder or creatable as one (not a file, not under a file) and writable.  The run takes the
    folder's lock first (:func:`pad.runtime.lock_folder`; ``lock=False`` on the other ranks of a torchrun job),
    so a second run into it is refused before it writes anything.  ``--resume auto`` becomes the folder's
    newest checkpoint, or no resume.  A fresh run refuses a folder holding a run unless
    ``--overwrite-output-dir``; a ``--resume`` of a checkpoint in the folder continues that run; ``--evaluate``
    refuses a training folder whatever the flags.
    """
    output = Path(args.output)
    for parent in (output, *output.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == output else f"is under {parent}, which is a file"
            raise UsageError(f"--output {output} {where}, not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        handle = lock_folder(output) if lock else None
        fd, probe = tempfile.mkstemp(dir=output, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"--output {output} is not a writable folder: {err.strerror or err}") from None
    except FolderInUse as err:
        raise UsageError(f"--output {err}") from None
    if args.resume == AUTO:
        args.resume = newest_checkpoint(output)
    held = [name for name in RUN_FILES if (output / name).exists()]
    if args.evaluate and any(name in TRAINING_FILES for name in held):
        raise UsageError(f"--output {output} holds a training run ({', '.join(held)}); --evaluate never overwrites "
                         f"it: give --evaluate its own --output folder")
    continuing = args.resume is not None and not args.evaluate and _inside(args.resume, output)
    if held and not args.overwrite_output_dir and not continuing:
        raise UsageError(f"--output {output} already holds a run ({', '.join(held)}); pass --overwrite-output-dir "
                         f"to replace it, or --resume {output / 'checkpoint.pt'} to continue it")
    return output, handle


def newest_checkpoint(output: Path) -> str | None:
    """The checkpoint of ``output`` a requeued run continues from: ``recovery.pt`` (mid-epoch) where it is
    newer than ``checkpoint.pt`` (epoch end), else ``checkpoint.pt``; None where there is neither."""
    found = [output / name for name in ("checkpoint.pt", RECOVERY_FILE) if (output / name).is_file()]
    if len(found) == 2:
        steps = [load_checkpoint(path)["step"] for path in found]
        found = [found[1]] if steps[1] > steps[0] else [found[0]]
    if found:
        print(f"--resume auto: continuing from {found[0]}", flush=True)
    return str(found[0]) if found else None


# Flags a resume may change: where the run lives and reads from, how it is checkpointed and how many epochs it
# runs in all (a longer run stretches the remaining schedule). Every other flag changes what the run computes.
RESUME_MAY_CHANGE = ("config", "data", "workers", "output", "overwrite_output_dir", "save_checkpoints", "save_steps",
                     "resume", "evaluate", "epochs", "conv_scheme")


def check_same_run(recorded: dict, args: argparse.Namespace, path: str) -> None:
    """CheckpointError naming the first flag whose value differs from the run ``path`` was saved by."""
    for key, value in vars(args).items():
        if key in RESUME_MAY_CHANGE or key not in recorded or recorded[key] == value:
            continue
        raise CheckpointError(
            f"--{key.replace('_', '-')} is {value!r}, but checkpoint {path} was trained with {recorded[key]!r}: a "
            f"resume continues the same run (a resume may change only "
            f"{', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE if k not in ('resume', 'evaluate'))})")


def discard_replaced_run(output: Path, writes_checkpoints: bool = True) -> None:
    """With ``--overwrite-output-dir``, once the fresh run is about to train: the replaced run's summary,
    compact export and TensorBoard events go, so the folder never mixes two runs' results (its checkpoints
    are replaced as the fresh run writes its own; a run that writes none removes them too)."""
    names = ("summary.json", "model_compact.safetensors") + (() if writes_checkpoints else TRAINING_FILES)
    replaced = [output / name for name in names if (output / name).is_file()]
    for path in replaced:
        path.unlink()
    if (output / "tb").is_dir():
        shutil.rmtree(output / "tb")
        replaced.append(output / "tb")
    if replaced:
        print(f"--overwrite-output-dir: removed {', '.join(p.name for p in replaced)} of the replaced run", flush=True)


def remove_stale_temporaries(output: Path) -> None:
    """Deletes the ``*.tmp`` files a killed run may have left beside the files this CLI writes."""
    stale = [output / (name + CHECKPOINT_TEMPORARY_SUFFIX) for name in WRITTEN_FILES]
    stale = [path for path in stale if path.is_file()]
    for path in stale:
        path.unlink()
    if stale:
        print(f"removed {len(stale)} stale temporary file(s) of an interrupted run: "
              f"{', '.join(p.name for p in stale)}", flush=True)


# ---------------------------------------------------------------- distributed

@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: nccl on CUDA, gloo on CPU; else one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Distributed(dist.get_rank(), world_size, device)
    return Distributed(0, 1, device)


# ---------------------------------------------------------------- pieces of a run

def model_metadata(args: argparse.Namespace, num_classes: int, in_channels: int, small_input: bool) -> dict:
    """What a checkpoint must match to be loaded into this run's model."""
    return {"arch": args.arch, "conv": args.conv, "pad": args.pad, "kernels": args.kernels,
            "reduction": args.reduction, "scale_factors": args.scale_factors, "num_classes": num_classes,
            "in_channels": in_channels, "small_input": small_input, "resnet_width": args.resnet_width,
            "odconv_static_attention": args.odconv_static_attention}


def make_train_loader(train_set, args, ctx: Distributed) -> DataLoader:
    """The training loader (DistributedSampler under torchrun).

    It draws its worker seeds from its own generator, never from the global RNG.  Its workers are not
    persistent: each epoch starts workers seeded from the generator, which :func:`seed_epoch` reseeds, so an
    epoch's augmentation depends on (seed, epoch) only and a resumed run repeats it.
    """
    per_rank = -(-len(train_set) // ctx.world_size)
    sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed) if ctx.enabled else None
    # drop the last partial batch (a 1-sample batch breaks BatchNorm) unless it is the only one
    return DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler,
                      drop_last=per_rank >= args.batch_size, persistent_workers=False,
                      generator=torch.Generator().manual_seed(args.seed), num_workers=args.workers,
                      pin_memory=ctx.device.type == "cuda")


def make_val_loader(val_set, args, ctx: Distributed) -> DataLoader:
    """This rank's shard of the validation set; validation (no randomness) keeps its workers."""
    val_shard = Subset(val_set, range(ctx.rank, len(val_set), ctx.world_size)) if ctx.enabled else val_set
    return DataLoader(val_shard, args.batch_size, shuffle=False, persistent_workers=args.workers > 0,
                      generator=torch.Generator().manual_seed(args.seed), num_workers=args.workers,
                      pin_memory=ctx.device.type == "cuda")


def seed_epoch(train_loader: DataLoader, args, epoch: int) -> None:
    """Shuffle order and worker seeds of ``epoch`` from (seed, epoch) only, so a resumed run sees the same."""
    if isinstance(train_loader.sampler, DistributedSampler):
        train_loader.sampler.set_epoch(epoch)
    train_loader.generator.manual_seed(args.seed + epoch)


def partition_batches(train_set, args) -> list:
    """``--partition-batches`` training batches, drawn once with a generator seeded by ``--seed``."""
    loader = DataLoader(train_set, args.batch_size, shuffle=True, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(args.seed))
    return list(itertools.islice(loader, args.partition_batches))


def run_partition(model: nn.Module, train_set, args, ctx: Distributed) -> dict | None:
    """IMP on rank 0 at temperature ``--temp-init``, then every mask broadcast from rank 0."""
    report = None
    try:  # on every rank, before any batch is drawn: a ratio that keeps no dynamic position is no PAD model
        check_dynamic_ratio(args.dynamic_ratio, model, args.partition_scope, args.partition_granularity,
                                name="--dynamic-ratio")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if ctx.is_main:
        batches = partition_batches(train_set, args)
        device = ctx.device

        def loss_fn(m, batch):
            return F.cross_entropy(m(batch[0].to(device)), batch[1].to(device))

        def synflow_fn(m, batch):
            return m(torch.ones_like(batch[0]).to(device)).sum()

        set_temperature(model, args.temp_init)
        try:
            result = pad.iterative_mode_partition(
                model, batches, loss_fn, args.dynamic_ratio, iterations=args.partition_iterations,
                criterion=args.partition_criterion, schedule=args.partition_schedule, scope=args.partition_scope,
                synflow_fn=synflow_fn, generator=torch.Generator().manual_seed(args.seed),
                granularity=args.partition_granularity, batchnorm=args.partition_batchnorm)
        except ValueError as err:
            raise UsageError(f"mode partition: {err}") from None
        print(result.format(), flush=True)
        report = {**result.as_dict(), "batches": len(batches), "batch_size": args.batch_size}
    if ctx.enabled:
        for _, bank in weight_banks(model):
            dist.broadcast(bank.mask, src=0)
        set_granularity(model, args.partition_granularity)  # the other ranks' banks did not run IMP
    return report


def restore_model(model: nn.Module, checkpoint: dict, path: str) -> None:
    """Weights, masks (with their granularity) and temperature of ``checkpoint`` into ``model``; CheckpointError
    when they do not fit."""
    try:
        model.load_state_dict(checkpoint["model"])
    except UnrecordedGranularity:
        raise CheckpointError(f"checkpoint {path} predates PAD layers that record their partition granularity (its "
                              f"model holds no granularity_code); retrain it with this version of dyconv/main.py"
                              ) from None
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {error_line(err)}") from None
    if not isinstance(checkpoint.get("conv_schemes"), dict):
        raise predates(f"checkpoint {path}", "recorded conv schemes (it holds none)",
                       "retrain it with this version of dyconv/main.py")
    try:
        restore_conv_schemes(model, checkpoint["conv_schemes"])
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    if checkpoint.get("temperature") is not None:
        set_temperature(model, checkpoint["temperature"])


def restore_optimizer(optimizer, scaler, checkpoint: dict, path: str) -> None:
    """Optimizer (and GradScaler) state of ``checkpoint``; CheckpointError when it does not fit."""
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} holds an optimizer state that does not fit: "
                              f"{type(err).__name__}") from None


def restore_rank_random_states(checkpoint: dict, ctx: Distributed) -> None:
    """This rank's random states from ``checkpoint`` (one record per rank); a note when it was saved by a run of
    another number of processes."""
    states = checkpoint["rng"]
    if len(states) == ctx.world_size:
        restore_random_states(states[ctx.rank], ctx.device)
    elif ctx.is_main:
        print(f"note: the checkpoint holds random states of {len(states)} rank(s), this run has {ctx.world_size}: "
              f"the resumed run is not bit-identical to an uninterrupted one", flush=True)


def gather_random_states(ctx: Distributed) -> list[dict]:
    """Every rank's :func:`random_states`, in rank order (a collective under torchrun)."""
    local = random_states(ctx.device)
    if not ctx.enabled:
        return [local]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, local)
    return gathered


def wrap_ddp(model: nn.Module, ctx: Distributed) -> nn.Module:
    """DistributedDataParallel around ``model`` (or the model itself in one process).

    The partition (PAD's ``*.mask`` and ``*.granularity_code`` buffers) is excluded from DDP's per-forward
    buffer broadcast: it is set alike on every rank after IMP (or loaded alike) and never changes, while
    BatchNorm statistics keep being broadcast from rank 0.
    """
    if not ctx.enabled:
        return model
    partition = [name for name, _ in model.named_buffers() if name.endswith(PARTITION_BUFFERS)]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, partition)
    return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def sync_buffers(model: nn.Module, ctx: Distributed) -> None:
    """Rank 0's BatchNorm statistics to every rank (the partition is equal already), so every rank evaluates
    alike."""
    if ctx.enabled:
        for name, buffer in model.named_buffers():
            if not name.endswith(PARTITION_BUFFERS):
                dist.broadcast(buffer, src=0)


def check_finite(model: nn.Module, metrics: dict, epoch: int, step: int) -> None:
    """TrainingDiverged when the validation loss or a weight or BatchNorm statistic is not finite."""
    if not math.isfinite(metrics["loss"]):
        raise TrainingDiverged(epoch, step, f"the validation loss is {metrics['loss']}")
    bad = nonfinite_tensors(model)
    if bad:
        raise TrainingDiverged(epoch, step, f"{len(bad)} weights or BatchNorm statistics are not finite "
                                            f"(first: {bad[0]})")


def save_epoch(state: dict, output: Path, is_best: bool) -> None:
    """``checkpoint.pt`` (and ``best.pt`` when ``is_best``).  ``best.pt`` is written first: a run killed
    between the two resumes from the previous ``checkpoint.pt`` and redoes the epoch, whereas the other
    order could leave a newest-best epoch in ``checkpoint.pt`` only, never to be copied to ``best.pt``."""
    if is_best:
        save_checkpoint(state, output / "best.pt")
        link_checkpoint(output / "best.pt", output / "checkpoint.pt")  # one write for both names
    else:
        save_checkpoint(state, output / "checkpoint.pt")


def log_epoch(writer: SummaryWriter, model: nn.Module, metrics: dict, train_loss: float, epoch: int) -> None:
    """Per-epoch TensorBoard scalars: validation metrics, dynamic ratio, scale factors."""
    writer.add_scalar("train/epoch_loss", train_loss, epoch)
    for key in ("top1", "top5", "loss"):
        writer.add_scalar(f"val/{key}", metrics[key], epoch)
    ratio = pad.dynamic_ratio(model)
    if ratio is not None:
        writer.add_scalar("pad/dynamic_ratio", ratio, epoch)
    factors = pad.scale_factors(model)
    if factors:
        lambda_d = torch.tensor([d for d, _ in factors.values()])
        lambda_s = torch.tensor([s for _, s in factors.values()])
        writer.add_scalar("pad/lambda_d_mean", float(lambda_d.mean()), epoch)
        writer.add_scalar("pad/lambda_s_mean", float(lambda_s.mean()), epoch)
        writer.add_histogram("pad/lambda_d", lambda_d, epoch)
        writer.add_histogram("pad/lambda_s", lambda_s, epoch)
    writer.flush()


def write_json(data: dict, path: Path) -> None:
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def summarise(model: nn.Module, args, info, metrics: dict, extra: dict) -> dict:
    """The run's summary.json: metrics, dynamic ratio, parameter counts, FLOPs, PAD statistics."""
    counts = pad.parameter_counts(model)
    return {
        "top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
        "dynamic_ratio": pad.dynamic_ratio(model),
        "params_dense": counts["dense"], "params_compact": counts["compact"], "mask_entries": counts["mask_entries"],
        "flops": count_flops(model, (info.in_channels, info.image_size, info.image_size)),
        "arch": args.arch, "resnet_width": args.resnet_width, "conv": args.conv, "pad": args.pad, "kernels": args.kernels,
        "scale_factor_variant": args.scale_factors, "odconv_static_attention": args.odconv_static_attention,
        "dataset": info.name, "image_size": info.image_size,
        "num_classes": info.num_classes, "seed": args.seed,
        "scale_factors": {name: {"lambda_d": d, "lambda_s": s} for name, (d, s) in pad.scale_factors(model).items()},
        "temperature": get_temperature(model),
        "partition_granularity": model_granularity(model) if args.pad else None,
        "machine": machine_description(), "commit": code_version(),
        **extra,
    }


# ---------------------------------------------------------------- the run

@dataclass
class LastGood:
    """The newest checkpoint known good: named when a run diverges."""
    path: str | None = None
    epoch: int | None = None

    def describe(self) -> str:
        if self.path is None:
            return "no checkpoint was written before it"
        return f"the last good checkpoint is {self.path} (epoch {self.epoch}), left as it was"


@dataclass
class StepTiming:
    """Seconds spent in training epochs (data loading included) and the steps they took, in this process."""
    seconds: float = 0.0
    steps: int = 0

    def add(self, seconds: float, steps: int) -> None:
        self.seconds += seconds
        self.steps += steps

    def per_step(self) -> float | None:
        return self.seconds / self.steps if self.steps else None


def build(args: argparse.Namespace, info, pad_layers: bool, temperature: float) -> nn.Module:
    """The model the flags describe, for the data ``info`` describes (the one place a model is built)."""
    try:
        return build_model(args.arch, conv=args.conv, pad=pad_layers, num_classes=info.num_classes,
                           small_input=info.small_input, in_channels=info.in_channels, kernels=args.kernels,
                           reduction=args.reduction, scale_factors=args.scale_factors, temperature=temperature,
                           conv_scheme=args.conv_scheme, resnet_width=args.resnet_width,
                           odconv_static_attention=args.odconv_static_attention)
    except ValueError as err:
        raise UsageError(str(err)) from None


def finish_evaluation(model, args, info, metrics: dict, output: Path, extra: dict) -> None:
    """The summary of an ``--evaluate`` run, and its one line."""
    write_json(summarise(model, args, info, metrics, {"evaluate_only": True, **extra}), output / "summary.json")
    print(f"evaluate {args.resume}: top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f}", flush=True)


def evaluate_compact(args: argparse.Namespace, ctx: Distributed, output: Path, start: float) -> int:
    """``--evaluate --resume model_compact.safetensors``: the PAD model built from the flags, loaded
    from the compact file and evaluated in inference form (folded kernels, attention temperature 1,
    where the schedule ends; the file holds no temperature)."""
    _, val_set, info = load_datasets(args, ctx)
    model = build(args, info, pad_layers=True, temperature=1.0)
    try:
        load_compact_model(model, args.resume, args.arch, args.conv)
    except ValueError as err:
        raise UsageError(error_line(err)) from None
    val_loader = make_val_loader(val_set, args, ctx)
    metrics = evaluate(to_inference(model).to(ctx.device), val_loader, ctx.device, args.amp, ctx.enabled)
    if ctx.is_main:
        finish_evaluation(model, args, info, metrics, output, {"compact_file": args.resume,
                                                               "wall_seconds": time.time() - start})
    return 0


@dataclass
class Training:
    """What a training run carries from step to step, and saves in its checkpoints."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    meta: dict
    partition: dict | None
    epoch: int = 0
    step: int = 0
    best_top1: float = float("-inf")
    metrics: dict | None = None
    train_loss: float | None = None
    resume_at: EpochProgress | None = None  # inside an epoch, where a recovery checkpoint stopped
    last_good: LastGood = field(default_factory=LastGood)
    timing: StepTiming = field(default_factory=StepTiming)

    def state(self, args: argparse.Namespace, rng: list, epochs_done: int,
              progress: EpochProgress | None = None) -> dict:
        """A checkpoint after ``epochs_done`` epochs, and with ``progress`` that many batches into the next
        one (a recovery checkpoint)."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "epoch": epochs_done, "step": self.step, "temperature": get_temperature(self.model),
                 "best_top1": self.best_top1, "metrics": self.metrics, "train_loss": self.train_loss,
                 "partition": self.partition, "meta": self.meta, "args": vars(args), "rng": rng,
                 "conv_schemes": conv_schemes(self.model)}
        if progress is not None:
            state["epoch_progress"] = {"batches": progress.batches, "loss_sum": progress.loss_sum}
        return state

    def restore(self, checkpoint: dict, path: str) -> None:
        restore_optimizer(self.optimizer, self.scaler, checkpoint, path)
        self.epoch, self.step = checkpoint["epoch"], checkpoint["step"]
        self.best_top1 = checkpoint.get("best_top1", self.best_top1)
        self.metrics, self.train_loss = checkpoint.get("metrics"), checkpoint.get("train_loss")
        progress = checkpoint.get("epoch_progress")
        if progress is not None:
            try:
                self.resume_at = EpochProgress(int(progress["batches"]), float(progress["loss_sum"]))
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"checkpoint {path}: its position inside the epoch is malformed") from None
        self.last_good = LastGood(path, self.epoch)


def load_resume(args: argparse.Namespace, meta: dict) -> dict | None:
    """The ``--resume`` checkpoint, checked against this run's model (and, when training, its flags)."""
    if not args.resume:
        return None
    checkpoint = load_checkpoint(args.resume)
    check_compatible(checkpoint["meta"], meta, args.resume)
    if not args.evaluate:
        check_resumable(checkpoint, args.resume)
        recorded = dict(checkpoint["args"])
        if isinstance(checkpoint.get("partition"), dict):
            # a partitioned checkpoint's masks fix the granularity, which the resume keeps and records
            args.partition_granularity = recorded.pop("partition_granularity", args.partition_granularity)
        check_same_run(recorded, args, args.resume)
    return checkpoint


def check_resumable(checkpoint: dict, path: str) -> None:
    """A checkpoint training continues from records the run's flags (:func:`check_same_run`) and every rank's
    random states; one without them predates those records."""
    for key, what in (("args", "recorded run arguments"), ("rng", "recorded random states")):
        if checkpoint.get(key) is None:
            raise predates(f"checkpoint {path}", f"{what} (it holds none)",
                           "retrain it with this version of dyconv/main.py")
    if not isinstance(checkpoint["args"], dict):
        raise CheckpointError(f"checkpoint {path} is not a dyconv checkpoint: 'args' is malformed")


def stop_requested(signals: StopSignals, ctx: Distributed) -> int | None:
    """The stop signal any rank received (all ranks agree, so all stop at the same step), or None."""
    if not ctx.enabled:
        return signals.requested
    flag = torch.tensor([signals.requested or 0], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) or None


def save_recovery(run: Training, args, ctx: Distributed, output: Path, progress: EpochProgress) -> str:
    """``recovery.pt`` at the current step (rank 0 writes; a collective under torchrun)."""
    rng = gather_random_states(ctx)
    path = output / RECOVERY_FILE
    if ctx.is_main:
        save_checkpoint(run.state(args, rng, run.epoch, progress), path)
    return str(path)


def train(run: Training, args, ctx: Distributed, output: Path, loaders, settings: TrainSettings,
          signals: StopSignals, checkpoint: dict | None) -> None:
    """The epochs from ``run.epoch`` on: train, evaluate, save; recovery checkpoints every ``--save-steps``
    steps and at a stop signal (then :class:`Preempted`)."""
    train_loader, val_loader = loaders
    model = run.model
    net = wrap_ddp(model, ctx)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    writer = SummaryWriter(str(output / "tb")) if ctx.is_main else None

    def after_step(step: int, progress: EpochProgress, periodic: bool = True) -> None:
        run.step = step
        signum = stop_requested(signals, ctx)
        if not args.save_checkpoints:
            if signum:
                raise Preempted(signum, "nothing saved (--no-save-checkpoints)")
            return
        if signum or (periodic and args.save_steps and step % args.save_steps == 0):
            saved = save_recovery(run, args, ctx, output, progress)
            if signum:
                raise Preempted(signum, f"saved {saved} at step {step}; continue with --resume {saved} "
                                        f"(or --resume auto)")

    try:
        if run.resume_at is None:  # a signal during the set-up (data, IMP): the partition is saved
            after_step(run.step, EpochProgress(), periodic=False)
        for run.epoch in range(run.epoch, args.epochs):
            seed_epoch(train_loader, args, run.epoch)
            resume_at, run.resume_at = run.resume_at, None
            epoch_start, first_step = time.perf_counter(), run.step
            run.train_loss, run.step = train_one_epoch(
                net, train_loader, run.optimizer, criterion, settings, run.step, ctx.device, run.scaler, writer,
                run.epoch, progress=ctx.is_main, distributed=ctx.enabled, resume_at=resume_at,
                on_resumed=(lambda: restore_rank_random_states(checkpoint, ctx)) if resume_at else None,
                after_step=after_step)
            run.timing.add(time.perf_counter() - epoch_start, run.step - first_step)
            end_epoch(run, args, ctx, output, val_loader, writer)
            signum = stop_requested(signals, ctx)
            if signum:
                saved = run.last_good.path if args.save_checkpoints else None
                raise Preempted(signum, f"saved {saved} at the end of epoch {run.epoch + 1}" if saved
                                else "nothing saved (--no-save-checkpoints)")
        if run.metrics is None:  # resumed a finished run: nothing to train
            run.metrics = evaluate(model, val_loader, ctx.device, args.amp, ctx.enabled, progress=ctx.is_main)
    except TrainingDiverged as err:
        raise UsageError(f"{err}; stopped before saving anything of that epoch: {run.last_good.describe()}") from None
    finally:
        if writer is not None:
            try:
                writer.close()
            except OSError:  # the write that failed is reported; the close's own failure adds nothing
                pass


def end_epoch(run: Training, args, ctx: Distributed, output: Path, val_loader, writer) -> None:
    """Evaluates, logs and saves the epoch ``run.epoch`` just trained (the recovery checkpoint then goes)."""
    model = run.model
    sync_buffers(model, ctx)
    run.metrics = evaluate(model, val_loader, ctx.device, args.amp, ctx.enabled, progress=ctx.is_main)
    check_finite(model, run.metrics, run.epoch + 1, run.step)  # before anything of this epoch is saved
    rng = gather_random_states(ctx)
    is_best = run.metrics["top1"] >= run.best_top1  # metrics are all-reduced: every rank agrees
    run.best_top1 = max(run.best_top1, run.metrics["top1"])
    if ctx.is_main:
        log_epoch(writer, model, run.metrics, run.train_loss, run.epoch + 1)
        print(f"epoch {run.epoch + 1}/{args.epochs}: train loss {run.train_loss:.4f}, val top1 "
              f"{run.metrics['top1']:.2f} top5 {run.metrics['top5']:.2f} loss {run.metrics['loss']:.4f}", flush=True)
    if args.save_checkpoints:
        if ctx.is_main:
            save_epoch(run.state(args, rng, run.epoch + 1), output, is_best)
            (output / RECOVERY_FILE).unlink(missing_ok=True)  # older than the checkpoint just written
        run.last_good = LastGood(str(output / "checkpoint.pt"), run.epoch + 1)


@dataclass
class RunRecord:
    """What a run's summary records besides the model and its metrics: where it writes, the data, the sizes of
    the sets (``train_samples``, ``val_samples``, ``world_size``) and when the run started (``time.time()``)."""
    output: Path
    info: DatasetInfo
    sizes: dict
    start: float


def run(args: argparse.Namespace, ctx: Distributed, signals: StopSignals) -> int:
    """One run, as its steps: the output folder, the data, the model (restored from ``--resume``), then
    evaluation alone (``--evaluate``) or mode partition, training and the summary."""
    start = time.time()
    output, _lock = check_output_folder(args, lock=ctx.is_main)  # before any data is read or model built
    if ctx.is_main:
        remove_stale_temporaries(output)
    if args.evaluate and args.resume.endswith(".safetensors"):
        return evaluate_compact(args, ctx, output, start)
    torch.manual_seed(args.seed)
    train_set, val_set, info = load_datasets(args, ctx)
    meta = model_metadata(args, info.num_classes, info.in_channels, info.small_input)
    checkpoint = load_resume(args, meta)  # checked before anything is built or written
    model = build(args, info, pad_layers=args.pad, temperature=args.temp_init)
    if checkpoint is not None:
        restore_model(model, checkpoint, args.resume)
    model.to(ctx.device)
    if args.evaluate:
        record = RunRecord(output, info, {"val_samples": len(val_set), "world_size": ctx.world_size}, start)
        return evaluate_checkpoint(model, checkpoint, make_val_loader(val_set, args, ctx), args, ctx, record)
    loaders = make_train_loader(train_set, args, ctx), make_val_loader(val_set, args, ctx)
    record = RunRecord(output, info, {"train_samples": len(train_set), "val_samples": len(val_set),
                                      "world_size": ctx.world_size}, start)
    partition = checkpoint.get("partition") if checkpoint else None
    if args.pad and checkpoint is None:
        partition = run_partition(model, train_set, args, ctx)
    settings = train_settings(args, steps_per_epoch=len(loaders[0]))
    run_state = start_training(model, meta, partition, checkpoint, args, ctx)
    if ctx.is_main and checkpoint is None and args.overwrite_output_dir:
        discard_replaced_run(output, args.save_checkpoints)
    train(run_state, args, ctx, output, loaders, settings, signals, checkpoint)
    if ctx.is_main:
        write_training_results(run_state, checkpoint, args, record)
    return 0


def load_datasets(args: argparse.Namespace, ctx: Distributed):
    """``(train set, validation set, DatasetInfo)`` the flags name (:func:`dyconv.data.build_datasets`); with
    ``--evaluate`` the training set is not read (``None``)."""
    train_set, val_set, info = build_datasets(args.dataset, args.data, args.image_size, args.train_subset,
                                              args.val_subset, args.seed, with_train=not args.evaluate)
    if info.hidden_entries_skipped and ctx.is_main:
        print(f"data: skipped {info.hidden_entries_skipped} hidden entries (names starting with '.', e.g. "
              f".ipynb_checkpoints, AppleDouble ._* files) in {args.data}", flush=True)
    return train_set, val_set, info


def evaluate_checkpoint(model: nn.Module, checkpoint: dict, val_loader: DataLoader, args: argparse.Namespace,
                        ctx: Distributed, record: RunRecord) -> int:
    """``--evaluate --resume checkpoint.pt``: the restored ``model`` evaluated, and its summary."""
    metrics = evaluate(model, val_loader, ctx.device, args.amp, ctx.enabled)
    if ctx.is_main:
        finish_evaluation(model, args, record.info, metrics, record.output, {
            "epochs": checkpoint["epoch"], "partition": checkpoint.get("partition"),
            "wall_seconds": time.time() - record.start, **record.sizes})
    return 0


def train_settings(args: argparse.Namespace, steps_per_epoch: int) -> TrainSettings:
    """The learning-rate, temperature and mixup schedules of the flags, in optimizer steps."""
    return TrainSettings(base_lr=args.lr, lr_schedule=args.lr_schedule,
                         warmup_steps=round(args.warmup_epochs * steps_per_epoch),
                         total_steps=args.epochs * steps_per_epoch, temp_init=args.temp_init,
                         temp_anneal_steps=round(args.temp_epochs * steps_per_epoch),
                         mixup_alpha=args.mixup, amp=args.amp)


def start_training(model: nn.Module, meta: dict, partition: dict | None, checkpoint: dict | None,
                   args: argparse.Namespace, ctx: Distributed) -> Training:
    """The optimizer (SGD), GradScaler and state a training run starts from, resumed from ``checkpoint``
    (then this rank's random states are restored last: nothing random may run between this and training)."""
    optimizer = torch.optim.SGD(parameter_groups(model, args.weight_decay), lr=args.lr, momentum=args.momentum)
    scaler = torch.amp.GradScaler("cuda") if args.amp and ctx.device.type == "cuda" else None
    run_state = Training(model, optimizer, scaler, meta, partition, last_good=LastGood())
    if checkpoint is not None:
        run_state.restore(checkpoint, args.resume)
        restore_rank_random_states(checkpoint, ctx)
    return run_state


def write_training_results(run_state: Training, checkpoint: dict | None, args: argparse.Namespace,
                           record: RunRecord) -> None:
    """The summary of a finished training run (``summary.json``) and, for PAD, its compact model."""
    model = run_state.model
    summary = summarise(model, args, record.info, run_state.metrics, {
        "epochs": args.epochs if checkpoint is None else max(args.epochs, checkpoint["epoch"]),
        "steps": run_state.step, "train_loss": run_state.train_loss, "best_top1": run_state.best_top1,
        "evaluate_only": False, "partition": run_state.partition, "wall_seconds": time.time() - record.start,
        "train_seconds_per_step": run_state.timing.per_step(), **record.sizes})
    write_json(summary, record.output / "summary.json")
    if args.pad:
        pad.save_compact(model, record.output / "model_compact.safetensors")


def main(argv: list[str] | None = None) -> int:
    ctx = None
    signals = StopSignals().install()
    try:
        args = parse_args(sys.argv[1:] if argv is None else list(argv))
        keep_freed_memory()
        ctx = init_distributed()
        return run(args, ctx, signals)
    except (UsageError, DataError, CheckpointError, IntegrityError, WriteError) as err:
        return report_error(err)
    except Preempted as err:
        print(str(err), file=sys.stderr, flush=True)
        return err.exit_code()
    except OSError as err:  # a write outside the project's own writers (TensorBoard's event file)
        return report_error(WriteError(err.filename or "a file", err))
    finally:
        signals.restore()
        if ctx is not None and ctx.enabled and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
