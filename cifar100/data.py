"""The dataset layer: read the official CIFAR batches (through `cifar100.safe_pickle`) and verify them.

Writing datasets in the official format is `cifar100.write_data`; downloading is `cifar100.download`; the
validation split and the cap on training images are `cifar100.datasplit`.
Every failure is a DatasetError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import reprlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifar100.errors import DatasetError, printable, shown  # noqa: F401  (re-exported: cifar100.data.DatasetError)
from cifar100.formats import (  # noqa: F401  (re-exported: data.OFFICIAL_MD5 and the others)
    ARCHIVES,
    CIFAR10_FILES,
    CIFAR10_NAMES,
    CIFAR100_COARSE_NAMES,
    CIFAR100_FILES,
    CIFAR100_FINE_NAMES,
    CIFAR100_FINE_TO_COARSE,
    OFFICIAL_MD5,
)
from cifar100.safe_pickle import as_text, open_regular, unpickle

IMAGE_SHAPE = (32, 32, 3)
ROW_BYTES = 32 * 32 * 3
# Written beside files that hold other data in the official format (synthetic, or another dataset):
# {"source": ..., "synthetic": true|false}. The loader then skips the official md5 check and says so.
DATASET_MARKER = "DATASET.json"

NAMES = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10"}


def display_name(kind: str) -> str:
    """A dataset kind as people write it: cifar10 -> CIFAR-10."""
    return NAMES.get(kind, printable(str(kind))[:40])


# What every number or figure on such data says beside it (data.caveat); one wording everywhere.
SYNTHETIC_NOTE = " (SYNTHETIC data, not CIFAR-100)"


def caveat(synthetic: bool, official: bool | None = True, kind: str = "cifar100") -> str:
    """The note for numbers on these data, naming them: synthetic, not the verified official files, or nothing."""
    name = display_name(kind)
    if synthetic:
        return f" (SYNTHETIC data, not {name})"
    if official is False:
        return f" ({name}-format data, not verified as the official {name} files: md5 not checked)"
    return ""


@dataclass
class Dataset:
    """A loaded CIFAR dataset: uint8 images (N, 32, 32, 3) and integer labels."""

    kind: str
    path: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    coarse_names: list[str] = field(default_factory=list)
    fine_to_coarse: np.ndarray | None = None
    synthetic: bool = False
    source: str = "official"
    md5: dict[str, str] = field(default_factory=dict)
    official: bool = False  # True only when every file matched its official md5 sum

    @property
    def name(self) -> str:
        """What the data are, in a few words: 'CIFAR-10', or 'SYNTHETIC data in the CIFAR-100 format'."""
        name = display_name(self.kind)
        return f"SYNTHETIC data in the {name} format" if self.synthetic else \
            name if self.official else f"{name}-format data ({self.source[:80]})"

    @property
    def caveat(self) -> str:
        return caveat(self.synthetic, self.official, self.kind)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        lines = [
            f"dataset: {display_name(self.kind)} format at {self.path}{self.caveat}",
            f"source: {self.source}",
            f"train: {len(self.y_train)} images, test: {len(self.y_test)} images, {self.num_classes} classes",
        ]
        if self.coarse_names:
            lines.append(f"superclasses: {len(self.coarse_names)}")
        counts = np.bincount(self.y_train, minlength=self.num_classes)
        lines.append(f"train images per class: min {counts.min()}, max {counts.max()}")
        lines += [f"md5 {name}: {status}" for name, status in self.md5.items()]
        return "\n".join(lines)


# --- reading and checking ---------------------------------------------------------------------------

def _require_keys(path: Path, batch: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise DatasetError(f"{path}: wrong keys: expected {list(keys)}, missing {missing}, "
                           f"found {reprlib.repr(sorted(batch))}")


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open_regular(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rows_to_images(rows: np.ndarray) -> np.ndarray:
    """Official rows (N, 3072: red plane, green plane, blue plane) -> images (N, 32, 32, 3)."""
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def images_to_rows(images: np.ndarray) -> np.ndarray:
    """Images (N, 32, 32, 3) -> official rows (N, 3072)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), ROW_BYTES)


def _images(path: Path, batch: dict) -> np.ndarray:
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        found = f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}".strip()
        raise DatasetError(f"{path}: wrong sizes: 'data' must be a uint8 array of shape (N, {ROW_BYTES}), "
                           f"found {found}")
    return rows_to_images(data)


def _labels(path: Path, batch: dict, key: str, count: int, num_classes: int) -> np.ndarray:
    labels = batch[key]
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.ndim == 1:
        labels = labels.tolist()
    _require_list_of(path, key, labels, (int,), "integers (class indices)")
    if len(labels) != count:
        raise DatasetError(f"{path}: image and label counts differ: {count} images in 'data', "
                           f"{len(labels)} labels in '{key}'")
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise DatasetError(f"{path}: labels out of range in '{key}': expected 0..{num_classes - 1}, "
                           f"found {shown(bad[:5])}")
    return np.array(labels, dtype=np.int64)


def _require_list_of(path: Path, key: str, values, types, what: str) -> None:
    """Refuse anything but a list (or tuple) whose items are exactly of `types` (no bool for int)."""
    if not isinstance(values, (list, tuple)):
        raise DatasetError(f"{path}: '{key}' must be a list of {what}, found {_found(values)}")
    wrong = next((i for i, value in enumerate(values) if type(value) not in types), None)
    if wrong is not None:
        raise DatasetError(f"{path}: '{key}' must be a list of {what}, found {_found(values[wrong])} "
                           f"at position {wrong}")


def _found(value) -> str:
    """A value from a file, briefly: its type and the start of its repr (bounded for any nesting)."""
    return f"{type(value).__name__} {shown(value)}"


MAX_NAME_LENGTH = 100  # the longest official class name has 13 characters


def _names(path: Path, meta: dict, key: str, expected: int) -> list[str]:
    _require_list_of(path, key, meta[key], (str, bytes), "strings")
    names = [as_text(name) for name in meta[key]]
    if len(names) != expected:
        raise DatasetError(f"{path}: '{key}' must hold {expected} names, found {len(names)}")
    check_class_names(path, key, names)
    return names


def check_class_names(path: Path, key: str, names: list[str]) -> None:
    """Class names as a run shows and saves them: non-empty text of at most MAX_NAME_LENGTH printable
    characters (no terminal escapes), each name once."""
    for index, name in enumerate(names):
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH or not name.isprintable():
            raise DatasetError(f"{path}: '{key}' name {index} must be 1 to {MAX_NAME_LENGTH} printable "
                               f"characters, found {_found(name)}")
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: '{key}' names the same class twice")


def detect_kind(path: Path) -> str:
    """'cifar100' or 'cifar10', by which official file names the folder holds."""
    present = {p.name for p in path.iterdir()}
    if present & set(CIFAR100_FILES):
        kind, expected = "cifar100", CIFAR100_FILES
    elif present & set(CIFAR10_FILES):
        kind, expected = "cifar10", CIFAR10_FILES
    else:
        raise DatasetError(f"{path}: no CIFAR files found: expected {list(CIFAR100_FILES)} (CIFAR-100) or "
                           f"{list(CIFAR10_FILES)} (CIFAR-10), found {sorted(present) or 'an empty folder'}")
    missing = [name for name in expected if name not in present]
    if missing:
        raise DatasetError(f"{path / missing[0]}: missing file: a {kind} folder needs {list(expected)}, "
                           f"missing {missing}")
    return kind


def _check_md5(path: Path, kind: str, check: bool) -> dict[str, str]:
    status = {}
    for name, expected in OFFICIAL_MD5[kind].items():
        if not check:
            status[name] = "skipped"
            continue
        found = md5sum(path / name)
        if found != expected:
            raise DatasetError(f"{path / name}: md5 mismatch: expected the official {expected}, found {found}. "
                               "The file is damaged or not the official one; download it again, or load "
                               "your own data with check_md5=False (command line: --no-md5)")
        status[name] = "ok (official)"
    return status


def holds_files(path: Path) -> bool:
    """True for a folder with at least one file that is not hidden (the repo keeps an empty
    cifar-100-python/ with a .gitkeep)."""
    return path.is_dir() and any(not item.name.startswith(".") for item in path.iterdir())


def _missing_folder_message(path: Path) -> str:
    return (f"{path}: dataset folder not found (or empty). Get CIFAR-100 with "
            f"`python -m cifar100 data download {path}`, "
            f"or by hand: download {ARCHIVES['cifar100'][0]} and extract it so that {path}/train, "
            f"{path}/test and {path}/meta exist. For a quick try without the real data: "
            f"`python -m cifar100 data synthetic {path}`.")


def load(path: str | Path = "cifar-100-python", check_md5: bool = True, download: bool = False) -> Dataset:
    """Load a CIFAR-100 or CIFAR-10 folder (kind chosen by the files it holds), verified.

    md5 sums are checked against the official ones unless `check_md5` is False or the folder holds a
    DATASET.json marker (written by `write_data.write_official` for synthetic or other data). With `download`, an
    absent folder is fetched first.
    """
    path = Path(path)
    if not holds_files(path):
        if not download:
            raise DatasetError(_missing_folder_message(path))
        from cifar100.download import fetch  # here: download imports this module

        fetch(path)
    kind = detect_kind(path)
    marker = _read_marker(path)
    md5 = _check_md5(path, kind, check_md5 and marker is None)
    info = {"md5": md5, "official": check_md5 and marker is None}
    if marker is not None:
        info = {"synthetic": bool(marker.get("synthetic", True)),
                "source": printable(str(marker.get("source", "unknown"))[:200]),
                "md5": {name: "skipped (not the official files)" for name in md5}}
    reader = _load_cifar100 if kind == "cifar100" else _load_cifar10
    dataset = reader(path, **info)
    for part, labels in (("training", dataset.y_train), ("test", dataset.y_test)):
        if len(labels) == 0:
            raise DatasetError(f"{path}: the {part} set holds no images: a run needs both sets")
    return dataset


def _read_marker(path: Path) -> dict | None:
    marker = path / DATASET_MARKER
    if not marker.is_file():
        return None
    if marker.stat().st_size > 1 << 16:
        raise DatasetError(f"{marker}: {marker.stat().st_size} bytes; expected a small JSON object with 'source' "
                           "and 'synthetic'")
    try:
        content = json.loads(marker.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # ValueError: also an int of 4,300+ digits
        raise DatasetError(f"{marker}: not valid JSON ({type(exc).__name__}: {exc}); expected an object with "
                           "'source' and 'synthetic'") from None
    if not isinstance(content, dict):
        raise DatasetError(f"{marker}: expected a JSON object with 'source' and 'synthetic'")
    if not isinstance(content.get("synthetic", True), bool):
        raise DatasetError(f"{marker}: 'synthetic' must be true or false, found {shown(content['synthetic'])}")
    return content


def _load_cifar100(path: Path, **info) -> Dataset:
    meta = unpickle(path / "meta")
    _require_keys(path / "meta", meta, ("fine_label_names", "coarse_label_names"))
    fine_names = _names(path / "meta", meta, "fine_label_names", 100)
    coarse_names = _names(path / "meta", meta, "coarse_label_names", 20)
    parts, mapping = {}, np.full(100, -1, dtype=np.int64)
    for split_name in ("train", "test"):
        file = path / split_name
        batch = unpickle(file)
        _require_keys(file, batch, ("data", "fine_labels", "coarse_labels"))
        images = _images(file, batch)
        fine = _labels(file, batch, "fine_labels", len(images), 100)
        coarse = _labels(file, batch, "coarse_labels", len(images), 20)
        _check_consistent_coarse(file, fine, coarse, mapping)
        parts[split_name] = (images, fine)
    return Dataset("cifar100", path, *parts["train"], *parts["test"], class_names=fine_names,
                   coarse_names=coarse_names, fine_to_coarse=mapping, **info)


def _check_consistent_coarse(file: Path, fine: np.ndarray, coarse: np.ndarray, mapping: np.ndarray) -> None:
    """Fill `mapping` (fine -> coarse) and refuse a file where one class has two superclasses."""
    pairs = np.unique(np.stack([fine, coarse], axis=1), axis=0)
    for f, c in pairs:
        if mapping[f] not in (-1, c) or np.sum(pairs[:, 0] == f) > 1:
            raise DatasetError(f"{file}: class {f} belongs to more than one superclass in 'coarse_labels'")
        mapping[f] = c


def _load_cifar10(path: Path, **info) -> Dataset:
    meta = unpickle(path / "batches.meta")
    _require_keys(path / "batches.meta", meta, ("label_names",))
    names = _names(path / "batches.meta", meta, "label_names", 10)

    def read(file: Path) -> tuple[np.ndarray, np.ndarray]:
        batch = unpickle(file)
        _require_keys(file, batch, ("data", "labels"))
        images = _images(file, batch)
        return images, _labels(file, batch, "labels", len(images), 10)

    train = [read(path / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = read(path / "test_batch")
    return Dataset("cifar10", path, np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   x_test, y_test, class_names=names, **info)
