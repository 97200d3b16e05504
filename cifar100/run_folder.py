"""The run folder (models/<run>/): a kill at any moment loses nothing, and a folder from elsewhere is untrusted.

Files are rewritten atomically (`write_atomic`) and read only as bounded regular files, never through a link
(`read_bytes`, `refuse_links`); `RunLock` keeps one process per folder. An epoch is committed once BackupAndRestore
has written its backup; when a phase (re)starts, `settle_phase` makes everything else agree with that epoch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import socket
import stat
import sys
import time
from pathlib import Path

from cifar100.config import Config, ConfigError, DatasetError, RunError, shown
from cifar100.data import md5sum

HISTORY = "history.csv"
CHECKPOINTS = ".checkpoints"  # ModelCheckpoint's files, one per improving epoch, until the epoch is committed
CHECKPOINT_PATTERN = "best-{epoch:04d}.keras"  # Keras fills in the 1-based epoch: the committed-epoch count
MAX_JSON_BYTES = 64 << 20  # far more than any JSON file a run writes
MAX_HISTORY_BYTES = 64 << 20


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replace `path` atomically (new temp file, rename): a reader or a kill sees old or new; no link is written to."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with open(fd, "wb") as handle:
        handle.write(content.encode() if isinstance(content, str) else content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_atomic(path: Path, save) -> None:
    """`save(tmp)` (model.save or save_weights: the name keeps its suffix), then an atomic rename onto `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    save(tmp)
    os.replace(tmp, path)


def read_bytes(path: Path, what: str | None = None, max_bytes: int | None = None) -> bytes:
    """A run folder's file: a regular file (no link, FIFO, device or folder) of at most `max_bytes`, else RunError."""
    path, what = Path(path), what or Path(path).name
    limit = MAX_JSON_BYTES if max_bytes is None else max_bytes
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        reason = "a symbolic link, which this project never reads through" if path.is_symlink() else exc.strerror
        raise RunError(f"{path}: cannot read {what}: {reason}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # checked before open(), which refuses a folder naming the descriptor
        os.close(fd)
        raise RunError(f"{path}: {what} is not a regular file (a folder, FIFO or device is in its place)")
    with open(fd, "rb") as handle:
        if info.st_size > limit:
            raise RunError(f"{path}: {what} is {info.st_size} bytes, more than any run writes ({limit})")
        return handle.read(limit + 1)[:limit]


MAX_LINK_CHECK_ENTRIES = 100_000


def refuse_links(run_dir: Path, hard_links: bool = False) -> None:
    """Refuse a run folder holding a symbolic link, FIFO, socket or device anywhere inside (the folder itself may be
    a link); with `hard_links`, for a training run, which writes history.csv and the backups in place, also a file
    of several hard links (a folder copied with `cp -al` reads as any other)."""
    run_dir, seen = Path(run_dir), 0
    pending = [run_dir] if run_dir.is_dir() else []
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                seen += 1
                if seen > MAX_LINK_CHECK_ENTRIES:
                    raise RunError(f"{run_dir}: more than {MAX_LINK_CHECK_ENTRIES} files: not a run folder")
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                    kind = "a symbolic link" if entry.is_symlink() else "not a regular file or folder"
                    raise RunError(f"{entry.path}: {kind} in the run folder {run_dir}; this project writes and "
                                   "reads only regular files there: remove it, or use another run folder")
                elif hard_links and (links := entry.stat(follow_symlinks=False).st_nlink) > 1:
                    raise RunError(_hard_links(entry.path, links, run_dir))


def _hard_links(path, links: int, run_dir: Path) -> str:
    return (f"{path}: a file of {links} hard links in the run folder {run_dir}; this project writes it (or, while "
            "training, files beside it) in place, which would change the other names too: copy the folder without "
            "hard links (cp -r), or use another run folder")


def write_json(path: Path, content) -> None:
    write_atomic(path, json.dumps(content, indent=1) + "\n")


def read_json(path: Path, what: str | None = None) -> dict:
    """A JSON object from the run folder, or a RunError saying which file is damaged and what to do."""
    what = what or Path(path).name
    raw = read_bytes(path, what)
    try:
        content = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also an int of 4,300+ digits
        raise RunError(f"{path}: damaged {what} (expected a JSON object, reading failed: "
                       f"{type(exc).__name__}: {str(exc)[:200]}). Delete the run folder {Path(path).parent} to "
                       "start that run over") from None
    if not isinstance(content, dict):
        raise RunError(f"{path}: damaged {what}: expected a JSON object, found {type(content).__name__}")
    return content


# --- the lock ------------------------------------------------------------------------------------------

_HELD: dict[str, list] = {}  # the run folders this process holds: [the lock file, how many hold it]


class RunLock:
    """An exclusive lock on a run folder while a process uses it (released when it exits or dies); the lock file
    names its holder (written in place: never a file of other names). Shared within a process: a notebook cell run
    again takes it while its last run holds it. `trains`: the holder writes files in place (refuse_links)."""

    def __init__(self, run_dir: Path, trains: bool = False):
        self.path, self.trains = Path(run_dir) / ".lock", trains
        self.key = self.entry = None

    def __enter__(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        refuse_links(self.path.parent, hard_links=self.trains)
        key = os.path.realpath(self.path)
        if key in _HELD and _same_file(_HELD[key][0], self.path):
            _HELD[key][1] += 1
            self.key, self.entry = key, _HELD[key]
            return self
        if key in _HELD:  # the folder was removed or replaced since: its old lock guards nothing
            _HELD[key][0].close()
            del _HELD[key]
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            os.close(fd)
            raise RunError(_hard_links(self.path, info.st_nlink, self.path.parent) if stat.S_ISREG(info.st_mode)
                           else f"{self.path}: not a regular file: remove it")
        handle = open(fd, "r+")
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
        _HELD[key] = [handle, 1]
        self.key, self.entry = key, _HELD[key]
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    acquire = __enter__

    def release(self) -> None:
        """Let go of this hold (the lock itself goes with the process's last one); a second call does nothing."""
        key, self.key = self.key, None
        entry = _HELD.get(key) if key is not None else None
        if entry is None or entry is not self.entry:  # released already, or its folder was replaced since
            return
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].close()  # closing the file releases the lock
            del _HELD[key]


def _same_file(handle, path: Path) -> bool:
    try:
        held, now = os.fstat(handle.fileno()), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


# --- claiming the folder for a config ------------------------------------------------------------------

def has_progress(run_dir: Path) -> bool:
    """True once an epoch has been trained in the folder (a history row, best.keras, a backup); an empty history or
    phase 1's weights alone (phase 1 skipped without pretrained weights: the initial ones) are none."""
    run_dir = Path(run_dir)
    return (run_dir / "best.keras").exists() or (run_dir / "backup").exists() or bool(history_rows(run_dir))


# 2: best.keras is the inference model, of Keras' own layers (1: it held this project's layers and augmentation)
MODEL_FORMAT = 2


def check_model_format(run_dir: Path) -> None:
    """Refuse a run folder with training progress made by a version of this project whose models differ."""
    if has_progress(run_dir) and read_state(run_dir).get("model_format") != MODEL_FORMAT:
        raise RunError(f"{run_dir} was trained by an earlier version of this project, whose best.keras holds the "
                       "training augmentation and layers of the project's own (it does not load in plain Keras): "
                       f"train that run again, after moving or deleting {run_dir}")


def check_fingerprint(run_dir: Path, fingerprint: str | None, earlier=None) -> None:
    """Refuse a run folder trained with another model than `fingerprint` (cifar100/models.py changed since);
    `earlier()`, asked only then: the same model's fingerprint as an earlier version computed it."""
    trained = read_state(run_dir).get("model_fingerprint")
    if fingerprint is not None and trained not in (None, fingerprint) and has_progress(run_dir) and \
            not (earlier is not None and trained == earlier()):
        raise RunError(f"{run_dir} holds a run of these settings trained with another model (fingerprint "
                       f"{shown(trained)}; the model built now: {fingerprint}): cifar100/models.py, or the model the "
                       "notebook's cell builds, changed since. Nothing was changed there: move that folder away to "
                       "train again, or set a run name")


def claim(config: Config, run_dir: Path, fingerprint: str | None = None, earlier=None) -> bool:
    """Check that the run folder belongs to this config and model (writing config.json if new); True when resuming.
    A folder without training progress is taken over; one with progress and other settings is left untouched."""
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
                check_fingerprint(run_dir, fingerprint, earlier)  # passed: this model's (nothing trained, or an
                if fingerprint is not None:                      # earlier version's fingerprint of it)
                    write_state(run_dir, model_fingerprint=fingerprint)
                count_epochs_from_1(run_dir)  # the folder is this config's: its history may be renumbered
                return True
            if has_progress(run_dir):
                raise RunError(f"{run_dir} holds a run with other settings ({'; '.join(changes)}). Nothing was "
                               "changed there: choose another run name, or delete that folder to start over")
    config.save(saved)
    if fingerprint is not None:
        write_state(run_dir, model_fingerprint=fingerprint)
    count_epochs_from_1(run_dir)
    return False


# --- history and state ---------------------------------------------------------------------------------

def history_rows(run_dir: Path) -> list[dict]:
    """The rows of history.csv, each checked; a torn last row (a write cut short by a kill) is left out."""
    return _read_history(Path(run_dir) / HISTORY)[0]


def _read_history(path: Path) -> tuple[list[dict], list[str], bool]:
    """(rows, the file's lines without a torn last row, whether there was none)."""
    if not path.exists() and not path.is_symlink():
        return [], [], True
    damaged = (f"{path}: damaged history (expected CSVLogger's rows: epoch, metrics); delete the run folder "
               f"{path.parent} to start over")
    try:
        lines = read_bytes(path, "history", MAX_HISTORY_BYTES).decode().splitlines(keepends=True)
        parsed = list(csv.reader(io.StringIO("".join(lines))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise RunError(f"{damaged} ({type(exc).__name__}: {exc})") from None
    if not parsed:
        return [], [], True
    header, rows = parsed[0], []
    if not header or header[0] != "epoch" or len(set(header)) != len(header):
        raise RunError(f"{damaged}: its header is {header[:5]!r}")
    for index, values in enumerate(parsed[1:], start=1):
        row = _history_row(header, values)
        if row is None or (rows and int(row["epoch"]) <= int(rows[-1]["epoch"])):
            if index == len(parsed) - 1 and not lines[-1].endswith("\n"):  # the last line, cut short
                return rows, lines[:-1], False
            raise RunError(f"{damaged}: line {index + 1} is not a row of a later epoch ({','.join(values)[:80]!r})")
        rows.append(row)
    return rows, lines, True


def _history_row(header: list[str], values: list[str]) -> dict | None:
    """A row as a dict; None unless it has one value per column, an integer epoch >= 0, and numbers or blanks."""
    if len(values) != len(header):
        return None
    try:
        if not (values[0].isascii() and values[0].isdigit()) or len(values[0]) > 9:  # not '²', which int() refuses
            return None
        for value in values[1:]:
            if value and (len(value) > 40 or not isinstance(float(value), float)):
                return None
    except ValueError:
        return None
    return dict(zip(header, values, strict=True))


def trim_history(path: Path, epochs_kept: int) -> None:
    """Keep the header and the rows of epochs 1 to `epochs_kept` (atomically); a torn last row goes too."""
    path = Path(path)
    rows, lines, complete = _read_history(path)
    if not lines:
        return
    kept = lines[:1] + [line for row, line in zip(rows, lines[1:], strict=True) if int(row["epoch"]) <= epochs_kept]
    if len(kept) == 1:
        kept = []  # no rows left: CSVLogger writes the header again
    if kept != lines or not complete:
        write_atomic(path, "".join(kept))


def count_epochs_from_1(run_dir: Path) -> None:
    """Make history.csv count epochs from 1, as Keras' progress bar does: a history whose first row is epoch 0 (an
    earlier version's) is renumbered, once."""
    if read_state(run_dir).get("history_epochs_from") == 1:
        return
    path = Path(run_dir) / HISTORY
    rows, lines, _ = _read_history(path)
    if rows and int(rows[0]["epoch"]) == 0:
        shifted = [line.split(",", 1) for line in lines[1:]]
        write_atomic(path, lines[0] + "".join(f"{int(epoch) + 1},{rest}" for epoch, rest in shifted))
    write_state(run_dir, history_epochs_from=1)


def best_val_accuracy(run_dir: Path) -> float | None:
    """The best validation accuracy in history.csv, which the next checkpoint must beat (None without best.keras)."""
    rows = [row for row in history_rows(run_dir) if row.get("val_accuracy")]
    for row in rows:  # NaN would beat nothing: best.keras would never change again
        if not 0 <= float(row["val_accuracy"]) <= 1:
            raise RunError(f"{Path(run_dir) / HISTORY}: damaged history: val_accuracy {row['val_accuracy']} at epoch "
                           f"{row['epoch']} is not an accuracy (0 to 1); delete the run folder {run_dir} to start over")
    values = [float(row["val_accuracy"]) for row in rows]
    return max(values) if values and (Path(run_dir) / "best.keras").exists() else None


def read_state(run_dir: Path) -> dict:
    """state.json: the run's progress, each value of the type this project writes."""
    path = Path(run_dir) / "state.json"
    if not path.exists() and not path.is_symlink():
        return {}
    state = read_json(path, "state.json")
    flags = ("finished", "finetune_done")
    counts = ("head_epochs_done", "model_format", "history_epochs_from")
    for key, value in state.items():
        ok = (isinstance(value, bool) if key in flags else
              isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**6 if key in counts else
              value is None or is_number(value) if key in ("head_feature_seconds", "finetune_activation_seconds") else
              value is None or isinstance(value, dict) if key.endswith("_compiled") else
              isinstance(value, str) and len(value) < 64 if key == "model_fingerprint" else True)
        if not ok:
            raise RunError(f"{path}: damaged state.json: {key} is {type(value).__name__} {str(value)[:40]!r}; "
                           f"delete the run folder {path.parent} to start over")
    return state


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
    """After BackupAndRestore wrote its backup: record which weights and epoch it holds (atomically), once the
    backup, its .bkp copy and the history's rows are on disk (Keras and CSVLogger do not sync them): what
    committed.json names survives a power cut, not only a kill."""
    backup_dir = Path(backup_dir)
    weights, metadata = _backup_files(backup_dir)
    for path in (weights, metadata, *_backup_files(backup_dir, ".bkp"), backup_dir.parents[1] / HISTORY):
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    write_json(backup_dir / COMMITTED, {"epoch": _backup_epoch(metadata), "md5": md5sum(weights)})


def _backup_epoch(metadata: Path) -> int:
    """The epoch count in BackupAndRestore's training_metadata.json."""
    epoch = read_json(metadata, "backup metadata").get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < 10**9:
        raise RunError(f"{metadata}: damaged backup metadata: epoch {str(epoch)[:40]!r}; delete the run folder "
                       f"{Path(metadata).parents[2]} to start over")
    return epoch


def _is_committed(weights: Path, metadata: Path, committed: dict) -> bool:
    try:
        return _backup_epoch(metadata) == committed.get("epoch") and md5sum(weights) == committed.get("md5")
    except (OSError, RunError, DatasetError):
        return False


def repair_backup(backup_dir: Path) -> str:
    """After a kill, make BackupAndRestore's folder hold exactly the last committed epoch: Keras writes in place, so
    the backup (latest or *.bkp) matching committed.json is kept; without committed.json (nothing committed yet) the
    folder is removed. Returns "ok", "previous", "removed" or "none". A kill leaves one of the two whole: with
    neither, the folder is damaged, and a RunError says so (nothing is removed)."""
    backup_dir = Path(backup_dir)
    if not backup_dir.exists():
        return "none"
    marker = backup_dir / COMMITTED
    committed = read_json(marker) if marker.exists() or marker.is_symlink() else None
    if _is_committed(*_backup_files(backup_dir), committed or {}):
        return "ok"
    if _is_committed(*_backup_files(backup_dir, ".bkp"), committed or {}):
        for latest, previous in zip(_backup_files(backup_dir), _backup_files(backup_dir, ".bkp"), strict=True):
            shutil.copyfile(previous, latest)
        return "previous"
    if committed is not None:
        raise RunError(f"{backup_dir}: damaged backup: neither latest.weights.h5 and training_metadata.json nor "
                       f"their .bkp copies hold the epoch that {COMMITTED} records ({shown(committed.get('epoch'))}). "
                       f"Nothing was changed: restore them, or delete {backup_dir} to train this phase again from its "
                       "start")
    shutil.rmtree(backup_dir)
    return "removed"


def committed_epochs(backup_dir: Path, default: int) -> int:
    """How many epochs (counted from the run's start) the phase's backup holds; `default` without one."""
    metadata = Path(backup_dir) / "training_metadata.json"
    return _backup_epoch(metadata) if metadata.exists() else default


def settle_phase(run_dir: Path, backup_dir: Path, start_epoch: int, end_epoch: int) -> int:
    """Before a phase (re)starts, make the folder agree with its last committed epoch (returned): rows of uncommitted
    epochs are dropped, a committed epoch's unpublished checkpoint becomes best.keras, uncommitted ones go. A backup
    outside the phase's epochs, or a history without the rows of committed epochs, is refused."""
    run_dir = Path(run_dir)
    repair_backup(backup_dir)
    committed = committed_epochs(backup_dir, start_epoch)
    if not start_epoch <= committed <= end_epoch:
        raise RunError(f"{Path(backup_dir) / 'training_metadata.json'}: the backup holds epoch {committed}, outside "
                       f"this phase's epochs {start_epoch + 1} to {end_epoch}. Nothing was changed: delete "
                       f"{backup_dir} to train this phase again from its start")
    rows = history_rows(run_dir)
    if committed and (not rows or int(rows[-1]["epoch"]) < committed):  # rows past it are uncommitted epochs'
        raise RunError(f"{run_dir / HISTORY}: no row of epoch {committed}, which the run has done (rows lost?); "
                       f"restore it, or delete the run folder {run_dir} to start over")
    trim_history(run_dir / HISTORY, committed)
    checkpoints = run_dir / CHECKPOINTS
    if checkpoints.is_dir():
        found, leftovers = {}, []
        for entry in checkpoints.iterdir():
            if entry.is_symlink() or not entry.is_file():
                raise RunError(f"{entry}: not a file, in the checkpoints' scratch folder: remove it, then run again")
            match = re.fullmatch(r"best-(\d{1,9})\.keras", entry.name)
            if match:
                found[int(match.group(1))] = entry
            else:  # a temporary file of Keras' saving, left by a kill
                leftovers.append(entry)
        done = [epoch for epoch in found if epoch <= committed]
        if done:
            os.replace(found.pop(max(done)), run_dir / "best.keras")
        for leftover in [*found.values(), *leftovers]:  # checkpoints of epochs never committed, or superseded
            leftover.unlink()
    return committed


def publish_checkpoint(run_dir: Path, epochs_done: int) -> None:
    """Make the checkpoint that ModelCheckpoint wrote in a committed epoch the run's best.keras (atomic)."""
    candidate = Path(run_dir) / CHECKPOINTS / CHECKPOINT_PATTERN.format(epoch=epochs_done)
    if candidate.exists():
        os.replace(candidate, Path(run_dir) / "best.keras")


def is_number(value, low: float = -1e300, high: float = 1e300) -> bool:
    """True for an int or float (not a bool) between `low` and `high`: a number read from a file, checked."""
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high
