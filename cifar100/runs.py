"""The run folder: named by the settings and the recipe (what Keras serializes of the model and of each phase's
compile), locked while it trains, written only through one atomic writer and read through one bounded reader,
with one checkpoint that holds everything a resume needs.

    models/<preset>[-<changed settings>]-<hash>/
        config.json  recipe.json  checkpoint.npz  phase1.npz  history.csv  logs/  best.keras  results.json
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import weakref
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
    it over `path`: a kill leaves the old file or the new one, and a link at `path` is replaced, not followed.
    A failure (a full disk) is one line, and the old file stays."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.name)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as open() would create it (mkstemp makes it private)
        with os.fdopen(fd, "wb") as handle:
            if content is not None:
                handle.write(content.encode() if isinstance(content, str) else content)
        if save is not None:
            save(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise RunError(f"{path}: cannot be written ({exc.strerror or exc}); what was saved before is kept") from None
    finally:
        if temporary and os.path.exists(temporary):
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
        if isinstance(node, dict) and isinstance(node.get("name"), str):
            names.setdefault(node["name"], f"#{len(names)}")
        for value in node.values() if isinstance(node, dict) else node if isinstance(node, (list, tuple)) else ():
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
    parts = []
    for key in ("learning_rate", "weight_decay", "momentum", "nesterov", "clipnorm", "label_smoothing", "use_ema"):
        value = inner.get(key)
        if isinstance(value, dict):  # a schedule
            value = f"{value.get('class_name')}({', '.join(f'{k}={v}' for k, v in value['config'].items())})"
        parts += [f"{key}={value}"] if value not in (None, False, 0, 0.0) else []
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


def _in_words(layer) -> str:
    """A layer as a reader names it, without Keras' generated names: `Dense(64, relu)`, `Sequential[...]`; a
    backbone by its application's name."""
    config = layer.get_config() if not isinstance(layer, keras.Model) or isinstance(layer, keras.Sequential) else {}
    if isinstance(layer, keras.Sequential):
        return f"Sequential[{', '.join(_in_words(inner) for inner in layer.layers)}]"
    if isinstance(layer, keras.Model):
        return f"{type(layer).__name__}({layer.name}, {len(layer.layers)} layers)"
    shown_keys = ("units", "activation", "rate", "height", "width", "scale", "offset", "filters", "kernel_size")
    return f"{type(layer).__name__}({', '.join(str(config[k]) for k in shown_keys if k in config)})"


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

_INITIAL_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # each model's weights as built
_LOCKS: dict[Path, object] = {}  # the run folders this process holds: a rerun cell takes its lock again


class Run:
    """One run of the notebook's recipe. `start(phase, trainee)` finds or names its folder and restores its
    checkpoint; `callbacks.for_run` commit every epoch. Only the chief of a multi-worker run writes `runs_dir`."""

    def __init__(self, config: Config, model: keras.Model, run_dir: str | Path | None = None, writes: bool = True):
        if not writes:  # a worker other than the chief: a folder of its own, left behind in the temporary folder
            config, run_dir = config.replace(runs_dir=tempfile.mkdtemp(prefix="cifar100-worker-")), None
        self.config, self.model, self.forced = config, model, Path(run_dir) if run_dir else None
        # the weights as built, before any fit: a phase started again without a checkpoint starts from them
        _INITIAL_WEIGHTS.setdefault(model, [keras.ops.convert_to_numpy(w) for w in model.weights])
        self.dir = self.phase1_dir = None
        self.recipe: dict = {"model": [], "head": None, "finetune": None}
        self.state: dict = {"phase": "head", "epoch": 0, "done": False, "history": [], "callbacks": {}}
        self.arrays: dict = {}
        self.trainee, self.phase, self.key, self.head_key, self.writer = None, "head", {}, {}, None
        self.phase1_epochs = 0

    # -- naming and resuming --
    def start(self, phase: str, trainee: keras.Model) -> tuple[int, int]:
        """Name the run by its settings and recipe, take its folder and restore its last finished epoch; phase 2
        of another recipe than its folder holds goes to a folder of its own, from phase 1's end. Returns fit's
        (initial_epoch, epochs): equal when the phase is done."""
        if phase not in ("head", "finetune"):
            raise ValueError(f"phase must be 'head' or 'finetune', got {phase!r}")
        model_weights = {id(w) for w in self.model.weights}
        if not all(id(w) in model_weights for w in trainee.trainable_weights):
            raise RunError(f"{trainee.name!r} trains weights that are not the run's model's (was the model cell run "
                           "again?): run the model cell, then each phase's cell, again")
        if phase == "finetune" and self.phase1_dir is None:
            raise RunError("phase 2 starts where phase 1 ended: run phase 1's cell (run.start('head', ...)) first")
        self.phase, self.trainee, recipe = phase, trainee, phase_recipe(trainee)
        if phase == "head":
            self.recipe = {"model": [_in_words(layer) for layer in self.model.layers[1:]], "head": recipe,
                           "finetune": None}
            self.key = self.head_key = {"settings": self.config.identity(), "head": recipe["keras"],
                                        "model": _canonical(self.model.get_config())}
            self._use(self.forced or Path(self.config.runs_dir) / folder_name(self.config, _digest(self.key)))
            self.phase1_dir = self.dir
        else:
            self.recipe["finetune"] = recipe
            held = self._read_recipe(self.phase1_dir).get("finetune")
            if held is None or held == json.loads(json.dumps(recipe, default=str)):
                self.key = self.head_key
                self._use(self.phase1_dir)
            elif self.forced:
                raise RunError(f"{self.forced}: holds phase 2 of another recipe; leave --run-dir out to give this "
                               "one a folder of its own")
            else:
                self.key = {**self.head_key, "finetune": recipe["keras"]}
                self._use(Path(self.config.runs_dir) / folder_name(self.config, _digest(self.key)))
                if not (self.dir / "checkpoint.npz").exists():
                    self._carry_phase1()
            if self.state["phase"] == "head" and not self.state["done"] and self.config.head_epochs:
                raise RunError(f"{self.dir}: phase 1 stopped after epoch {self.state['epoch']} of "
                               f"{self.config.head_epochs}: run phase 1's cell again to finish it first")
        self.phase1_epochs = self.state.get("phase1_epochs", 0)
        if phase == "head":
            last = self.config.head_epochs
            done = self.state["phase"] == "finetune" or self.state["done"]
            first = min(self.state["epoch"], last)
        else:
            last = self.phase1_epochs + self.config.finetune_epochs
            done = self.state["phase"] == "finetune" and self.state["done"]
            first = self.state["epoch"] if self.state["phase"] == "finetune" else self.phase1_epochs
        if self.state["phase"] == phase and not done:
            self._restore_optimizer(trainee)
        return (last, last) if done else (first, last)

    def _carry_phase1(self) -> None:
        """Phase 1's end from its folder (or the model as built, with no phase 1): only phase 2 trains here."""
        source = self.phase1_dir / "phase1.npz"
        if self.config.head_epochs and not source.exists():
            raise RunError(f"{source}: missing, so phase 1's end cannot start phase 2 of this recipe; run phase 1's "
                           "cell again (or move its folder away to train it afresh)")
        if source.exists():
            self._restore(source)
        self.state["callbacks"].pop("best", None)  # best.keras: the best epoch of this phase 2
        self.carried = source

    def _use(self, folder: Path) -> None:
        """Take `folder` for this run: locked, and its last finished epoch (or the model as built) restored."""
        if folder.exists() and not folder.is_dir():
            raise RunError(f"{folder}: not a folder")
        if self._read_recipe(folder).get("key") not in (None, _digest(self.key)):
            raise RunError(f"{folder}: holds a run of other settings or another recipe; choose another --run-dir, "
                           "or leave it out to name the folder by the settings and the recipe")
        lock_path = folder.parent / f".{folder.name}.lock"
        if lock_path not in _LOCKS:
            folder.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise RunError(f"{folder}: another process is training this run (its lock is held)") from None
            _LOCKS[lock_path] = handle
        self.state = {"phase": "head", "epoch": 0, "done": False, "history": [], "callbacks": {}}
        self.arrays, self.carried = {}, None
        if (folder / "checkpoint.npz").exists():
            self._restore(folder / "checkpoint.npz")
        else:
            _assign(self.model.weights, _INITIAL_WEIGHTS[self.model], folder)
        self.dir = folder
        for leftover in folder.glob(".tmp-*") if folder.is_dir() else []:  # of a write that a kill cut short
            leftover.unlink()
        if self.state["history"] and (folder / "history.csv").exists() and len(read_file(
                folder / "history.csv").splitlines()) != len(self.state["history"]) + 1:
            self._write_history()  # a kill came between the checkpoint and history.csv

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
            _check_state(state)
        except (KeyError, ValueError, TypeError, AttributeError, RecursionError):
            raise RunError(f"{path}: not a checkpoint of this project (its state of epoch, phase, history and "
                           "callbacks is missing or damaged); move it away to train afresh") from None
        _assign(self.model.weights, _numbered(arrays, "model/"), path)
        self.state, self.arrays = state, arrays

    def _restore_optimizer(self, trainee: keras.Model) -> None:
        saved = _numbered(self.arrays, "optimizer/")
        if saved:
            trainee.optimizer.build(trainee.trainable_variables)
            _assign(trainee.optimizer.variables, saved, self.dir / "checkpoint.npz")

    def save_epoch(self, row: dict, done: bool, callbacks_state: dict, arrays: dict) -> None:
        """Commit one finished epoch: the checkpoint (written atomically; at phase 1's end first as phase1.npz,
        phase 2's starting point), then history.csv and TensorBoard's logs from it."""
        if not (self.dir / "config.json").exists():
            write_json(self.dir / "config.json", self.config.to_dict())
        recipe = {**self.recipe, "key": _digest(self.key)}
        if self._read_recipe(self.dir) != json.loads(json.dumps(recipe, default=str)):
            write_json(self.dir / "recipe.json", recipe)
        if self.carried and not (self.dir / "phase1.npz").exists() and self.carried.exists():
            write_atomic(self.dir / "phase1.npz", save=lambda path: shutil.copyfile(self.carried, path))
        if self.phase == "head":
            self.phase1_epochs = row["epoch"]
        history = [r for r in self.state["history"] if r["epoch"] < row["epoch"]] + [row]
        self.state = {"phase": self.phase, "epoch": row["epoch"], "done": done, "history": history,
                      "callbacks": callbacks_state, "phase1_epochs": self.phase1_epochs}
        content = {"state": np.frombuffer(json.dumps(self.state).encode(), np.uint8)}
        content.update({f"model/{i}": keras.ops.convert_to_numpy(w) for i, w in enumerate(self.model.weights)})
        content.update({f"optimizer/{i}": keras.ops.convert_to_numpy(v)
                        for i, v in enumerate(self.trainee.optimizer.variables)})
        content.update({name: np.array(value) for name, value in arrays.items()})
        self.arrays = {k: v for k, v in content.items() if k.startswith(("optimizer/", "mining"))}

        def save(path):
            with open(path, "wb") as handle:
                np.savez(handle, **content)

        for name in (("phase1.npz",) if self.phase == "head" and done else ()) + ("checkpoint.npz",):
            write_atomic(self.dir / name, save=save)
        self._write_history()
        self._tensorboard(row)

    def _write_history(self) -> None:
        history = self.state["history"]
        keys = list(dict.fromkeys(k for r in history for k in r))
        write_atomic(self.dir / "history.csv", "\n".join([",".join(keys)] + [
            ",".join(str(r.get(k, "")) for k in keys) for r in history]) + "\n")

    def _tensorboard(self, row: dict) -> None:
        """One epoch's scalars in TensorBoard's logs (`tensorboard --logdir models`)."""
        import tensorflow as tf

        if self.writer is None or self.writer_dir != self.dir:
            self.writer, self.writer_dir = tf.summary.create_file_writer(str(self.dir / "logs")), self.dir
        with self.writer.as_default():
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    tf.summary.scalar(key, value, step=row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.dir is not None and (handle := _LOCKS.pop(self.dir.parent / f".{self.dir.name}.lock", None)):
            handle.close()


def _check_state(state) -> None:
    """A checkpoint's state as save_epoch writes it, or a ValueError."""
    ok = (isinstance(state, dict) and state.get("phase") in ("head", "finetune") and isinstance(state.get("done"), bool)
          and all(type(state.get(k, 0)) is int and state.get(k, 0) >= 0 for k in ("epoch", "phase1_epochs"))
          and isinstance(state.get("callbacks"), dict) and isinstance(state.get("history"), list)
          and all(isinstance(row, dict) and type(row.get("epoch")) is int for row in state["history"]))
    if not ok:
        raise ValueError("damaged state")


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
    """The numeric arrays of an .npz file, read without pickles, each within the size it stores (no zip or
    header bomb); anything else is one line naming the file."""
    raw = read_file(path, MAX_CHECKPOINT_BYTES)
    arrays = {}
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            members = archive.infolist()
            if sum(info.file_size for info in members) > len(raw):
                raise ValueError("its members hold more than the file (compressed)")
            for info in members:
                with archive.open(info) as member:
                    major, _ = np.lib.format.read_magic(member)
                    read_header = np.lib.format.read_array_header_1_0 if major == 1 else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(member)
                    if dtype.kind not in "biuf" or math.prod(shape) * dtype.itemsize > info.file_size:
                        raise ValueError(f"{info.filename} declares more than it holds, or is not numeric")
                with archive.open(info) as member:
                    arrays[info.filename.removesuffix(".npy")] = np.lib.format.read_array(member, allow_pickle=False)
    except Exception as exc:  # a damaged file can fail zipfile or numpy in any way
        raise RunError(f"{path}: damaged or not an .npz file ({type(exc).__name__}: {printable(exc)[:100]}); move "
                       "it away to train afresh") from None
    return arrays
