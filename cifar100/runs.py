"""The run folder: named by the settings and the recipe (what Keras serializes of the model and of each phase's
compile), locked while it trains, written only through one atomic writer and read through one bounded reader,
with one checkpoint that holds everything a resume needs.

    models/<preset>[-<changed settings>]-<hash>/
        config.json  recipe.json  checkpoint.npz  phase1.npz  history.csv  logs/  best.keras  results.json
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from cifar100.config import Config, RunError, printable, shown
from cifar100.keras_fixes import keras
from cifar100.safe_pickle import open_regular

MAX_JSON_BYTES = 64 << 20
MAX_CHECKPOINT_BYTES = 8 << 30


# --- one writer, one reader ------------------------------------------------------------------------------

def write_atomic(path: Path, content: bytes | str | None = None, save=None) -> None:
    """Write `content` (or call `save(temporary_path)`) to a temporary file beside `path`, sync it, and rename
    it over `path`: a kill leaves the old file or the new one, and a link at `path` is replaced, not followed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.name)
    try:
        with os.fdopen(fd, "wb") as handle:
            if content is not None:
                handle.write(content.encode() if isinstance(content, str) else content)
        if save is not None:
            save(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_file(path: Path, limit: int = MAX_JSON_BYTES) -> bytes:
    """A regular file of at most `limit` bytes (a FIFO or device never blocks), or one line saying why not."""
    try:
        with open_regular(Path(path), limit) as handle:
            return handle.read()
    except Exception as exc:
        raise RunError(str(exc)) from None


def read_json(path: Path) -> dict:
    try:
        content = json.loads(read_file(path))
    except (ValueError, RecursionError) as exc:
        raise RunError(f"{path}: not valid JSON ({printable(exc)[:80]})") from None
    if not isinstance(content, dict):
        raise RunError(f"{path}: expected a JSON object, found {shown(content)}")
    return content


def write_json(path: Path, content) -> None:
    write_atomic(path, json.dumps(content, indent=1, default=str) + "\n")


# --- the recipe: what Keras serializes, without its auto-generated names ---------------------------------

def _canonical(config):
    """A Keras config with each name replaced by the order of its first appearance: `dense_3` in one session
    is `dense` in another, and the same recipe must find the same run."""
    names: dict[str, str] = {}

    def collect(node):
        if isinstance(node, dict):
            if isinstance(node.get("name"), str):
                names.setdefault(node["name"], f"#{len(names)}")
            for value in node.values():
                collect(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                collect(value)

    def rename(node):
        if isinstance(node, dict):
            return {key: rename(value) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return [rename(value) for value in node]
        if isinstance(node, str):
            return "/".join(names.get(part, part) for part in node.split("/"))
        return node

    collect(config)
    return rename(config)


def _described(item) -> str:
    """An optimizer or loss in one readable line: its class and the settings that are not defaults."""
    config = keras.saving.serialize_keras_object(item)
    if not isinstance(config, dict):  # a loss given by name
        return str(config)
    inner = config.get("config", {})
    if "inner_optimizer" in inner:  # mixed precision's loss scaling: the optimizer inside
        return _described(item.inner_optimizer)
    shown_keys = ("learning_rate", "weight_decay", "momentum", "nesterov", "clipnorm", "label_smoothing",
                  "use_ema", "from_logits")
    parts = []
    for key in shown_keys:
        value = inner.get(key)
        if isinstance(value, dict):  # a schedule
            value = f"{value.get('class_name')}({', '.join(f'{k}={v}' for k, v in value['config'].items())})"
        if value not in (None, False, 0, 0.0):
            parts.append(f"{key}={value}")
    return f"{config.get('class_name', type(item).__name__)}({', '.join(parts)})"


def phase_recipe(trainee: keras.Model) -> dict:
    """What a phase's compile and fit train: the trainee, its optimizer and loss, which weights train."""
    if trainee.optimizer is None:
        raise RunError(f"the model {trainee.name!r} is not compiled: call compile(...) before the run starts")
    trainable = sorted({w.path.split("/")[0] for w in trainee.trainable_weights})
    return {"optimizer": _described(trainee.optimizer), "loss": _described(trainee.loss),
            "trains": f"{len(trainee.trainable_weights)} of {len(trainee.weights)} weights "
                      f"({', '.join(trainable[:4])}{', ...' if len(trainable) > 4 else ''})",
            "keras": _canonical([trainee.get_config(), keras.saving.serialize_keras_object(trainee.optimizer),
                                 keras.saving.serialize_keras_object(trainee.loss),
                                 [w.path for w in trainee.trainable_weights]])}


def _digest(content) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:6]


def folder_name(config: Config, digest: str) -> str:
    """`<preset>[-<setting>=<value>...]-<hash>`: readable where the settings differ from the preset."""
    def value(v):
        text = f"{v:g}" if isinstance(v, float) else Path(str(v)).name if "/" in str(v) else str(v)
        return re.sub(r"[^A-Za-z0-9._+-]", "_", text)[:20]

    readable = "-".join([config.preset or "custom"] + [f"{k}={value(v)}" for k, v in config.changed().items()])
    return f"{readable[:100]}-{digest}"


# --- the run --------------------------------------------------------------------------------------------

class Run:
    """One run of the notebook's recipe. `start(phase, trainee)` finds or names its folder and restores its
    checkpoint; `callbacks.for_run` commit every epoch. Only the chief of a multi-worker run writes `runs_dir`."""

    def __init__(self, config: Config, model: keras.Model, run_dir: str | Path | None = None, writes: bool = True):
        if not writes:  # a worker other than the chief: a folder of its own, left behind in the temporary folder
            config, run_dir = config.replace(runs_dir=tempfile.mkdtemp(prefix="cifar100-worker-")), None
        self.config, self.model, self.forced = config, model, Path(run_dir) if run_dir else None
        self.dir: Path | None = None
        self.recipe: dict = {"model": [], "head": None, "finetune": None}
        self.state: dict = {"phase": "head", "epoch": 0, "done": False, "history": [], "callbacks": {}}
        self.arrays: dict = {}
        self.trainee, self.phase, self.lock = None, "head", None
        self.phase1_epochs = 0

    # -- naming and resuming --
    def start(self, phase: str, trainee: keras.Model) -> tuple[int, int]:
        """Name the run by its settings and recipe (phase 1), or carry it into a folder of its own when phase 2's
        recipe differs from the one its folder holds; restore the checkpoint. Returns fit's (initial_epoch,
        epochs): equal when the phase is done."""
        if phase not in ("head", "finetune"):
            raise ValueError(f"phase must be 'head' or 'finetune', got {phase!r}")
        if phase == "finetune" and self.dir is None:
            raise RunError("phase 2 starts after phase 1's run.start('head', ...): run the phase-1 cell first")
        self.phase, self.trainee = phase, trainee
        self.recipe[phase] = phase_recipe(trainee)
        if phase == "head":
            layers = [f"{type(layer).__name__} {layer.name}" for layer in self.model.layers]
            self.recipe = {"model": layers, "head": self.recipe["head"], "finetune": None}
            self.key = {"settings": self.config.identity(), "model": _canonical(self.model.get_config()),
                        "head": self.recipe["head"]["keras"]}
            self._use(self.forced or Path(self.config.runs_dir) / folder_name(self.config, _digest(self.key)))
        else:
            held = self._read_recipe(self.dir)
            if held.get("finetune") not in (None, self.recipe["finetune"]) and not self.forced:
                self.key = {**self.key, "finetune": self.recipe["finetune"]["keras"]}
                phase1 = self.dir / "phase1.npz"
                self._use(Path(self.config.runs_dir) / folder_name(self.config, _digest(self.key)))
                if not (self.dir / "checkpoint.npz").exists() and phase1.exists():
                    self._restore(phase1)  # phase 1 carried over: only phase 2 trains here
                    self.state["callbacks"].pop("best", None)  # best.keras: the best of this phase 2
            elif held.get("finetune") not in (None, self.recipe["finetune"]):
                raise RunError(f"{self.dir}: holds phase 2 of another recipe; leave --run-dir out to give this one a "
                               "folder of its own")
        self.phase1_epochs = self.state.get("phase1_epochs", 0)
        if phase == "head":
            last = self.config.head_epochs
            first = last if self.state["phase"] == "finetune" else min(self.state["epoch"], last)
            done = self.state["phase"] == "finetune" or self.state["done"]
        else:
            last = self.phase1_epochs + self.config.finetune_epochs
            first = self.state["epoch"] if self.state["phase"] == "finetune" else self.phase1_epochs
            done = self.state["phase"] == "finetune" and self.state["done"]
        if self.state["phase"] == phase and not done:
            self._restore_optimizer(trainee)
        return (last, last) if done else (first, last)

    def _use(self, folder: Path) -> None:
        """Take `folder` for this run: locked, and its checkpoint (if any) restored."""
        if self.lock is not None and self.dir != folder:
            self.lock.close()
            self.lock = None
        if folder.exists() and not folder.is_dir():
            raise RunError(f"{folder}: not a folder")
        if self._read_recipe(folder).get("key") not in (None, _digest(self.key)):
            raise RunError(f"{folder}: holds a run of other settings or another recipe; choose another --run-dir, "
                           "or leave it out to name the folder by the settings and the recipe")
        self.dir = folder
        if self.lock is None:
            folder.parent.mkdir(parents=True, exist_ok=True)
            self.lock = open(folder.parent / f".{folder.name}.lock", "a")
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.lock.close()
                self.lock = None
                raise RunError(f"{folder}: another process is training this run (its lock is held)") from None
        self.state = {"phase": "head", "epoch": 0, "done": False, "history": [], "callbacks": {}}
        self.arrays = {}
        if (folder / "checkpoint.npz").exists():
            self._restore(folder / "checkpoint.npz")

    @staticmethod
    def _read_recipe(folder: Path) -> dict:
        return read_json(folder / "recipe.json") if (folder / "recipe.json").exists() else {}

    # -- the checkpoint --
    def _restore(self, path: Path) -> None:
        """Read a checkpoint (weights, optimizer variables, the callbacks' state, history, epoch) into memory
        and the model's weights; the optimizer's are set by start, the callbacks' at fit's start."""
        arrays = read_arrays(path)
        try:
            state = json.loads(arrays.pop("state").tobytes())
            assert isinstance(state, dict) and isinstance(state["epoch"], int) and isinstance(state["history"], list)
        except (KeyError, ValueError, AssertionError):
            raise RunError(f"{path}: not a checkpoint of this project (no state of its epoch and history)") from None
        _assign(self.model.weights, _numbered(arrays, "model/"), path)
        self.state, self.arrays = state, arrays

    def _restore_optimizer(self, trainee: keras.Model) -> None:
        saved = _numbered(self.arrays, "optimizer/")
        if saved:
            trainee.optimizer.build(trainee.trainable_variables)
            _assign(trainee.optimizer.variables, saved, self.dir / "checkpoint.npz")

    def save_epoch(self, row: dict, done: bool, callbacks_state: dict, arrays: dict) -> None:
        """Commit one finished epoch: the checkpoint (written atomically), then history.csv and TensorBoard's
        logs from it. At phase 1's end, its checkpoint is kept as phase1.npz too (phase 2's starting point)."""
        if not (self.dir / "config.json").exists():
            write_json(self.dir / "config.json", self.config.to_dict())
        recipe = {**self.recipe, "key": _digest(self.key)}
        if self._read_recipe(self.dir) != json.loads(json.dumps(recipe, default=str)):
            write_json(self.dir / "recipe.json", recipe)
        if self.phase == "head":
            self.phase1_epochs = row["epoch"]
        history = [r for r in self.state["history"] if r["epoch"] < row["epoch"]] + [row]
        self.state = {"phase": self.phase, "epoch": row["epoch"], "done": done, "history": history,
                      "callbacks": callbacks_state, "phase1_epochs": self.phase1_epochs}
        content = {"state": np.frombuffer(json.dumps(self.state).encode(), np.uint8)}
        content.update({f"model/{i}": np.asarray(w) for i, w in enumerate(self.model.weights)})
        content.update({f"optimizer/{i}": np.asarray(v) for i, v in enumerate(self.trainee.optimizer.variables)})
        content.update(arrays)
        self.arrays = {k: v for k, v in content.items() if k.startswith(("optimizer/", "mining"))}
        write_atomic(self.dir / "checkpoint.npz", save=lambda path: np.savez(open(path, "wb"), **content))
        if self.phase == "head" and done:
            write_atomic(self.dir / "phase1.npz", read_file(self.dir / "checkpoint.npz", MAX_CHECKPOINT_BYTES))
        keys = list(dict.fromkeys(k for r in history for k in r))
        write_atomic(self.dir / "history.csv", "\n".join([",".join(keys)] + [
            ",".join(str(r.get(k, "")) for k in keys) for r in history]) + "\n")
        _tensorboard(self.dir / "logs", row)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def _numbered(arrays: dict, prefix: str) -> list:
    """The arrays named prefix0, prefix1, ... in order."""
    count = sum(key.startswith(prefix) for key in arrays)
    return [arrays.get(f"{prefix}{i}") for i in range(count)]


def _assign(variables: list, arrays: list, path: Path) -> None:
    if len(variables) != len(arrays) or any(a is None or tuple(v.shape) != a.shape
                                            for v, a in zip(variables, arrays, strict=True)):
        raise RunError(f"{path}: a checkpoint of another model or optimizer ({len(arrays)} arrays for "
                       f"{len(variables)} variables, or other shapes): move it away to train afresh")
    for variable, array in zip(variables, arrays, strict=True):
        variable.assign(array.astype(variable.dtype))


def read_arrays(path: Path) -> dict:
    """The arrays of an .npz file, read without pickles and within the file's size (no zip bomb)."""
    raw = read_file(path, MAX_CHECKPOINT_BYTES)
    try:
        import io

        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            if sum(info.file_size for info in archive.infolist()) > len(raw):
                raise ValueError("its members hold more than the file (compressed)")
        with np.load(io.BytesIO(raw), allow_pickle=False) as content:
            return {name: content[name] for name in content.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise RunError(f"{path}: damaged or not an .npz file ({printable(exc)[:100]}); move it away to train "
                       "afresh") from None


def _tensorboard(folder: Path, row: dict) -> None:
    """One epoch's scalars in TensorBoard's logs (`tensorboard --logdir models`)."""
    import tensorflow as tf

    with tf.summary.create_file_writer(str(folder)).as_default():
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "epoch":
                tf.summary.scalar(key, value, step=row["epoch"])
