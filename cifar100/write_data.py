"""Dataset folders in the official CIFAR file format: the official archive downloaded (`fetch`, md5-checked,
extracted with bounds), or written from arrays (`write_official`) or synthetic, with a learnable class signal
(`write_synthetic`), for tests, demos and benchmarks on other data."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from cifar100 import data
from cifar100.config import ConfigError, DatasetError
from cifar100.data import (
    CIFAR10_FILES,
    CIFAR10_NAMES,
    CIFAR100_COARSE_NAMES,
    CIFAR100_FILES,
    CIFAR100_FINE_NAMES,
    CIFAR100_FINE_TO_COARSE,
    DATASET_MARKER,
    ROW_BYTES,
    images_to_rows,
)

MAX_SYNTHETIC_IMAGES = 100_000  # per set; 100,000 images are 300 MB


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 strings, as the official files do. Uses private APIs: the pure-Python
    `pickle._Pickler` (the C one has no dispatch table to extend) and numpy's `_reconstruct`; reading never does."""

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
                   source: str = "synthetic (cifar100.write_data.write_synthetic)", class_names: list[str] | None = None
                   ) -> Path:
    """Write arrays as a dataset folder in the official file format (names, keys, dtypes, byte layout),
    with a DATASET.json marker saying where the data comes from. `class_names` replaces CIFAR-10's."""
    path = Path(path)
    existing = sorted(name for name in (*CIFAR100_FILES, *CIFAR10_FILES, DATASET_MARKER)
                      if (path / name).exists() or (path / name).is_symlink())
    if existing:
        raise DatasetError(f"{path} already holds a dataset ({', '.join(existing)}): nothing was written there. "
                           "Write to a new or empty folder (e.g. synthetic-data/cifar-100-python)")
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
    """Images with a learnable, not trivial class signal: mostly the superclass's colour pattern plus a fainter
    one of the class's own, under heavy noise, shifts and brightness changes; made `chunk` at a time."""
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
    """Write a synthetic dataset in the exact official format: balanced labels, a learnable class signal, and a
    DATASET.json marker saying it is synthetic."""
    num_classes = {"cifar100": 100, "cifar10": 10}.get(kind)
    if num_classes is None:
        raise ConfigError(f"kind must be 'cifar100' or 'cifar10', got {kind!r}")
    for name, count in (("training", n_train), ("test", n_test)):
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_SYNTHETIC_IMAGES:
            raise ConfigError(f"the number of {name} images must be 1 to {MAX_SYNTHETIC_IMAGES}, got {count}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ConfigError(f"the seed must be 0 to {2**32 - 1}, got {seed}")
    rng = np.random.default_rng(seed)
    y_train = rng.permutation(np.arange(n_train) % num_classes)
    y_test = rng.permutation(np.arange(n_test) % num_classes)
    x_train = synthetic_images(y_train, num_classes, seed=seed + 1)
    x_test = synthetic_images(y_test, num_classes, seed=seed + 2)
    return write_official(path, kind, x_train, y_train, x_test, y_test)


# --- downloading the official archives: md5-checked, extracted with bounds, into an empty folder ---------

MAX_ARCHIVE_MEMBERS = 100  # the official archives hold 5 (CIFAR-100) and 9 (CIFAR-10)
MAX_EXTRACTED_BYTES = 1 << 30  # they extract to ~180 MB


def _extract(archive: Path, target: Path, url: str) -> None:
    """Extract plain files and folders only, bounded in count and size; anything else is refused before writing."""
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
    """Download the official archive, check its md5 and extract it into `path` (empty or new). Without a network
    it fails within `timeout` seconds (plus name lookup), saying where to put the files."""
    from tqdm.auto import tqdm

    path = Path(path)
    default_url, expected_md5, folder = data.ARCHIVES[kind]
    url = url or default_url
    if data.holds_files(path):
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
        found = data.md5sum(archive)
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
