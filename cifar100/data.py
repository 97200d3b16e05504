"""The dataset layer: read the official pickled CIFAR batches safely, verify them, split, download.

The official "python version" files are pickles written by Python 2. A pickle can run any code it
names, so they are read with an unpickler that only builds what those files contain: dicts, lists,
strings, numbers and numpy arrays of plain numeric dtypes, each array checked before numpy builds it.
Anything else is refused, and so is a file that would crash, stall or exhaust the unpickler (see
`_check_opcodes`). Every failure is a DatasetError naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import reprlib
import shutil
import stat
import struct
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifar100.errors import DatasetError  # noqa: F401  (re-exported: cifar100.data.DatasetError)

IMAGE_SHAPE = (32, 32, 3)
ROW_BYTES = 32 * 32 * 3
# Written beside files that hold other data in the official format (synthetic, or another dataset):
# {"source": ..., "synthetic": true|false}. The loader then skips the official md5 check and says so.
DATASET_MARKER = "DATASET.json"

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
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        lines = [
            f"dataset: {self.kind} format at {self.path}"
            + ("  (SYNTHETIC data, not real CIFAR)" if self.synthetic else
               "" if self.official else "  (not verified as the official files: md5 not checked)"),
            f"source: {self.source}",
            f"train: {len(self.y_train)} images, test: {len(self.y_test)} images, {self.num_classes} classes",
        ]
        if self.coarse_names:
            lines.append(f"superclasses: {len(self.coarse_names)}")
        counts = np.bincount(self.y_train, minlength=self.num_classes)
        lines.append(f"train images per class: min {counts.min()}, max {counts.max()}")
        lines += [f"md5 {name}: {status}" for name, status in self.md5.items()]
        return "\n".join(lines)


# --- safe unpickling -------------------------------------------------------------------------------
# What a file may build: dicts, lists, tuples, strings, bytes, numbers, and numpy arrays of the plain numeric
# dtypes below, each checked before numpy sees it. Official files hold uint8 pixels and lists of ints.

DTYPE_CODES = ("u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8")
MAX_TUPLE_NESTING = 100  # hashing a tuple nested ~100,000 deep as a dict key overflows the C stack
MAX_ENTRIES = 10_000  # dict and set entries per file (official: 5); crafted hash collisions cost n**2


class _Refused(pickle.UnpicklingError):
    """The file asked for something that a CIFAR file never holds."""


def _stack_effect(op: pickletools.OpcodeInfo) -> tuple[bool, int, int]:
    """(pops to a mark, items popped below the mark or in all, items pushed) of a pickle opcode."""
    before = [item.name for item in op.stack_before]
    below = before.index("mark") if "mark" in before else len(before)
    return "mark" in before, below, len(op.stack_after)


_STACK_EFFECTS = {op.name: _stack_effect(op) for op in pickletools.opcodes}
_TUPLE_OPCODES = {"EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE", "FROZENSET"}
_KEYS_PER_ITEM = {"SETITEMS": 0.5, "DICT": 0.5, "ADDITEMS": 1, "FROZENSET": 1}
_GET_OPCODES = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}


def _check_opcodes(raw: bytes) -> None:
    """Read the pickle's opcodes without running them and refuse what would crash or stall the unpickler
    before it could be stopped: tuples nested deeper than MAX_TUPLE_NESTING, memo indices beyond the file's
    size (the memo is allocated up to the index), more than MAX_ENTRIES dict or set entries.

    The stack is followed as the unpickler follows it, each item as an upper bound of its tuple nesting (a
    hashed dict key nests only through tuples and frozensets)."""
    stack, marks, memo, entries = [], [], {}, 0
    for op, arg, pos in pickletools.genops(raw):
        name = op.name
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name == "POP" and marks and marks[-1] == len(stack):  # as the unpickler does: pops the mark
            marks.pop()
            continue
        to_mark, below, pushed = _STACK_EFFECTS[name]
        if name in _GET_OPCODES:
            nesting = memo.get(arg, 0)
        elif to_mark or below:
            start = marks.pop() if to_mark else len(stack)
            entries += 1 if name == "SETITEM" else int((len(stack) - start) * _KEYS_PER_ITEM.get(name, 0))
            if entries > MAX_ENTRIES:
                raise _Refused(f"more than {MAX_ENTRIES} dict or set entries")
            start = max(start - below, 0)
            nesting = max(stack[start:], default=0) + (name in _TUPLE_OPCODES)
            del stack[start:]
            if nesting > MAX_TUPLE_NESTING:
                raise _Refused(f"tuples or frozensets nested more than {MAX_TUPLE_NESTING} deep (byte {pos})")
        else:
            nesting = int(name == "EMPTY_TUPLE")
        stack += [nesting] * pushed
        if name in _PUT_OPCODES:
            index = len(memo) if arg is None else arg
            if index > pos:
                raise _Refused(f"memo index {index} at byte {pos}: larger than the file could need")
            memo[index] = stack[-1] if stack else 0


class _Global:
    """An allowed global as the file sees it: calls a builder that checks its arguments. The file cannot
    change it (BUILD on it is refused), and `numpy.ndarray` (build None) cannot be called at all."""

    __slots__ = ("name", "build")

    def __init__(self, name: str, build):
        self.name, self.build = name, build

    def __repr__(self) -> str:
        return self.name

    def __call__(self, *args):
        if self.build is None:
            raise _Refused(f"refused to call '{self.name}'")
        return self.build(*args)

    def __setstate__(self, state):
        raise _Refused(f"refused to change '{self.name}'")


class _PendingDtype:
    """A dtype the file names: one of DTYPE_CODES, with the byte order that numpy's BUILD state gives."""

    def __init__(self, code: str):
        self.code, self.byteorder = code, "="

    def __setstate__(self, state):
        # numpy pickles a plain numeric dtype's state as (3, byteorder, None, None, None, -1, -1, 0)
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3
                and _latin1(state[1]) in ("|", "<", ">") and state[2:] == (None, None, None, -1, -1, 0)):
            raise _Refused(f"refused the state {reprlib.repr(state)} of dtype '{self.code}': a plain numeric "
                           "dtype has (3, byteorder, None, None, None, -1, -1, 0)")
        self.byteorder = _latin1(state[1])

    def build(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder(self.byteorder)


class _PendingArray:
    """An array from numpy's `_reconstruct`; BUILD gives its shape, dtype and bytes, checked before use."""

    def __init__(self, unpickler: _SafeUnpickler):
        self.unpickler, self.array = unpickler, None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise pickle.UnpicklingError(f"unexpected array state {reprlib.repr(state)}")
        _, shape, dtype, fortran, raw = state
        self.array = self.unpickler.array(raw, dtype, shape, {False: "C", True: "F"}[fortran])


class _SafeUnpickler(pickle.Unpickler):
    """Builds only plain containers, strings, numbers and checked numpy arrays; refuses every other global.

    A file of N bytes may build at most 2N bytes of arrays and byte strings in all: an honest file holds its
    pixels once (Python 3 at protocol 2 writes them as text, which becomes bytes, then an array)."""

    def __init__(self, raw: bytes):
        super().__init__(io.BytesIO(raw), encoding="bytes")
        self.budget = 2 * len(raw)

    def find_class(self, module: str, name: str):
        builders = {
            ("numpy.core.multiarray", "_reconstruct"): self.reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): self.reconstruct,
            ("numpy.core.numeric", "_frombuffer"): self.array,
            ("numpy._core.numeric", "_frombuffer"): self.array,
            ("numpy", "dtype"): self.dtype,
            ("numpy", "ndarray"): None,
            ("_codecs", "encode"): self.latin1_bytes,
            ("__builtin__", "bytes"): self.empty_bytes,
        }
        if (module, name) not in builders:
            raise _Refused(f"refused to load '{module}.{name}': only numpy arrays, dicts, lists, strings and "
                           "numbers are allowed in a CIFAR file")
        return _Global(f"{module}.{name}", builders[(module, name)])

    def persistent_load(self, pid):
        raise _Refused("refused a persistent id: not allowed in a CIFAR file")

    def spend(self, size: int) -> None:
        self.budget -= size
        if self.budget < 0:
            raise _Refused("the file builds more data than twice its size (its bytes used again and again: "
                           "a memory bomb)")

    def reconstruct(self, cls, shape, typecode) -> _PendingArray:
        if not (isinstance(cls, _Global) and cls.name == "numpy.ndarray"):
            raise _Refused(f"refused numpy's _reconstruct of {reprlib.repr(cls)}: only ndarray is allowed")
        return _PendingArray(self)

    def dtype(self, code, align=False, copy=True) -> _PendingDtype:
        code = _latin1(code)
        if not isinstance(code, str) or code not in DTYPE_CODES:
            raise _Refused(f"refused dtype {reprlib.repr(code)}: only the plain numeric dtypes "
                           f"{', '.join(DTYPE_CODES)} are allowed")
        return _PendingDtype(code)

    def array(self, raw, dtype, shape, order) -> np.ndarray:
        """numpy's `_frombuffer(raw, dtype, shape, order)`, and the BUILD of a `_reconstruct`ed array."""
        if not isinstance(dtype, _PendingDtype):
            raise _Refused(f"refused an array of {reprlib.repr(dtype)}: only plain numeric dtypes are allowed")
        if not (isinstance(raw, (bytes, bytearray)) and isinstance(shape, tuple) and len(shape) <= 32
                and all(type(n) is int and n >= 0 for n in shape) and order in ("C", "F")):
            raise pickle.UnpicklingError(f"malformed array: shape {reprlib.repr(shape)}, order "
                                         f"{reprlib.repr(order)}, data {type(raw).__name__}")
        dtype = dtype.build()
        expected = math.prod(shape) * dtype.itemsize
        if len(raw) != expected:
            raise pickle.UnpicklingError(f"an array of shape {reprlib.repr(shape)} and dtype {dtype} needs "
                                         f"{expected} bytes, the file holds {len(raw)}")
        self.spend(len(raw))
        return np.frombuffer(raw, dtype).reshape(shape, order=order).copy()

    def empty_bytes(self) -> bytes:
        """`bytes()`: how Python 3 writes b"" at protocols 0 to 2."""
        return b""

    def latin1_bytes(self, text, encoding) -> bytes:
        """`_codecs.encode(text, "latin1")`: how Python 3 writes bytes at protocols 0 to 2."""
        if type(text) is not str or encoding != "latin1":
            raise _Refused(f"refused _codecs.encode of {type(text).__name__} with {reprlib.repr(encoding)}: "
                           "only text with 'latin1' is allowed")
        self.spend(len(text))
        return text.encode("latin1")


def _latin1(value):
    """Python 2 strings arrive as bytes (encoding="bytes"): their text; anything else as it is."""
    return value.decode("latin1") if isinstance(value, bytes) else value


def open_regular(path: str | Path):
    """Open a regular file for binary reading. A FIFO, device or folder in its place is refused at once
    (opening does not block); every failure is a DatasetError naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DatasetError(f"{path}: not a regular file (a folder, FIFO or device is in its place)")
    return open(fd, "rb")


def _unpickle(path: Path) -> dict:
    """Read one pickled batch with the safe unpickler: a dict, its text keys as str, its arrays built."""
    with open_regular(path) as handle:
        try:
            raw = handle.read()
        except (OSError, MemoryError) as exc:
            raise DatasetError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    try:
        _check_opcodes(raw)
        obj = _SafeUnpickler(raw).load()
    except _Refused as exc:
        raise DatasetError(f"{path}: unsafe file, nothing was run: {exc}") from None
    except Exception as exc:  # a hostile or broken file can make the unpickler fail in any way
        reason = " ".join(str(exc).split())[:200]
        raise DatasetError(f"{path}: truncated or corrupt file (expected a pickled dict of a CIFAR "
                           f"batch; reading failed with {type(exc).__name__}: {reason})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    if not all(isinstance(key, (str, bytes)) for key in obj):
        raise DatasetError(f"{path}: expected a dict with text keys, found keys {reprlib.repr(list(obj))}")
    return {_latin1(key): _built(path, value) for key, value in obj.items()}


def _built(path: Path, value):
    """The array that a `_PendingArray` stands for; any other value as it is."""
    if not isinstance(value, _PendingArray):
        return value
    if value.array is None:
        raise DatasetError(f"{path}: truncated or corrupt file: an array without its shape and data")
    return value.array


def _require_keys(path: Path, batch: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise DatasetError(f"{path}: wrong keys: expected {list(keys)}, missing {missing}, "
                           f"found {reprlib.repr(sorted(batch))}")


# --- reading and checking ---------------------------------------------------------------------------

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
                           f"found {bad[:5]}")
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
    return f"{type(value).__name__} {reprlib.repr(value)[:60]}"


def _names(path: Path, meta: dict, key: str, expected: int) -> list[str]:
    _require_list_of(path, key, meta[key], (str, bytes), "strings")
    names = [_latin1(name) for name in meta[key]]
    if len(names) != expected:
        raise DatasetError(f"{path}: '{key}' must hold {expected} names, found {len(names)}")
    return names


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
    DATASET.json marker (written by `write_official` for synthetic or other data). With `download`, an
    absent folder is fetched first.
    """
    path = Path(path)
    if not holds_files(path):
        if not download:
            raise DatasetError(_missing_folder_message(path))
        fetch(path)
    kind = detect_kind(path)
    marker = _read_marker(path)
    md5 = _check_md5(path, kind, check_md5 and marker is None)
    info = {"md5": md5, "official": check_md5 and marker is None}
    if marker is not None:
        info = {"synthetic": bool(marker.get("synthetic", True)), "source": str(marker.get("source", "unknown")),
                "md5": {name: "skipped (not the official files)" for name in md5}}
    reader = _load_cifar100 if kind == "cifar100" else _load_cifar10
    return reader(path, **info)


def _read_marker(path: Path) -> dict | None:
    marker = path / DATASET_MARKER
    if not marker.is_file():
        return None
    if marker.stat().st_size > 1 << 16:
        raise DatasetError(f"{marker}: {marker.stat().st_size} bytes; expected a small JSON object with 'source' "
                           "and 'synthetic'")
    try:
        content = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DatasetError(f"{marker}: not valid JSON ({type(exc).__name__}: {exc}); expected an object with "
                           "'source' and 'synthetic'") from None
    if not isinstance(content, dict):
        raise DatasetError(f"{marker}: expected a JSON object with 'source' and 'synthetic'")
    if not isinstance(content.get("synthetic", True), bool):
        raise DatasetError(f"{marker}: 'synthetic' must be true or false, found {content['synthetic']!r}")
    return content


def _load_cifar100(path: Path, **info) -> Dataset:
    meta = _unpickle(path / "meta")
    _require_keys(path / "meta", meta, ("fine_label_names", "coarse_label_names"))
    fine_names = _names(path / "meta", meta, "fine_label_names", 100)
    coarse_names = _names(path / "meta", meta, "coarse_label_names", 20)
    parts, mapping = {}, np.full(100, -1, dtype=np.int64)
    for split_name in ("train", "test"):
        file = path / split_name
        batch = _unpickle(file)
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
    meta = _unpickle(path / "batches.meta")
    _require_keys(path / "batches.meta", meta, ("label_names",))
    names = _names(path / "batches.meta", meta, "label_names", 10)

    def read(file: Path) -> tuple[np.ndarray, np.ndarray]:
        batch = _unpickle(file)
        _require_keys(file, batch, ("data", "labels"))
        images = _images(file, batch)
        return images, _labels(file, batch, "labels", len(images), 10)

    train = [read(path / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = read(path / "test_batch")
    return Dataset("cifar10", path, np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   x_test, y_test, class_names=names, **info)


# --- validation split --------------------------------------------------------------------------------

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


# --- writing the official format ---------------------------------------------------------------------

class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 strings, as the official files do, so that readers using
    `encoding="bytes"` or `encoding="latin1"` see exactly what they see in the official files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj: bytes) -> None:
        size = len(obj)
        if size < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([size]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", size) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_string

    def save_global(self, obj, name=None):
        """Name numpy's array rebuilder as the official files do, so numpy 1.x can read the files too."""
        from numpy._core import multiarray

        if obj is multiarray._reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def write_batch(path: Path, batch: dict) -> None:
    """Pickle one batch like the official files: bytes keys and strings, protocol 2."""
    def encode(value):
        if isinstance(value, str):
            return value.encode("latin1")
        if isinstance(value, list):
            return [encode(v) for v in value]
        return value

    payload = {k.encode("latin1"): encode(v) for k, v in batch.items()}
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(payload)
    path.write_bytes(buffer.getvalue())


def write_official(path: str | Path, kind: str, x_train, y_train, x_test, y_test, synthetic: bool = True,
                   source: str = "synthetic (cifar100.data.write_synthetic)", class_names: list[str] | None = None
                   ) -> Path:
    """Write arrays as a dataset folder in the official file format (names, keys, dtypes, byte layout),
    with a DATASET.json marker saying where the data comes from. `class_names` replaces CIFAR-10's."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if kind == "cifar100":
        for name, x, y, label in (("train", x_train, y_train, "training"), ("test", x_test, y_test, "testing")):
            y = np.asarray(y, dtype=np.int64)
            write_batch(path / name, {
                "filenames": [f"synthetic_s_{i:06d}.png" for i in range(len(y))],
                "batch_label": f"{label} batch 1 of 1",
                "fine_labels": y.tolist(),
                "coarse_labels": CIFAR100_FINE_TO_COARSE[y].tolist(),
                "data": images_to_rows(x),
            })
        write_batch(path / "meta", {"fine_label_names": CIFAR100_FINE_NAMES,
                                    "coarse_label_names": CIFAR100_COARSE_NAMES})
    elif kind == "cifar10":
        chunks = np.array_split(np.arange(len(y_train)), 5)
        batches = [(f"data_batch_{i + 1}", x_train[c], np.asarray(y_train)[c], f"training batch {i + 1} of 5")
                   for i, c in enumerate(chunks)]
        for name, x, y, label in batches + [("test_batch", x_test, np.asarray(y_test), "testing batch 1 of 1")]:
            write_batch(path / name, {"batch_label": label, "labels": np.asarray(y, dtype=np.int64).tolist(),
                                      "data": images_to_rows(x),
                                      "filenames": [f"synthetic_s_{i:06d}.png" for i in range(len(y))]})
        write_batch(path / "batches.meta", {"num_cases_per_batch": int(np.ceil(len(y_train) / 5)),
                                            "label_names": list(class_names or CIFAR10_NAMES),
                                            "num_vis": ROW_BYTES})
    else:
        raise ValueError(f"kind must be 'cifar100' or 'cifar10', got {kind!r}")
    marker = {"source": source, "synthetic": synthetic, "kind": kind}
    (path / DATASET_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return path


def synthetic_images(labels: np.ndarray, num_classes: int, seed: int, chunk: int = 4096) -> np.ndarray:
    """Images whose class is learnable but not trivially: a smooth colour pattern made mostly of the
    class's group pattern (its CIFAR-100 superclass, so related classes look alike) plus a fainter pattern
    of its own, under heavy per-image noise, random shifts and brightness changes. Made `chunk` images at
    a time, so that memory stays small for any count."""
    rng = np.random.default_rng(seed)
    pattern_rng = np.random.default_rng(12345)  # the class patterns are the same for every seed
    group_of = CIFAR100_FINE_TO_COARSE if num_classes == 100 else np.arange(num_classes) % max(1, num_classes // 5)
    group_patterns = pattern_rng.uniform(0, 255, size=(group_of.max() + 1, 4, 4, 3))
    own_patterns = pattern_rng.uniform(0, 255, size=(num_classes, 4, 4, 3))
    templates = (0.5 * group_patterns[group_of] + 0.5 * own_patterns).astype(np.float32)
    templates = templates.repeat(8, axis=1).repeat(8, axis=2)
    images = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
    for start in range(0, len(labels), chunk):
        part = labels[start:start + chunk]
        noise = rng.uniform(0, 255, size=(len(part), 32, 32, 3)).astype(np.float32)
        brightness = rng.uniform(0.75, 1.25, size=(len(part), 1, 1, 1)).astype(np.float32)
        mixed = brightness * (0.55 * templates[part] + 0.45 * noise)
        shifts = rng.integers(-3, 4, size=(len(part), 2))
        for i, (dy, dx) in enumerate(shifts):
            mixed[i] = np.roll(mixed[i], (dy, dx), axis=(0, 1))
        images[start:start + len(part)] = np.clip(mixed, 0, 255).astype(np.uint8)
    return images


def write_synthetic(path: str | Path, kind: str = "cifar100", n_train: int = 5000, n_test: int = 1000,
                    seed: int = 0) -> Path:
    """Write a synthetic dataset in the exact official format, with a learnable class signal.

    Labels are balanced (as in CIFAR) and the folder's DATASET.json marker says the data is synthetic, so
    that the loader and the notebook can say so plainly.
    """
    num_classes = {"cifar100": 100, "cifar10": 10}.get(kind)
    if num_classes is None:
        raise ValueError(f"kind must be 'cifar100' or 'cifar10', got {kind!r}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be positive, got {n_train} and {n_test}")
    rng = np.random.default_rng(seed)
    y_train = rng.permutation(np.arange(n_train) % num_classes)
    y_test = rng.permutation(np.arange(n_test) % num_classes)
    x_train = synthetic_images(y_train, num_classes, seed=seed + 1)
    x_test = synthetic_images(y_test, num_classes, seed=seed + 2)
    return write_official(path, kind, x_train, y_train, x_test, y_test)


# --- download ----------------------------------------------------------------------------------------

MAX_ARCHIVE_MEMBERS = 100  # the official archives hold 5 (CIFAR-100) and 9 (CIFAR-10)
MAX_EXTRACTED_BYTES = 1 << 30  # they extract to ~180 MB


def _extract(archive: Path, target: Path, url: str) -> None:
    """Extract a downloaded archive of plain files and folders, bounded in count and total size; links,
    devices and anything else are refused before a byte is written."""
    with tarfile.open(archive) as tar:
        members = []
        for member in tar:
            if len(members) == MAX_ARCHIVE_MEMBERS:
                raise DatasetError(f"{url}: the archive holds more than {MAX_ARCHIVE_MEMBERS} entries; nothing "
                                   "was extracted")
            if not (member.isfile() or member.isdir()):
                raise DatasetError(f"{url}: the archive holds '{member.name}', which is not a plain file or "
                                   "folder (a link or device); nothing was extracted")
            members.append(member)
        size = sum(member.size for member in members)
        if size > MAX_EXTRACTED_BYTES:
            raise DatasetError(f"{url}: the archive would extract to {size} bytes, more than the "
                               f"{MAX_EXTRACTED_BYTES} allowed; nothing was extracted")
        tar.extractall(target, members=members, filter="data")

def fetch(path: str | Path = "cifar-100-python", kind: str = "cifar100", url: str | None = None,
          timeout: float = 20.0) -> Path:
    """Download the official archive, check its md5 and extract it into `path`.

    Without a network it fails within `timeout` seconds (plus name lookup), saying where to put the files.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    default_url, expected_md5, folder = ARCHIVES[kind]
    url = url or default_url
    if holds_files(path):
        raise DatasetError(f"{path} already holds files: download into an empty or new folder (nothing was "
                           "changed)")
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DatasetError(f"{blocking}: a file, where a folder is needed to download into {path} (nothing was "
                           "downloaded)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
        archive = Path(tmp) / "archive.tar.gz"
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {kind}") as bar:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as exc:
            waited = time.monotonic() - started
            extract = f"tar xzf {Path(default_url).name} -C {path.parent}"
            if path.name != folder:
                extract += f" && mv {path.parent / folder} {path}"
            raise DatasetError(
                f"could not download {url} ({type(exc).__name__}: {getattr(exc, 'reason', exc)}, after "
                f"{waited:.1f} s). No network? Download the archive on a machine that has one and extract "
                f"it so that {path}/ holds the files "
                f"{list(CIFAR100_FILES if kind == 'cifar100' else CIFAR10_FILES)}: {extract}") from None
        found = md5sum(archive)
        if found != expected_md5:
            raise DatasetError(f"{url}: md5 mismatch of the downloaded archive: expected {expected_md5}, "
                               f"found {found}. Nothing was extracted; try again.")
        _extract(archive, Path(tmp), url)
        extracted = Path(tmp) / folder
        if not extracted.is_dir():
            raise DatasetError(f"{url}: the archive holds no '{folder}/' folder")
        path.mkdir(parents=True, exist_ok=True)
        for item in extracted.iterdir():
            shutil.move(str(item), str(path / item.name))
    return path
