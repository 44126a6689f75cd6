"""best.pt and checkpoint.pt as two names of one file (dyconv.engine.link_checkpoint, dyconv.main.save_epoch):
both load, replacing one leaves the other intact, a stale temporary link is never written through, and a
file system without hard links gets a durable copy."""
import os

import torch

from dyconv import engine
from dyconv.main import save_epoch


def state(epoch: int) -> dict:
    return {"model": {"w": torch.full((3,), float(epoch))}, "meta": {"arch": "x"}, "epoch": epoch, "step": 10 * epoch}


def test_best_epoch_gives_both_names_one_file_and_a_later_epoch_replaces_only_checkpoint(tmp_path):
    save_epoch(state(1), tmp_path, is_best=True)
    best, last = tmp_path / "best.pt", tmp_path / "checkpoint.pt"
    assert os.path.samefile(best, last) and best.stat().st_nlink == 2
    assert engine.load_checkpoint(best)["epoch"] == engine.load_checkpoint(last)["epoch"] == 1
    best_bytes = best.read_bytes()
    save_epoch(state(2), tmp_path, is_best=False)
    assert not os.path.samefile(best, last) and best.stat().st_nlink == 1
    assert best.read_bytes() == best_bytes and engine.load_checkpoint(best)["epoch"] == 1
    assert engine.load_checkpoint(last)["epoch"] == 2
    save_epoch(state(3), tmp_path, is_best=True)
    assert os.path.samefile(best, last) and engine.load_checkpoint(best)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "checkpoint.pt"]  # no temporary left


def test_a_stale_temporary_hard_link_is_replaced_not_written_through(tmp_path):
    """A kill between os.link and os.replace leaves checkpoint.pt.tmp as a second name of best.pt:
    the next write of checkpoint.pt must not truncate best.pt through it."""
    save_epoch(state(1), tmp_path, is_best=True)
    best = tmp_path / "best.pt"
    best_bytes = best.read_bytes()
    os.link(best, tmp_path / "checkpoint.pt.tmp")
    engine.save_checkpoint(state(2), tmp_path / "checkpoint.pt")
    assert best.read_bytes() == best_bytes and engine.load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2
    (tmp_path / "checkpoint.pt.tmp").write_bytes(os.urandom(100))  # a stale temporary, as kill -9 leaves it
    engine.link_checkpoint(best, tmp_path / "checkpoint.pt")  # linked, not copied (linking onto it would fail)
    assert os.path.samefile(best, tmp_path / "checkpoint.pt") and best.read_bytes() == best_bytes
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_without_hard_links_best_is_copied(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    save_epoch(state(1), tmp_path, is_best=True)
    best, last = tmp_path / "best.pt", tmp_path / "checkpoint.pt"
    assert not os.path.samefile(best, last) and best.read_bytes() == last.read_bytes()
    assert engine.load_checkpoint(last)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "checkpoint.pt"]
