"""The run folder (models/<run>/) and the guarantees it keeps: a kill at any moment loses nothing.

- Every file that is rewritten is written to a temporary file and renamed (`write_atomic`).
- A run folder is locked while a process trains in it (`RunLock`); a second start says who holds it.
- An epoch is committed when Keras' BackupAndRestore has written its backup. Everything else that an epoch
  writes is made consistent with the last committed epoch when a phase (re)starts: history rows of
  uncommitted epochs are dropped, the best checkpoint of a committed epoch is published, and that of an
  uncommitted ("ghost") epoch is discarded (`settle_phase`).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from cifar100.config import Config
from cifar100.data import md5sum
from cifar100.errors import ConfigError, DatasetError, RunError

HISTORY = "history.csv"
CHECKPOINTS = ".checkpoints"  # ModelCheckpoint's files, one per improving epoch, until the epoch is committed
CHECKPOINT_PATTERN = "best-{epoch:04d}.keras"  # Keras fills in the 1-based epoch: the committed-epoch count


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write a file so that a reader (or a kill) sees either the old content or the new, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(content.encode() if isinstance(content, str) else content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, content) -> None:
    write_atomic(path, json.dumps(content, indent=1) + "\n")


MAX_JSON_BYTES = 64 << 20  # results.json of a CIFAR-100 run is about 100 kB


def read_json(path: Path, what: str | None = None) -> dict:
    """A JSON object from the run folder, or a RunError saying which file is damaged and what to do."""
    what = what or Path(path).name
    try:
        if Path(path).stat().st_size > MAX_JSON_BYTES:
            raise OSError(f"{Path(path).stat().st_size} bytes, more than any run writes")
        content = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RunError(f"{path}: damaged {what} (expected a JSON object, reading failed: {exc}). Delete the "
                       f"run folder {Path(path).parent} to start that run over") from None
    if not isinstance(content, dict):
        raise RunError(f"{path}: damaged {what}: expected a JSON object, found {type(content).__name__}")
    return content


# --- the lock ------------------------------------------------------------------------------------------

class RunLock:
    """An exclusive lock on a run folder for as long as a process uses it (released when it exits or dies).

    The lock file says who holds it: host, process id, command and start time.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.handle = None

    def __enter__(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunError(f"{self.path.parent} is in use by {holder}. Wait for it to finish, or stop that "
                           "process; two runs in one folder would mix their results") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                     f" ({' '.join(sys.argv)[:200]})\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the file releases the lock
            self.handle = None


# --- claiming the folder for a config ------------------------------------------------------------------

def has_progress(run_dir: Path) -> bool:
    """True once anything of a training run is in the folder (history, checkpoints, backups)."""
    return any((Path(run_dir) / name).exists() for name in (HISTORY, "best.keras", "backup", "phase1.weights.h5"))


# 2: best.keras is the inference model, of Keras' own layers (1, before 2026-12: the training augmentation and
# layers of this project's own inside it, which plain Keras cannot load)
MODEL_FORMAT = 2


def check_model_format(run_dir: Path) -> None:
    """Refuse a run folder with training progress made by a version of this project whose models differ."""
    if has_progress(run_dir) and read_state(run_dir).get("model_format") != MODEL_FORMAT:
        raise RunError(f"{run_dir} was trained by an earlier version of this project, whose best.keras holds the "
                       "training augmentation and layers of the project's own (it does not load in plain Keras): "
                       f"train that run again, after moving or deleting {run_dir}")


def claim(config: Config, run_dir: Path) -> bool:
    """Check that the run folder belongs to this config, writing config.json if it is new. True when resuming.

    A folder where nothing was trained yet (a start that failed early, a config.json damaged by a kill) is
    taken over; a folder with training progress and other settings is left untouched.
    """
    saved = Path(run_dir) / "config.json"
    saved.parent.mkdir(parents=True, exist_ok=True)
    check_model_format(run_dir)
    if read_state(run_dir).get("model_format") != MODEL_FORMAT:  # nothing trained here yet
        write_state(run_dir, model_format=MODEL_FORMAT)
    if saved.exists():
        try:
            previous = Config.load(saved)
        except (RunError, ConfigError) as exc:
            if has_progress(run_dir):
                raise RunError(f"{exc}. The folder holds training progress that cannot be resumed without its "
                               f"settings: restore {saved.name}, or delete {run_dir} to start over") from None
            previous = None
        if previous is not None:
            changes = config.training_differences(previous)
            if not changes:
                return True
            if has_progress(run_dir):
                raise RunError(f"{run_dir} holds a run with other settings ({'; '.join(changes)}). Nothing was "
                               "changed there: choose another run name, or delete that folder to start over")
    config.save(saved)
    return False


# --- history and state ---------------------------------------------------------------------------------

def history_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / HISTORY
    if not path.exists():
        return []
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            int(row["epoch"]), float(row.get("val_accuracy") or 0)
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{path}: damaged history (expected CSVLogger's rows: epoch, metrics; reading failed: "
                       f"{type(exc).__name__}: {exc}). Delete the run folder {path.parent} to start over") from None
    return rows


def trim_history(path: Path, first_dropped_epoch: int) -> None:
    """Keep the header and the rows of epochs before `first_dropped_epoch` (rewritten atomically)."""
    path = Path(path)
    if not path.exists():
        return
    history_rows(path.parent)  # a damaged file is named, not rewritten
    lines = path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if line.strip() and int(line.split(",", 1)[0]) < first_dropped_epoch]
    if len(kept) == 1:
        kept = []  # no rows left: CSVLogger writes the header again
    if kept != lines:
        write_atomic(path, "".join(kept))


def best_val_accuracy(run_dir: Path) -> float | None:
    values = [float(r["val_accuracy"]) for r in history_rows(run_dir) if r.get("val_accuracy")]
    return max(values) if values and (Path(run_dir) / "best.keras").exists() else None


def read_state(run_dir: Path) -> dict:
    path = Path(run_dir) / "state.json"
    return read_json(path, "state.json") if path.exists() else {}


def write_state(run_dir: Path, **changes) -> None:
    write_json(Path(run_dir) / "state.json", {**read_state(run_dir), **changes})


def finished(run_dir: Path) -> bool:
    """True once the run folder holds the final results (written last, after the test evaluation)."""
    return bool(read_state(run_dir).get("finished")) and (Path(run_dir) / "results.json").exists()


# --- committing epochs ---------------------------------------------------------------------------------

COMMITTED = "committed.json"  # {"epoch": n, "md5": of latest.weights.h5}: written last, it makes an epoch count


def _backup_files(backup_dir: Path, suffix: str = "") -> tuple[Path, Path]:
    return backup_dir / f"latest.weights.h5{suffix}", backup_dir / f"training_metadata.json{suffix}"


def mark_committed(backup_dir: Path) -> None:
    """After BackupAndRestore wrote its backup: record which weights and epoch it holds (atomically)."""
    weights, metadata = _backup_files(Path(backup_dir))
    write_json(Path(backup_dir) / COMMITTED, {"epoch": int(json.loads(metadata.read_text())["epoch"]),
                                              "md5": md5sum(weights)})


def _is_committed(weights: Path, metadata: Path, committed: dict) -> bool:
    try:
        return (int(json.loads(metadata.read_text())["epoch"]) == committed.get("epoch")
                and md5sum(weights) == committed.get("md5"))
    except (OSError, ValueError, KeyError, TypeError, DatasetError):
        return False


def repair_backup(backup_dir: Path) -> str:
    """Make BackupAndRestore's folder hold exactly the last committed epoch, after a kill.

    Keras writes its backup in place (it copies the previous one to *.bkp, then writes the weights, then
    the epoch), so a kill can leave a truncated weights file, or new weights beside the old epoch. The backup
    that matches committed.json (written after Keras' save) is kept: the latest, or else the previous one;
    with neither (nothing committed yet in this phase) the folder is removed and the phase starts afresh.
    Returns what was done: "ok", "previous", "removed" or "none".
    """
    backup_dir = Path(backup_dir)
    if not backup_dir.exists():
        return "none"
    marker = backup_dir / COMMITTED
    committed = read_json(marker) if marker.exists() else {}
    if _is_committed(*_backup_files(backup_dir), committed):
        return "ok"
    if _is_committed(*_backup_files(backup_dir, ".bkp"), committed):
        for latest, previous in zip(_backup_files(backup_dir), _backup_files(backup_dir, ".bkp"), strict=True):
            shutil.copyfile(previous, latest)
        return "previous"
    shutil.rmtree(backup_dir)
    return "removed"


def committed_epochs(backup_dir: Path, default: int) -> int:
    """How many epochs (counted from the run's start) the phase's backup holds; `default` without one."""
    metadata = Path(backup_dir) / "training_metadata.json"
    return int(json.loads(metadata.read_text())["epoch"]) if metadata.exists() else default


def settle_phase(run_dir: Path, backup_dir: Path, start_epoch: int) -> int:
    """Before a phase (re)starts: make the folder agree with its last committed epoch; returns that count.

    Rows of history.csv from uncommitted epochs are dropped. The best checkpoint of a committed epoch that
    was not yet published becomes best.keras; those of uncommitted epochs are deleted.
    """
    run_dir = Path(run_dir)
    repair_backup(backup_dir)
    committed = committed_epochs(backup_dir, start_epoch)
    trim_history(run_dir / HISTORY, committed)
    checkpoints = run_dir / CHECKPOINTS
    if checkpoints.is_dir():
        found = sorted(checkpoints.glob("best-*.keras"))
        done = [p for p in found if int(p.stem.split("-")[1]) <= committed]
        if done:
            os.replace(done[-1], run_dir / "best.keras")
        for leftover in checkpoints.iterdir():  # checkpoints of epochs that were never committed
            leftover.unlink()
    return committed


def publish_checkpoint(run_dir: Path, epochs_done: int) -> None:
    """Make the checkpoint that ModelCheckpoint wrote in a committed epoch the run's best.keras (atomic)."""
    candidate = Path(run_dir) / CHECKPOINTS / CHECKPOINT_PATTERN.format(epoch=epochs_done)
    if candidate.exists():
        os.replace(candidate, Path(run_dir) / "best.keras")


def callback_state_path(backup_dir: Path, epochs_done: int) -> Path:
    return Path(backup_dir) / f"callbacks-{epochs_done:04d}.json"


def save_callback_state(backup_dir: Path, epochs_done: int, state: dict, keep: int = 3) -> None:
    """The callbacks' state after `epochs_done` epochs, written before the epoch is committed; older ones go."""
    backup_dir = Path(backup_dir)
    backup_dir.mkdir(parents=True, exist_ok=True)
    write_json(callback_state_path(backup_dir, epochs_done), state)
    for old in sorted(backup_dir.glob("callbacks-*.json"))[:-keep]:
        old.unlink()


def last_callback_state(backup_dir: Path) -> dict | None:
    """The callbacks' state at the last epoch of a finished phase."""
    saved = sorted(Path(backup_dir).glob("callbacks-*.json"))
    return _read_callback_state(saved[-1]) if saved else None


def load_callback_state(backup_dir: Path, epochs_done: int) -> dict | None:
    return _read_callback_state(callback_state_path(backup_dir, epochs_done))


def _read_callback_state(path: Path) -> dict | None:
    return read_json(path, "callback state") if path.exists() else None
