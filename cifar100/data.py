"""The official CIFAR files: read through the safe unpickler and checked, downloaded, split (validation carved
from the training set), and written in the same format (synthetic data for tests and demos)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar100.config import Config, DatasetError, printable, shown
from cifar100.safe_pickle import MAX_FILE_BYTES, as_text, open_regular, unpickle

# --- the official datasets ----------------------------------------------------------------------------------

FILES = {"cifar100": ("train", "test", "meta"),
         "cifar10": tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")}
MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
       "meta": "7973b15100ade9c7d40fb424638fde48", "data_batch_1": "c99cafc152244af753f735de768cd75f",
       "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec", "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
       "data_batch_4": "634d18415352ddfa80567beed471001a", "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
       "test_batch": "40351d587109b95175f43aff81a1287e", "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
URL_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
MARKER = "DATASET.json"  # {"source": ..., "synthetic": bool} beside data in the official format that is not it
NAMES = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10"}


@dataclass
class Dataset:
    """uint8 images (N, 32, 32, 3), integer labels, class names, and what the data are."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list
    superclass: np.ndarray | None  # CIFAR-100: each class's superclass index
    superclass_names: list | None
    name: str  # "CIFAR-100", or e.g. "SYNTHETIC data in the CIFAR-100 format", said once where it is shown

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def synthetic(self) -> bool:
        return self.name.startswith("SYNTHETIC")


def missing_message(path: Path) -> str:
    return (f"{path}: no dataset here. Download it with `python -m cifar100 data download {path}` (on a machine "
            f"with a network), or by hand: fetch {URL}, unpack it (`tar xzf cifar-100-python.tar.gz`) and move the "
            f"folder cifar-100-python/ it holds to {path}, so that {path}/train, {path}/test and {path}/meta exist.")


def download(path: Path) -> Path:
    """The official CIFAR-100 archive, md5-checked and extracted (keras.utils.get_file), into `path`."""
    from cifar100.keras_fixes import quiet_start_up_lines

    with quiet_start_up_lines():
        import keras
    path = Path(path)
    path.resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.resolve().parent, prefix=".download-") as cache:
        try:
            folder = keras.utils.get_file(origin=URL, extract=True, md5_hash=URL_MD5, cache_dir=cache)
        except Exception as exc:  # get_file raises a bare Exception on a network failure
            raise DatasetError(f"could not download {URL} ({printable(exc)[:160]}). {missing_message(path)}"
                               ) from None
        extracted = next(Path(folder).rglob("meta")).parent
        path.mkdir(parents=True, exist_ok=True)
        for name in FILES["cifar100"]:
            os.replace(extracted / name, path / name)
    return path


def load(path: str | Path, download_if_missing: bool = False) -> Dataset:
    """A CIFAR-100 (train, test, meta) or CIFAR-10 (data_batch_1..5, test_batch, batches.meta) folder, checked:
    the official md5 sums unless a DATASET.json says the data are other, shapes, label ranges, class names."""
    path = Path(path)
    present = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if not present - {".gitkeep"}:
        if not download_if_missing:
            raise DatasetError(missing_message(path))
        download(path)
        present = set(FILES["cifar100"])
    kind = "cifar100" if "meta" in present or "train" in present else "cifar10"
    missing = [name for name in FILES[kind] if name not in present]
    if missing:
        raise DatasetError(f"{path}: missing {missing} of a {NAMES[kind]} folder ({list(FILES[kind])}); found "
                           f"{shown(sorted(present)[:8], 200)}")
    name = NAMES[kind]
    if MARKER in present:
        with open_regular(path / MARKER, 1 << 16) as handle:
            try:
                marker = json.loads(handle.read())
                synthetic, source = marker.get("synthetic", True), printable(marker.get("source", "?"))[:80]
            except (ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested thousands deep
                raise DatasetError(f"{path / MARKER}: expected a JSON object with 'source' and 'synthetic'") from None
        name = f"SYNTHETIC data in the {name} format" if synthetic is not False else f"{name}-format data ({source})"
    else:
        for file in FILES[kind]:
            with open_regular(path / file, MAX_FILE_BYTES) as handle:
                found = hashlib.file_digest(handle, "md5").hexdigest()
            if found != MD5[file]:
                raise DatasetError(f"{path / file}: md5 {found}, not the official {MD5[file]}: damaged or not the "
                                   f"official file (download it again; for data of your own, add a {MARKER})")
    if kind == "cifar100":
        meta = _batch(path / "meta", ("fine_label_names", "coarse_label_names"))
        classes, groups = _names(path / "meta", meta, "fine_label_names"), _names(path / "meta", meta,
                                                                                    "coarse_label_names")
        (x_train, y_train, c_train), (x_test, y_test, c_test) = (_images(path / f, len(classes), "fine_labels",
                                                                         len(groups)) for f in ("train", "test"))
        superclass = np.full(len(classes), -1)
        superclass[np.concatenate([y_train, y_test])] = np.concatenate([c_train, c_test])
        if not np.array_equal(superclass[np.concatenate([y_train, y_test])], np.concatenate([c_train, c_test])):
            raise DatasetError(f"{path}: a class belongs to two superclasses in 'coarse_labels'")
    else:
        classes = _names(path / "batches.meta", _batch(path / "batches.meta", ("label_names",)), "label_names")
        parts = [_images(path / f, len(classes), "labels") for f in FILES["cifar10"][:6]]
        x_train, y_train = (np.concatenate([part[i] for part in parts[:5]]) for i in (0, 1))
        (x_test, y_test, _), superclass, groups = parts[5], None, None
    if not len(y_train) or not len(y_test):
        raise DatasetError(f"{path}: the training or the test set holds no images")
    return Dataset(x_train, y_train, x_test, y_test, classes, superclass, groups, name)


def _batch(path: Path, keys: tuple) -> dict:
    batch = unpickle(path)
    missing = [key for key in keys if key not in batch]
    if missing:
        found = sorted(k if isinstance(k, str) else shown(k) for k in batch)  # str() of a key could be huge
        raise DatasetError(f"{path}: missing the keys {missing}; found {shown(found, 120)}")
    return batch


def _names(path: Path, meta: dict, key: str) -> list[str]:
    values = meta[key]  # sizes checked before decoding: a file may list one huge name a million times
    fits = isinstance(values, list) and len(values) <= 10_000 and all(
        isinstance(n, (bytes, str)) and len(n) <= 100 for n in values)
    names = [as_text(name) for name in values] if fits else None
    if not names or not all(isinstance(n, str) and 0 < len(n) <= 100 and n.isprintable() for n in names) \
            or len(set(names)) != len(names) or len(names) > 10_000:
        raise DatasetError(f"{path}: '{key}' must be a list of distinct names of 1 to 100 printable characters, "
                           f"found {shown(meta[key])}")
    return names


def _images(path: Path, num_classes: int, label_key: str, num_groups: int = 0):
    """(images (N, 32, 32, 3), labels, superclass labels or None) of one batch file."""
    keys = ("data", label_key) + (("coarse_labels",) if num_groups else ())
    batch = _batch(path, keys)
    rows = batch["data"]
    if not (isinstance(rows, np.ndarray) and rows.dtype == np.uint8 and rows.ndim == 2 and rows.shape[1] == 3072):
        raise DatasetError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found "
                           f"{type(rows).__name__} {getattr(rows, 'dtype', '')} {getattr(rows, 'shape', '')}")
    labels = [_labels(path, batch, key, len(rows), n)
              for key, n in zip(keys[1:], (num_classes, num_groups), strict=False)]
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels[0], labels[1] if num_groups else None


def _labels(path: Path, batch: dict, key: str, count: int, num_classes: int) -> np.ndarray:
    values = batch[key]
    if not (isinstance(values, list) and all(type(v) is int for v in values)
            or isinstance(values, np.ndarray) and values.dtype.kind in "iu" and values.ndim == 1):
        raise DatasetError(f"{path}: '{key}' must be a list of class indices, found {shown(values)}")
    try:
        labels = np.asarray(values, dtype=np.int64)
    except OverflowError:  # an integer of up to 256 bits passes the unpickler
        raise DatasetError(f"{path}: '{key}' must hold {count} labels from 0 to {num_classes - 1}, found an "
                           "integer beyond 64 bits") from None
    if len(labels) != count or len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise DatasetError(f"{path}: '{key}' must hold {count} labels from 0 to {num_classes - 1}, found "
                           f"{len(labels)} from {labels.min(initial=0)} to {labels.max(initial=0)}")
    return labels


# --- the split: validation carved from the training set, never the test set --------------------------------

def split(dataset: Dataset, config: Config) -> tuple[tuple, tuple]:
    """((x_train, y_train), (x_val, y_val)): a stratified validation split of the training set, then a
    stratified cap of `max_train_images` on what trains. The test set is not touched."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(dataset.y_train))
    try:
        train, val = train_test_split(indices, test_size=config.val_fraction, random_state=config.seed,
                                      stratify=dataset.y_train)
        if config.max_train_images and config.max_train_images < len(train):
            train, _ = train_test_split(train, train_size=config.max_train_images, random_state=config.seed,
                                        stratify=dataset.y_train[train])
    except ValueError as exc:
        raise DatasetError(f"cannot split {len(indices)} training images into stratified sets "
                           f"(val_fraction={config.val_fraction}, max_train_images={config.max_train_images}): "
                           f"{exc}") from None
    train, val = np.sort(train), np.sort(val)
    return (dataset.x_train[train], dataset.y_train[train]), (dataset.x_train[val], dataset.y_train[val])


# --- writing the official format: synthetic data for tests and the demo -----------------------------------

def write(path: str | Path, kind: str, x_train, y_train, x_test, y_test, class_names=None, superclass=None,
          source: str = "synthetic (cifar100.data.write_synthetic)", synthetic: bool = True) -> Path:
    """Arrays as a dataset folder in the official format (file names, keys, Python 2 pickles, byte layout),
    with a DATASET.json that says where the data come from."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()):
        raise DatasetError(f"{path}: not empty; nothing was written (choose a new folder)")
    path.mkdir(parents=True, exist_ok=True)

    def batch(x, y, label_key, **more):
        return {"data": np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), 3072),
                label_key: np.asarray(y).tolist(), "batch_label": "batch", **more}

    if kind == "cifar100":
        superclass = np.asarray(superclass if superclass is not None else np.arange(100) // 5)
        for file, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            _write_batch(path / file, batch(x, y, "fine_labels", coarse_labels=superclass[y].tolist()))
        names = class_names or [f"class_{i}" for i in range(100)]
        _write_batch(path / "meta", {"fine_label_names": names,
                                     "coarse_label_names": [f"group_{i}" for i in range(superclass.max() + 1)]})
    else:
        for i, part in enumerate(np.array_split(np.arange(len(y_train)), 5), 1):
            _write_batch(path / f"data_batch_{i}", batch(x_train[part], np.asarray(y_train)[part], "labels"))
        _write_batch(path / "test_batch", batch(x_test, y_test, "labels"))
        _write_batch(path / "batches.meta", {"label_names": class_names or [f"class_{i}" for i in range(10)]})
    (path / MARKER).write_text(json.dumps({"source": source, "synthetic": synthetic, "kind": kind}) + "\n")
    return path


def _write_batch(path: Path, batch: dict) -> None:
    """Pickled as the official files are: protocol 2, bytes keys and strings."""
    def encode(value):
        if isinstance(value, str):
            return value.encode("latin1")
        return [encode(v) for v in value] if isinstance(value, list) else value

    path.write_bytes(pickle.dumps({k.encode(): encode(v) for k, v in batch.items()}, protocol=2))


def write_synthetic(path: str | Path, kind: str = "cifar100", n_train: int = 5000, n_test: int = 1000,
                    seed: int = 0) -> Path:
    """SYNTHETIC data in the official format, with a learnable class signal: each image is its class's colour
    pattern (half shared with its superclass) under heavy noise, random shifts and brightness."""
    num_classes = 100 if kind == "cifar100" else 10
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(12345).uniform(0, 255, size=(2, num_classes, 4, 4, 3))
    groups = np.arange(num_classes) // 5
    templates = (0.5 * patterns[0][groups] + 0.5 * patterns[1]).repeat(8, axis=1).repeat(8, axis=2)

    def images(labels):
        noise = rng.uniform(0, 255, size=(len(labels), 32, 32, 3))
        x = rng.uniform(0.75, 1.25, size=(len(labels), 1, 1, 1)) * (0.55 * templates[labels] + 0.45 * noise)
        shifts = rng.integers(-3, 4, size=(len(labels), 2))
        return np.stack([np.roll(image, tuple(shift), axis=(0, 1)) for image, shift in zip(x, shifts, strict=True)]
                        ).clip(0, 255).astype(np.uint8)

    y_train, y_test = (rng.permutation(np.arange(n) % num_classes) for n in (n_train, n_test))
    return write(path, kind, images(y_train), y_train, images(y_test), y_test, superclass=groups)
