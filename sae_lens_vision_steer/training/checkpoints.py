"""Carrying out a training run: SAELens checkpoints marked complete (and older ones dropped), resuming from the
newest, a Ctrl-C that stops between two steps, and SAETrainer's progress bar."""

from __future__ import annotations

import contextlib
import functools
import shutil
import signal
import threading
from pathlib import Path

from sae_lens import SAETrainer

from ..core.fileio import write_json_atomic

RUN_FILE = "training_run.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_DONE = "checkpoint_complete.json"


@contextlib.contextmanager
def graceful_interrupts(stop: threading.Event):
    """A Ctrl-C (SIGINT) or SIGTERM during training sets `stop`: the data provider then raises
    `StopRequested` from its next `next()`, between two steps, where the trainer state is consistent (a
    second signal stops at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def trainer_progress(show: bool):
    """SAETrainer makes its own tqdm bar with no switch; silence it when asked (a thin patch)."""
    import sae_lens.training.sae_trainer as trainer_module

    if show:
        yield
        return
    original = trainer_module.tqdm
    trainer_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        trainer_module.tqdm = original


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = [p for p in ckpt_root.glob("*") if (p / CHECKPOINT_DONE).is_file() and p.name.isdigit()]
    return max(done, key=lambda p: int(p.name)) if done else None


def mark_checkpoint(ckpt_root: Path, trainer_ref: list[SAETrainer], checkpoint_path: Path | None) -> None:
    """Called by SAETrainer after it wrote a checkpoint: mark it complete (atomically), drop older ones."""
    if checkpoint_path is None:
        return
    trainer = trainer_ref[0]
    write_json_atomic(checkpoint_path / CHECKPOINT_DONE, {"n_training_samples": trainer.n_training_samples})
    for p in ckpt_root.glob("*"):
        if p.is_dir() and p != checkpoint_path:
            shutil.rmtree(p, ignore_errors=True)
