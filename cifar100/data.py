"""The official CIFAR files: read through `cifar100.safe_pickle`, verified, downloaded when asked, and split
(validation carved from the training set, never the test set; a stratified cap on training images).
Every failure is a DatasetError naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import reprlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifar100.config import Config, DatasetError, RunError, printable, shown  # noqa: F401  (DatasetError: re-exported)
from cifar100.safe_pickle import as_text, open_regular, unpickle

# --- the official files (cs.toronto.edu/~kriz/cifar.html) ---------------------------------------------

CIFAR100_FILES = ("train", "test", "meta")
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")

OFFICIAL_MD5 = {
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
}

ARCHIVES = {
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
    ),
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
    ),
}

CIFAR100_FINE_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
    "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
    "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray "
    "road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar "
    "sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle "
    "wardrobe whale willow_tree wolf woman worm"
).split()
CIFAR100_COARSE_NAMES = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
    "household_furniture insects large_carnivores large_man-made_outdoor_things "
    "large_natural_outdoor_scenes large_omnivores_and_herbivores medium_mammals "
    "non-insect_invertebrates people reptiles small_mammals trees vehicles_1 vehicles_2"
).split()
# The official fine -> coarse mapping (each superclass holds five classes).
CIFAR100_FINE_TO_COARSE = np.array(
    [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
     6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
     5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
     10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
     16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13],
    dtype=np.int64,
)
CIFAR10_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()


IMAGE_SHAPE = (32, 32, 3)
ROW_BYTES = 32 * 32 * 3
# Marks other data in the official format ({"source": ..., "synthetic": bool}): the loader skips the md5 check.
DATASET_MARKER = "DATASET.json"

NAMES = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10"}


def display_name(kind: str) -> str:
    """A dataset kind as people write it: cifar10 -> CIFAR-10 (any other value, from a file: printable)."""
    return NAMES.get(str(kind), printable(str(kind))[:40])


# The note beside every number on synthetic data (one wording everywhere).
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
    """Refuse names that are empty, longer than MAX_NAME_LENGTH, not printable (terminal escapes) or repeated."""
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
        found = shown(sorted(present), 200) if present else "an empty folder"
        raise DatasetError(f"{path}: no CIFAR files found: expected {list(CIFAR100_FILES)} (CIFAR-100) or "
                           f"{list(CIFAR10_FILES)} (CIFAR-10), found {found}")
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
    """True for a folder holding a non-hidden file (the repo keeps an empty cifar-100-python/ with a .gitkeep)."""
    return path.is_dir() and any(not item.name.startswith(".") for item in path.iterdir())


def _missing_folder_message(path: Path) -> str:
    return (f"{path}: dataset folder not found (or empty). Get CIFAR-100 with "
            f"`python -m cifar100 data download {path}`, "
            f"or by hand: download {ARCHIVES['cifar100'][0]} and extract it so that {path}/train, "
            f"{path}/test and {path}/meta exist. For a quick try without the real data: "
            f"`python -m cifar100 data synthetic {path}`.")


def load(path: str | Path = "cifar-100-python", check_md5: bool = True, download: bool = False) -> Dataset:
    """Load a CIFAR-100 or CIFAR-10 folder (kind chosen by its files), fetching it first with `download`.
    md5 sums are checked unless `check_md5` is False or the folder holds a DATASET.json marker."""
    path = Path(path)
    if not holds_files(path):
        if not download:
            raise DatasetError(_missing_folder_message(path))
        from cifar100.write_data import fetch

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


# --- the split: validation carved from the training set, stratified; the cap on training images --------

def split(labels: np.ndarray, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (train_indices, val_indices) into the *training* set. The test set is never used."""
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    indices = np.arange(len(labels))
    try:
        train_idx, val_idx = train_test_split(indices, test_size=val_fraction, random_state=seed,
                                              stratify=labels, shuffle=True)
    except ValueError as exc:
        raise DatasetError(f"cannot carve a stratified validation split of {val_fraction:.0%} from "
                         f"{len(labels)} training images: {exc}") from None
    return np.sort(train_idx), np.sort(val_idx)


def stratified_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `size` examples with the classes as balanced as the labels allow (seeded)."""
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = order[labels[order] == cls]
        rank_in_class[members] = np.arange(len(members))
    chosen = order[np.argsort(rank_in_class[order], kind="stable")[:size]]
    return np.sort(chosen)


@dataclass
class Splits:
    """The run's data: training and validation come from the training set; test is touched at the end."""

    dataset: Dataset
    train_indices: np.ndarray
    val_indices: np.ndarray
    config_key: tuple = ()  # the settings the splits were made for (splits_key)

    # the images and labels of each split (both splits index the training set)
    x_train = property(lambda self: self.dataset.x_train[self.train_indices])
    y_train = property(lambda self: self.dataset.y_train[self.train_indices])
    x_val = property(lambda self: self.dataset.x_train[self.val_indices])
    y_val = property(lambda self: self.dataset.y_train[self.val_indices])


def prepare_data(config: Config, dataset: Dataset | None = None) -> Splits:
    """Load the dataset (unless given), carve the stratified validation split, and apply the cap on training
    images. The cap leaves validation whole: the callbacks need a steady signal more than it saves time."""
    dataset = dataset if dataset is not None else load(config.data_dir)
    train_idx, val_idx = split(dataset.y_train, config.val_fraction, config.seed)
    cap = config.max_train_images
    if cap is not None and cap < len(train_idx):
        train_idx = train_idx[stratified_subset(dataset.y_train[train_idx], cap, config.seed)]
    return Splits(dataset, train_idx, val_idx, splits_key(config))


def splits_key(config: Config) -> tuple:
    """The settings that decide the splits: splits made for other settings are not reused."""
    return (os.path.normpath(config.data_dir), config.val_fraction, config.max_train_images, config.seed)


MAX_CLASSES = 10_000


def read_classes(run_dir: Path) -> dict:
    """classes.json of a run folder, checked: class names, and superclass names and indices (or None for both)."""
    from cifar100.run_folder import read_json

    path = Path(run_dir) / "classes.json"
    content = read_json(path, "classes.json")
    names, coarse, mapping = (content.get(k) for k in ("class_names", "coarse_names", "fine_to_coarse"))
    coarse = coarse or None  # CIFAR-10: no superclasses ([] or null)
    damaged = f"{path}: damaged classes.json"
    if not isinstance(names, list) or not 2 <= len(names) <= MAX_CLASSES:
        raise RunError(f"{damaged}: class_names must be a list of 2 to {MAX_CLASSES} names")
    try:
        check_class_names(path, "class_names", names)
        if coarse is not None:
            if not isinstance(coarse, list) or not 1 <= len(coarse) <= MAX_CLASSES:
                raise DatasetError(f"{path}: coarse_names must be a list of 1 to {MAX_CLASSES} names")
            check_class_names(path, "coarse_names", coarse)
    except DatasetError as exc:
        raise RunError(f"{damaged}: {str(exc).removeprefix(f'{path}: ')}") from None
    if (coarse is None) != (mapping is None) or mapping is not None and not (
            isinstance(mapping, list) and len(mapping) == len(names)
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(coarse) for v in mapping)):
        raise RunError(f"{damaged}: fine_to_coarse must give each of the {len(names)} classes the index of one of "
                       "the coarse_names (or both be null)")
    return {"kind": printable(str(content.get("kind", "?"))[:40]), "synthetic": content.get("synthetic") is not False,
            "class_names": names, "coarse_names": coarse, "fine_to_coarse": mapping}
