"""Datasets and transforms for the DY-Conv trainer: Fashion-MNIST (IDX files) and ImageNet-style folders.

* Fashion-MNIST: 1-channel 28 px, 10 classes, read from the IDX gzip files of the
  Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
  or from ``--data DIR`` holding the same files, else downloaded by torchvision.
* ImageNet layout: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` read with
  ``torchvision.datasets.ImageFolder``, 3 channels, RandomResizedCrop + flip for
  training, Resize(size * 256 / 224) + CenterCrop for validation.  Hidden entries
  (names starting with ``.``: ``.ipynb_checkpoints``, ``.DS_Store``, AppleDouble
  ``._*`` files) are skipped, at any depth, and counted.

The scan of an image folder opens no file.  It follows symbolic links to files and to
folders, but refuses (:class:`DataError` naming the link) a link to a folder it has
already scanned (a link loop such as ``c0/loop -> ..``, or a second way into the same
folder), which would otherwise repeat images without end or count them twice; and an
image-named entry that is not a regular file (a FIFO, socket or device, which would
block the loader forever, or a broken link).

Unreadable images are detected lazily, when the loader first opens them (a full
upfront scan would read all of ImageNet before the first step): :func:`load_rgb_image`
turns the PIL error into a :class:`DataError` naming the file, and so refuses a
decompression bomb (more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels) before decoding
it.  16-bit greyscale images are scaled to 8 bits (``/ 257``), not clipped to white;
32-bit integer and float images (no defined 8-bit range) are refused by name.
"""
from __future__ import annotations

import gzip
import os
import stat
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms
from torchvision.transforms import v2

DATASETS = ("fashion-mnist", "imagenet")
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# IDX type byte -> numpy big-endian dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """Missing, empty or unreadable data; the CLI prints it as one line.

    Raised inside a DataLoader worker, PyTorch re-raises it in the main process as
    ``DataError(<worker traceback text>)``; ``str()`` recovers the original message.
    """

    def __str__(self) -> str:
        text = super().__str__()
        if text.startswith("Caught DataError"):
            return text.strip().rsplit("DataError: ", 1)[-1]
        return text


@dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about the data."""
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    small_input: bool
    hidden_entries_skipped: int = 0


# ---------------------------------------------------------------- IDX / Fashion-MNIST

def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Reads an IDX file (plain or ``.gz``) into a tensor of its stored shape and type."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:  # zlib.error: a damaged deflate stream inside the .gz
        raise DataError(f"cannot read IDX file {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">i4")) if len(raw) >= header else None
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if dims is None or len(raw) - header != int(np.prod(dims, dtype=np.int64)) * dtype.itemsize:
        raise DataError(f"IDX file {path} is truncated or its size does not match its header")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem,
                      directory / "FashionMNIST" / "raw" / f"{stem}.gz", directory / "FashionMNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(train: bool, root: str | os.PathLike | None = None,
                       download_root: str | os.PathLike = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    Looks for the IDX files in ``root`` (or, without it, the Debian package's
    directory); when they are absent, downloads them with torchvision into
    ``root`` (or ``download_root``).
    """
    image_stem, label_stem = FASHION_MNIST_FILES[train]
    search = Path(root) if root is not None else Path(FASHION_MNIST_SYSTEM_DIR)
    image_file, label_file = _find_idx(search, image_stem), _find_idx(search, label_stem)
    if image_file is not None and label_file is not None:
        images, labels = read_idx(image_file), read_idx(label_file).long()
    else:
        target = Path(root) if root is not None else Path(download_root)
        try:
            dataset = datasets.FashionMNIST(str(target), train=train, download=True)
        except (OSError, RuntimeError) as err:
            raise DataError(f"Fashion-MNIST is not in {search} and could not be downloaded into {target}: {err}") from None
        images, labels = dataset.data, dataset.targets.long()
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST files in {search} have unexpected shapes {tuple(images.shape)}, {tuple(labels.shape)}")
    return images, labels


class TensorImageDataset(Dataset):
    """Grey images held in memory as uint8 ``(N, H, W)``; items are ``(float (1, S, S), int label)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index].unsqueeze(0).float().div_(255)
        return self.transform(image), int(self.labels[index])


def fashion_mnist_transform(train: bool, image_size: int = 28):
    """Pad-2 random crop and flip for training; resize when ``image_size`` is not 28."""
    steps = [v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()] if train else []
    if image_size != 28:
        steps.append(v2.Resize(image_size, antialias=True))
    steps.append(v2.Normalize([FASHION_MNIST_MEAN], [FASHION_MNIST_STD]))
    return v2.Compose(steps)


# ---------------------------------------------------------------- ImageNet layout

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB.  16-bit greyscale (``I;16*``, and ``I`` from a PNG, which has no 32-bit
    greyscale) is scaled by ``1/257`` (65535 -> 255), where ``convert`` would clip every value
    above 255 to white; ``ValueError`` for other 32-bit integer and float images."""
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        values = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise ValueError(f"{image.mode!r} pixels (32-bit integer or float) have no defined 8-bit range; "
                         f"convert the image to 8 or 16 bits per channel")
    return image.convert("RGB")


def load_rgb_image(path: str) -> Image.Image:
    """ImageFolder loader that names the file when PIL cannot read it.

    A decompression bomb (more than ``Image.MAX_IMAGE_PIXELS`` pixels: PIL's warning as well as its
    error) is refused from the header alone, before anything is decoded."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(f)
            return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"cannot read image {path}: a decompression bomb ({err})") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


def imagenet_transform(train: bool, image_size: int = 224):
    """RandomResizedCrop + flip (train) or Resize(size * 256 / 224) + CenterCrop (val), ImageNet normalisation."""
    if train:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


class VisibleImageFolder(datasets.ImageFolder):
    """An ImageFolder that skips hidden class folders and hidden files or folders inside classes.

    ``hidden_entries_skipped`` counts the hidden class folders and the image-named files skipped for
    being hidden or inside a hidden folder (e.g. ``c0/._0.png``, ``c0/.ipynb_checkpoints/0.png``).
    """

    def __init__(self, root: str, **kwargs):
        self.hidden_entries_skipped = 0
        super().__init__(root, is_valid_file=self._counting_visible_image, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        entries = [e for e in os.scandir(directory) if e.is_dir()]
        self.hidden_entries_skipped += sum(_is_hidden(e.name) for e in entries)
        classes = sorted(e.name for e in entries if not _is_hidden(e.name))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}

    def _counting_visible_image(self, path: str) -> bool:
        if not datasets.folder.has_file_allowed_extension(path, datasets.folder.IMG_EXTENSIONS):
            return False
        if any(_is_hidden(part) for part in Path(path).relative_to(self.root).parts):
            self.hidden_entries_skipped += 1
            return False
        return True

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """torchvision's ``make_dataset`` (same samples in the same order), walked by :func:`scan_class`:
        no folder twice, no file that is not a regular file."""
        is_valid_file = is_valid_file or (lambda p: datasets.folder.has_file_allowed_extension(p, extensions))
        roots = {name: os.path.join(directory, name) for name in sorted(class_to_idx)}
        top = Path(os.path.realpath(directory))
        visited = {str(folder): str(folder) for folder in (top, *top.parents)}  # a link up here is a loop
        for name, root in roots.items():
            real = os.path.realpath(root)
            if real in visited:
                raise DataError(f"class folders {visited[real]} and {root} are the same folder ({real}); "
                                f"its images would be counted under two classes")
            visited[real] = root
        instances, empty = [], []
        for name, root in roots.items():
            found = [(path, class_to_idx[name]) for path in scan_class(root, is_valid_file, visited)]
            instances += found
            if not found:
                empty.append(name)
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}.")
        return instances


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


def _check_regular(path: str) -> None:
    """``DataError`` unless ``path`` (its target, for a link) is a regular file; stat only, never opened
    (opening a FIFO blocks until something writes to it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        what = "a broken symbolic link" if os.path.islink(path) else f"not readable ({err.strerror or err})"
        raise DataError(f"image {path} is {what}") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"image {path} is {_file_kind(mode)}, not a regular file; remove it from the data folder")


def scan_class(root: str, is_valid_file, visited: dict[str, str]) -> list[str]:
    """The files under ``root`` that ``is_valid_file`` accepts, in torchvision's order (folders sorted
    by path, files by name).  Links to files and folders are followed, but a folder whose real path
    is in ``visited`` (real path -> the path it was first reached by; updated here) is a
    ``DataError``: a link loop or a second way into a folder would repeat its images.  An accepted
    name that is not a regular file (FIFO, socket, device, broken link) is a ``DataError``."""
    folders: list[tuple[str, list[str]]] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        files = []
        try:
            with os.scandir(folder) as entries:
                entries = sorted(entries, key=lambda e: e.name)
        except OSError as err:
            raise DataError(f"cannot read folder {folder}: {err.strerror or err}") from None
        for entry in entries:
            if entry.is_dir():  # follows links
                real = os.path.realpath(entry.path)
                if real in visited:
                    raise DataError(f"{entry.path} leads to {real}, which the scan already reaches as "
                                    f"{visited[real]} (a symbolic-link loop, or a second link to one folder, "
                                    f"would repeat its images); remove the link")
                visited[real] = entry.path
                pending.append(entry.path)
            else:
                files.append((entry.name, entry.is_file()))  # is_file: a regular file (of the target, for a link)
        folders.append((folder, files))
    found = []
    for folder, files in sorted(folders):
        for name, regular in files:
            path = os.path.join(folder, name)
            if is_valid_file(path):
                if not regular:
                    _check_regular(path)
                found.append(path)
    return found


def image_folder(root: str | os.PathLike, split: str, image_size: int, train: bool) -> VisibleImageFolder:
    """``root/split/<class>/*`` as an ImageFolder without hidden entries; DataError when missing or empty."""
    directory = Path(root) / split
    if not directory.is_dir():
        raise DataError(f"data folder {directory} does not exist (expected {Path(root)}/{{train,val}}/<class>/<images>)")
    try:
        return VisibleImageFolder(str(directory), transform=imagenet_transform(train, image_size), loader=load_rgb_image)
    except FileNotFoundError as err:
        raise DataError(f"data folder {directory} is empty: {err}") from None


# ---------------------------------------------------------------- assembly

def random_subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """The first ``size`` items of a seeded permutation (the whole dataset when ``size`` is None or too big)."""
    if size is None or size >= len(dataset):
        return dataset
    if size < 1:
        raise DataError(f"a subset needs at least one sample, got {size}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:size].tolist())


def build_datasets(dataset: str, data_dir: str | None, image_size: int, train_subset: int | None = None,
                   val_subset: int | None = None, seed: int = 0, download_root: str = "data",
                   with_train: bool = True) -> tuple[Dataset | None, Dataset, DatasetInfo]:
    """Training and validation sets and their :class:`DatasetInfo`; without ``with_train`` (evaluation) the
    training set is neither read nor listed (``None``) and the classes are the validation folder's.

    Items are ``(image float (C, image_size, image_size), label int)``.
    """
    train_set = None
    if dataset == "fashion-mnist":
        if with_train:
            train_set = TensorImageDataset(*load_fashion_mnist(True, data_dir, download_root),
                                           fashion_mnist_transform(True, image_size))
        val_set = TensorImageDataset(*load_fashion_mnist(False, data_dir, download_root),
                                     fashion_mnist_transform(False, image_size))
        info = DatasetInfo("fashion-mnist", 10, 1, image_size, small_input=True)
    elif dataset == "imagenet":
        if data_dir is None:
            raise DataError("--dataset imagenet needs --data DIR with DIR/train/<class>/* and DIR/val/<class>/*")
        if not Path(data_dir).is_dir():
            raise DataError(f"data folder {data_dir} does not exist")
        val_set = image_folder(data_dir, "val", image_size, train=False)
        hidden = val_set.hidden_entries_skipped
        if with_train:
            train_set = image_folder(data_dir, "train", image_size, train=True)
            if train_set.classes != val_set.classes:
                raise DataError(f"{data_dir}/train and {data_dir}/val have different class folders")
            hidden += train_set.hidden_entries_skipped
        info = DatasetInfo("imagenet", len(val_set.classes), 3, image_size, small_input=False,
                           hidden_entries_skipped=hidden)
    else:
        raise DataError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if train_set is not None:
        train_set = random_subset(train_set, train_subset, seed)
    return train_set, random_subset(val_set, val_subset, seed + 1), info
