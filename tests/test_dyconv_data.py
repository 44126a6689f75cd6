"""Datasets of the DY-Conv trainer: the IDX reader, Fashion-MNIST, ImageFolder errors, subsets."""
import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dyconv import data
from dyconv.data import DataError

torch.set_num_threads(1)


def write_idx(path: Path, array: np.ndarray, type_byte: int, big_endian_dtype: str) -> None:
    """An IDX file written by hand from the format's definition (magic 0 0 type ndim, int32 dims, data)."""
    payload = struct.pack(">BBBB", 0, 0, type_byte, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    payload += array.astype(big_endian_dtype).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


def test_read_idx_plain_and_gzip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "images.gz", images, 0x08, ">u1")
    write_idx(tmp_path / "images", images, 0x08, ">u1")
    for name in ("images.gz", "images"):
        got = data.read_idx(tmp_path / name)
        assert got.dtype == torch.uint8 and got.shape == (2, 3, 4)
        assert torch.equal(got, torch.from_numpy(images))


def test_read_idx_big_endian_int32(tmp_path):
    values = np.array([1, 256, 65536, -7, 2**30], dtype=np.int64)
    write_idx(tmp_path / "ints", values, 0x0C, ">i4")
    assert data.read_idx(tmp_path / "ints").tolist() == values.tolist()


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04" + bytes(10))
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(tmp_path / "junk")
    write_idx(tmp_path / "full", np.zeros((4, 5), dtype=np.uint8), 0x08, ">u1")
    raw = (tmp_path / "full").read_bytes()
    (tmp_path / "cut").write_bytes(raw[:-3])
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(tmp_path / "cut")


def test_real_fashion_mnist_files():
    root = Path(data.FASHION_MNIST_SYSTEM_DIR)
    assert root.is_dir(), "install the Debian package dataset-fashion-mnist (scripts/setup.sh does)"
    for train, size in ((True, 60000), (False, 10000)):
        images, labels = data.load_fashion_mnist(train)
        assert images.shape == (size, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (size,) and int(labels.min()) == 0 and int(labels.max()) == 9
        # Fashion-MNIST is balanced: every class has a tenth of each split
        assert torch.bincount(labels).tolist() == [size // 10] * 10


def tiny_fashion_dir(root: Path, n_train: int = 12, n_test: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for (images_name, labels_name), n in zip(data.FASHION_MNIST_FILES.values(), (n_train, n_test)):
        write_idx(root / f"{images_name}.gz", rng.integers(0, 256, (n, 28, 28)), 0x08, ">u1")
        write_idx(root / f"{labels_name}.gz", np.arange(n) % 10, 0x08, ">u1")
    return root


def test_load_fashion_mnist_from_a_folder(tmp_path):
    tiny_fashion_dir(tmp_path)
    images, labels = data.load_fashion_mnist(False, tmp_path)
    assert images.shape == (6, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_fashion_mnist_datasets_and_transforms(tmp_path):
    tiny_fashion_dir(tmp_path)
    train_set, val_set, info = data.build_datasets("fashion-mnist", str(tmp_path), 28)
    assert (info.num_classes, info.in_channels, info.small_input) == (10, 1, True)
    raw, _ = data.load_fashion_mnist(False, tmp_path)
    image, label = val_set[3]
    expected = (raw[3].float() / 255 - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD
    assert label == 3 and image.shape == (1, 28, 28)
    torch.testing.assert_close(image[0], expected)
    assert train_set[0][0].shape == (1, 28, 28)
    _, resized, _ = data.build_datasets("fashion-mnist", str(tmp_path), 32)
    assert resized[0][0].shape == (1, 32, 32)


def make_folder(root: Path, classes=("a", "b"), per_class=2, size=20) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_image_folder_layout_and_transforms(tmp_path):
    make_folder(tmp_path)
    train_set, val_set, info = data.build_datasets("imagenet", str(tmp_path), 16)
    assert (info.num_classes, info.in_channels, info.small_input) == (2, 3, False)
    assert len(train_set) == 4 and train_set[0][0].shape == (3, 16, 16) and val_set[0][0].shape == (3, 16, 16)


def test_evaluation_reads_no_training_folder(tmp_path):
    """Without the training set (``--evaluate``), DIR/train is neither needed nor listed: classes come from DIR/val."""
    make_folder(tmp_path)
    shutil.rmtree(tmp_path / "train")
    train_set, val_set, info = data.build_datasets("imagenet", str(tmp_path), 16, with_train=False)
    assert train_set is None and len(val_set) == 4 and info.num_classes == 2
    with pytest.raises(DataError, match="train does not exist"):
        data.build_datasets("imagenet", str(tmp_path), 16)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.build_datasets("imagenet", str(tmp_path / "missing"), 16)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match="is empty"):
        data.build_datasets("imagenet", str(tmp_path / "empty"), 16)
    make_folder(tmp_path / "mismatch")
    (tmp_path / "mismatch" / "val" / "b").rename(tmp_path / "mismatch" / "val" / "c")
    with pytest.raises(DataError, match="different class folders"):
        data.build_datasets("imagenet", str(tmp_path / "mismatch"), 16)
    with pytest.raises(DataError, match="needs --data"):
        data.build_datasets("imagenet", None, 16)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        data.load_rgb_image(str(bad))


def test_data_error_recovers_message_from_a_worker_traceback():
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                        "  File \"x.py\", line 1, in f\n    raise DataError(...)\n"
                        "dyconv.data.DataError: cannot read image /d/x.png: bad\n")
    assert str(wrapped) == "cannot read image /d/x.png: bad"
    assert str(DataError("plain message")) == "plain message"


def test_random_subset_is_seeded_and_distinct():
    dataset = list(range(50))
    a, b, c = (data.random_subset(dataset, 10, seed) for seed in (3, 3, 4))
    assert len(a) == 10 and list(a) == list(b) and list(a) != list(c)
    assert len(set(a)) == 10
    assert data.random_subset(dataset, None, 0) is dataset and data.random_subset(dataset, 80, 0) is dataset


def test_image_folder_skips_and_counts_hidden_entries(tmp_path):
    """Hidden class folders, AppleDouble ``._*`` files and files inside hidden folders are skipped and counted."""
    make_folder(tmp_path)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # a hidden class folder (with an image in it)
    (tmp_path / "train" / ".ipynb_checkpoints" / "0.png").write_bytes(b"x")
    (tmp_path / "train" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (tmp_path / "train" / "b" / ".cache").mkdir()
    (tmp_path / "train" / "b" / ".cache" / "1.png").write_bytes(b"x")
    (tmp_path / "train" / "b" / ".DS_Store").write_bytes(b"x")  # not an image name: never a sample, not counted
    (tmp_path / "val" / "a" / "._1.jpg").write_bytes(b"x")
    folder = data.image_folder(tmp_path, "train", 16, train=True)
    assert folder.classes == ["a", "b"] and folder.hidden_entries_skipped == 3
    assert sorted(Path(p).name for p, _ in folder.samples) == ["0.png", "0.png", "1.png", "1.png"]
    train_set, val_set, info = data.build_datasets("imagenet", str(tmp_path), 16)
    assert (len(train_set), len(val_set), info.num_classes, info.hidden_entries_skipped) == (4, 4, 2, 4)
    assert all(image.shape == (3, 16, 16) for image, _ in train_set)


def test_damaged_idx_files_raise_data_error(tmp_path):
    """Random bytes, truncations and flipped bytes of a .gz IDX file: read exactly, or DataError, never another error."""
    original = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "good.gz", original, 0x08, ">u1")
    good = (tmp_path / "good.gz").read_bytes()
    rng = np.random.default_rng(0)
    contents = [good[:n] for n in range(len(good))]
    contents += [bytes(good[:o]) + bytes([good[o] ^ 0xFF]) + good[o + 1:] for o in range(len(good))]
    contents += [b"\x1f\x8b" + rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in range(0, 300, 7)]
    path, outcomes = tmp_path / "x.gz", {"read": 0, "error": 0}
    for content in contents:
        path.write_bytes(content)
        try:
            array = data.read_idx(path)
            np.testing.assert_array_equal(array, original)  # a byte gzip does not check (its header's time)
            outcomes["read"] += 1
        except DataError:
            outcomes["error"] += 1
    assert outcomes["error"] > len(good)  # every truncation at least


# ---------------------------------------------------------------- hazards in image folders

def write_bomb_png(path: Path, side: int = 20000) -> Path:
    """A real, valid 1-bit PNG of ``side`` x ``side`` black pixels (20000^2 = 400 M pixels, over twice PIL's
    limit): a few tens of KB on disk, 1.2 GB once decoded to RGB."""
    import zlib as _zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", _zlib.crc32(kind + payload))

    row = b"\x00" + bytes((side + 7) // 8)  # filter byte 0, then the packed bits
    compressor = _zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_linked_folders_are_followed_once_and_loops_refused(tmp_path):
    """A link loop inside a class folder used to multiply its images (os.walk(followlinks=True) went round
    it until the path grew too long); now a folder reached twice is refused by name, a link to a new
    folder (or to a file) is followed once."""
    make_folder(tmp_path / "d")
    outside = make_folder(tmp_path / "outside", classes=("x",), per_class=3)
    (tmp_path / "d" / "train" / "b" / "more").symlink_to(outside / "train" / "x")
    (tmp_path / "d" / "train" / "a" / "linked.png").symlink_to(outside / "val" / "x" / "0.png")
    folder = data.image_folder(tmp_path / "d", "train", 16, train=True)
    assert len(folder) == 2 + 1 + 2 + 3 and [label for _, label in folder.samples] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert folder[2][0].shape == (3, 16, 16)  # the linked file loads

    for name, target in (("loop", ".."), ("self", "."), ("twin", "../b")):
        root = tmp_path / name
        make_folder(root)
        (root / "train" / "a" / name).symlink_to(target, target_is_directory=True)
        with pytest.raises(DataError, match=f"{root}/train/a/{name} leads to .* already reaches"):
            data.build_datasets("imagenet", str(root), 16)
    make_folder(tmp_path / "same")
    (tmp_path / "same" / "train" / "c").symlink_to(tmp_path / "same" / "train" / "b")
    with pytest.raises(DataError, match="class folders .*/train/b and .*/train/c are the same folder"):
        data.image_folder(tmp_path / "same", "train", 16, train=True)


def test_special_files_named_like_images_are_refused_without_opening(tmp_path):
    """A FIFO named ``*.png`` blocked the loader forever (open() waits for a writer); sockets and broken
    links are refused too, by name, at scan time; hidden ones are skipped like any hidden entry."""
    import signal
    import socket
    make_folder(tmp_path)
    signal.alarm(60)  # a regression would hang here instead of failing
    try:
        fifo = tmp_path / "train" / "a" / "pipe.png"
        __import__("os").mkfifo(fifo)
        with pytest.raises(DataError, match=r"image .*/train/a/pipe\.png is a FIFO \(named pipe\), not a regular file"):
            data.build_datasets("imagenet", str(tmp_path), 16)
        fifo.rename(tmp_path / "train" / "a" / "._pipe.png")  # hidden: skipped and counted, never opened
        assert data.image_folder(tmp_path, "train", 16, train=True).hidden_entries_skipped == 1
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(tmp_path / "val" / "b" / "sock.jpg"))
            with pytest.raises(DataError, match=r"image .*/val/b/sock\.jpg is a socket"):
                data.build_datasets("imagenet", str(tmp_path), 16)
        (tmp_path / "val" / "b" / "sock.jpg").unlink()
        (tmp_path / "val" / "b" / "gone.png").symlink_to(tmp_path / "nowhere.png")
        with pytest.raises(DataError, match=r"image .*/val/b/gone\.png is a broken symbolic link"):
            data.build_datasets("imagenet", str(tmp_path), 16)
    finally:
        signal.alarm(0)


def test_scan_keeps_torchvision_sample_order(tmp_path):
    """Same samples, same order as torchvision's own walk (seeded subsets pick the same images)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    make_folder(tmp_path, classes=("b", "a", "c"), per_class=3)
    (tmp_path / "train" / "a" / "sub" / "z").mkdir(parents=True)
    for rel in ("sub/9.png", "sub/z/1.png", "0b.png"):
        (tmp_path / "train" / "a" / rel).write_bytes(b"x")
    folder = data.image_folder(tmp_path, "train", 16, train=True)
    assert folder.samples == make_dataset(str(tmp_path / "train"), folder.class_to_idx, IMG_EXTENSIONS)


def test_decompression_bomb_is_refused_by_name(tmp_path, monkeypatch):
    bomb = write_bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 200_000
    with pytest.raises(DataError, match=r"cannot read image .*bomb\.png: a decompression bomb"):
        data.load_rgb_image(str(bomb))
    # between PIL's limit and twice it PIL only warns, then decodes: refused as well
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(tmp_path / "warns.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"cannot read image .*warns\.png: a decompression bomb"):
        data.load_rgb_image(str(tmp_path / "warns.png"))


def test_16_bit_images_are_scaled_not_saturated(tmp_path):
    values = np.array([[0, 257, 1000, 32896, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    rgb = np.asarray(data.load_rgb_image(str(tmp_path / "deep.png")))
    assert rgb.shape == (1, 6, 3) and (rgb == rgb[..., :1]).all()
    assert rgb[0, :, 0].tolist() == [0, 1, 4, 128, 254, 255]  # round(v / 257), not min(v, 255)
    Image.fromarray(np.ones((2, 2), dtype=np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(DataError, match=r"cannot read image .*float\.tiff: 'F' pixels .* no defined 8-bit range"):
        data.load_rgb_image(str(tmp_path / "float.tiff"))
