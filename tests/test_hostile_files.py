"""Hostile and broken dataset files: each is refused with one line naming the file, or read cleanly.

The corpus below is crafted with `pickle` itself (objects whose __reduce__ names real numpy callables with
chosen arguments) or assembled from raw opcodes, and each file goes through `python -m cifar100 data verify`
in a subprocess limited to 4 GB of address space and 30 s.
"""

import functools
import io
import os
import pickle
import resource
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from numpy._core import multiarray

from cifar100 import data, safe_pickle, write_data
from cifar100.data import DatasetError

from .conftest import ROOT

MEMORY_LIMIT = 4 * 10**9


class Reduce:
    """Pickles as `func(*args)`, then BUILD with `state` when given: any call a file can ask for."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


class Raw:
    """Opcodes that push one object, placed as they are in a pickled dict (see `pickled_dict`)."""

    def __init__(self, opcodes: bytes):
        self.opcodes = opcodes


def pushes(obj) -> bytes:
    """The opcodes that push `obj` (a pickle without its PROTO and STOP), bytes as Python 2 strings, as the
    official files hold them."""
    if isinstance(obj, Raw):
        return obj.opcodes
    buffer = io.BytesIO()
    write_data._Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()[2:-1]


def pickled_dict(**items) -> bytes:
    return b"\x80\x02}" + b"".join(pushes(key) + pushes(value) + b"s" for key, value in items.items()) + b"."


def dtype_of(code: str, state=None):
    return Reduce(np.dtype, (code, False, True), state)


def array_of(dtype, shape, raw: bytes):
    """An array pickled as numpy does (`_reconstruct`, then BUILD), with any dtype, shape and bytes."""
    return Reduce(multiarray._reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, raw))


def train_items(n=10):
    labels = list(range(n))
    return {"data": np.zeros((n, data.ROW_BYTES), np.uint8), "fine_labels": labels,
            "coarse_labels": data.CIFAR100_FINE_TO_COARSE[labels].tolist()}


def meta_items():
    return {"fine_label_names": data.CIFAR100_FINE_NAMES, "coarse_label_names": data.CIFAR100_COARSE_NAMES}


def train_with(**changes) -> bytes:
    return pickled_dict(**{**train_items(), **changes})


def meta_with(**changes) -> bytes:
    return pickled_dict(**{**meta_items(), **changes})


def nested_list(levels: int, width: int = 10):
    """A list of `width` references to one list of ... : width**levels items to whoever walks it."""
    value = [0] * width
    for _ in range(levels):
        value = [value] * width
    return value


def deep_list(depth: int) -> Raw:
    return Raw(b"]" * depth + b"a" * (depth - 1))  # EMPTY_LIST x depth, then APPEND each into the one below


M61 = 2**61 - 1  # ints k * M61 all hash alike: each dict insertion compares with all keys before it
ZERO_STRIDES = Reduce(np.ndarray, ((10**9, data.ROW_BYTES), "u1", b"x", 0, (0, 0)))
ZERO_STRIDE_LABELS = Reduce(np.ndarray, ((10**9,), "i8", b"\0" * 8, 0, (0,)))
SHARED_BYTES = b"\0" * 10**5
COARSE_OF_1 = int(data.CIFAR100_FINE_TO_COARSE[1])


@functools.cache
def corpus() -> dict[str, tuple[str, bytes]]:
    """name -> (the file replaced in a CIFAR-100 folder, its hostile content)."""
    return {
        # dtypes whose state numpy's C code would trust
        "object-flags-dtype": ("train", train_with(data=array_of(
            dtype_of("u8", (3, "<", None, None, None, -1, -1, 63)), (1, 1), b"\x41" * 8))),
        "object-dtype": ("train", train_with(data=array_of(dtype_of("O8"), (1,), b"\x41" * 8))),
        "struct-offset-dtype": ("train", train_with(data=array_of(dtype_of(
            "V8", (3, "|", None, ("a",), {"a": (np.dtype("u1"), 2**40)}, 8, 1, 0)), (1,), b"\0" * 8))),
        "subarray-of-objects": ("train", train_with(data=array_of(dtype_of(
            "V8", (3, "|", (np.dtype("O"), (1,)), None, None, 8, 8, 63)), (1,), b"\x41" * 8))),
        "unicode-500M-dtype": ("train", train_with(fine_labels=array_of(dtype_of("U500000000"), (2,), b""))),
        "bool-dtype": ("train", train_with(fine_labels=array_of(dtype_of("b1"), (10,), b"\1" * 10))),
        "dtype-build-on-global": ("meta", meta_with(x=Reduce(np.dtype, ("u1", False, True), {"a": 1}))),
        # memory and time bombs
        "zero-stride-array": ("train", train_with(data=ZERO_STRIDES, fine_labels=ZERO_STRIDE_LABELS,
                                                  coarse_labels=ZERO_STRIDE_LABELS)),
        "shape-1e9-images": ("train", train_with(data=array_of(np.dtype("u1"), (10**9, data.ROW_BYTES), b"x"))),
        "ndarray-1e9-images": ("train", train_with(data=Reduce(np.ndarray, ((10**9, data.ROW_BYTES), "u1")))),
        "reused-array-bytes": ("train", train_with(extra=[array_of(np.dtype("u1"), (10**5,), SHARED_BYTES)
                                                          for _ in range(50)])),
        "billion-laughs-labels": ("train", train_with(fine_labels=nested_list(9))),
        "billion-laughs-names": ("meta", meta_with(fine_label_names=nested_list(8, 100)[0])),
        "deep-list-names": ("meta", meta_with(fine_label_names=deep_list(200_000))),
        "deep-tuple-key": ("meta", b"\x80\x02}" + b")" + b"\x85" * 200_000 + b"K\x01s."),
        "huge-memo-index": ("meta", b"\x80\x02}K\x01r\xf0\xff\xff\xff."),
        "colliding-keys": ("meta", b"\x80\x02}(" + b"".join(pushes(k * M61) + b"N" for k in range(1, 50_001))
                           + b"u."),
        # other globals and broken files
        "runs-a-command": ("train", train_with(data=Reduce(os.system, ("true",)))),
        "ndarray-called": ("train", train_with(data=Reduce(np.ndarray, ((10, data.ROW_BYTES), "u1")))),
        "array-without-state": ("train", train_with(data=Reduce(multiarray._reconstruct, (np.ndarray, (0,), b"b")))),
        "codecs-other-encoding": ("meta", meta_with(x=Raw(b"c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00"
                                                          b"utf_7\x86R"))),
        "names-not-strings": ("meta", meta_with(fine_label_names=list(range(100)))),
        "labels-floats": ("train", train_with(fine_labels=[v + 0.25 for v in range(10)])),  # were truncated
        "labels-bools": ("train", train_with(fine_labels=[True] * 10, coarse_labels=[COARSE_OF_1] * 10)),
        "labels-strings": ("train", train_with(fine_labels=[str(v) for v in range(10)])),
        "labels-huge-int": ("train", train_with(fine_labels=[10**30] * 10)),
        "not-a-dict": ("meta", pickle.dumps([1, 2, 3], protocol=2)),
        "many-long-keys": ("meta", pickle.dumps({f"{i:04d}" * 250: 0 for i in range(9000)}, protocol=2)),
        "tuple-key": ("meta", b"\x80\x02}" + pushes((1, 2)) + b"Ns."),
        "truncated": ("train", train_with()[:5000]),
        "empty": ("meta", b""),
        "not-a-pickle": ("meta", b"PK\x03\x04 this is a zip file, not a pickle"),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A valid CIFAR-100 folder whose md5 is not checked (a DATASET.json marker)."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), np.arange(10)
    return write_data.write_official(tmp_path_factory.mktemp("hostile") / "ds", "cifar100", x, y, x, y)


def copy_of(folder, tmp_path):
    target = tmp_path / "ds"
    target.mkdir()
    for item in folder.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def verify(path) -> subprocess.CompletedProcess:
    """`python -m cifar100 data verify PATH --no-md5` under 4 GB of address space; 30 s at most."""
    return subprocess.run([sys.executable, "-m", "cifar100", "data", "verify", str(path), "--no-md5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, preexec_fn=limit_memory)


def assert_refused_in_one_line(result, file):
    assert result.returncode in (1, 2), (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert str(file) in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert len(result.stderr) < 1000, result.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(corpus()))
def test_hostile_file_is_refused_in_one_line(folder, tmp_path, name):
    file, content = corpus()[name]
    ds = copy_of(folder, tmp_path)
    (ds / file).write_bytes(content)
    assert_refused_in_one_line(verify(ds), ds / file)


@pytest.mark.parametrize("make", [
    pytest.param(lambda p: os.mkfifo(p), id="fifo"),
    pytest.param(lambda p: p.mkdir(), id="folder"),
    pytest.param(lambda p: p.symlink_to("/dev/zero"), id="device"),
])
def test_only_regular_files_are_read(folder, tmp_path, make):
    ds = copy_of(folder, tmp_path)
    (ds / "meta").unlink()
    make(ds / "meta")
    result = verify(ds)
    assert_refused_in_one_line(result, ds / "meta")
    assert "not a regular file" in result.stderr


def test_the_corpus_folder_itself_verifies_without_tensorflow(folder):
    assert verify(folder).returncode == 0
    code = (f"import sys; from cifar100.__main__ import main; main(['data', 'verify', {str(folder)!r}]); "
            "print('imported:', 'tensorflow' in sys.modules or 'keras' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "imported: False" in result.stdout, result.stderr


def test_an_object_dtype_never_reaches_numpy(folder, tmp_path):
    """numpy.dtype's BUILD with object flags would make numpy read the file's bytes as pointers."""
    ds = copy_of(folder, tmp_path)
    dtype = dtype_of("u8", (3, "<", None, None, None, -1, -1, 63))
    (ds / "train").write_bytes(train_with(data=array_of(dtype, (1, 1), b"\x41" * 8)))
    with pytest.raises(DatasetError, match=r"train: unsafe file, nothing was run: refused the state"):
        data.load(ds)


@pytest.mark.parametrize("labels,found", [
    ([0.0] * 10, "float 0.0 at position 0"),
    ([1] * 9 + [True], "bool True at position 9"),
    (["1"] * 10, "str '1' at position 0"),
    (np.zeros(10, np.float32), "ndarray"),
])
def test_labels_must_be_integers(folder, tmp_path, labels, found):
    ds = copy_of(folder, tmp_path)
    (ds / "train").write_bytes(train_with(fine_labels=labels))
    with pytest.raises(DatasetError, match=rf"train: 'fine_labels' must be a list of integers.*found {found}"):
        data.load(ds)


def test_integer_label_arrays_are_accepted(folder, tmp_path):
    ds = copy_of(folder, tmp_path)
    (ds / "train").write_bytes(train_with(fine_labels=np.arange(10, dtype=np.uint8)))
    np.testing.assert_array_equal(data.load(ds).y_train, np.arange(10))


def test_class_names_must_be_strings(folder, tmp_path):
    ds = copy_of(folder, tmp_path)
    (ds / "meta").write_bytes(meta_with(fine_label_names=[{"a": 1}] * 100))
    with pytest.raises(DatasetError, match=r"meta: 'fine_label_names' must be a list of strings, found dict"):
        data.load(ds)


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
def test_own_data_pickled_by_python3_reads_back(folder, tmp_path, protocol):
    """Protocol 2 writes bytes as `_codecs.encode` calls; 5 writes arrays through numpy's `_frombuffer`."""
    ds = copy_of(folder, tmp_path)
    rng = np.random.default_rng(protocol)
    x = rng.integers(0, 256, (7, data.ROW_BYTES), dtype=np.uint8)
    batch = {b"data": x, b"fine_labels": list(range(7)), b"coarse_labels": data.CIFAR100_FINE_TO_COARSE[:7].tolist(),
             b"filenames": [b"a.png", b""], "batch_label": "mine"}
    (ds / "train").write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"fine_label_names": [n.encode() for n in data.CIFAR100_FINE_NAMES],
            b"coarse_label_names": data.CIFAR100_COARSE_NAMES}
    (ds / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    loaded = data.load(ds)
    np.testing.assert_array_equal(loaded.x_train, data.rows_to_images(x))
    assert loaded.class_names == data.CIFAR100_FINE_NAMES


def test_data_not_checked_against_the_official_md5_says_so(folder, tmp_path, monkeypatch):
    ds = tmp_path / "mine"
    write_data.write_official(ds, "cifar100", *[np.zeros((10, 32, 32, 3), np.uint8), np.arange(10)] * 2,
                        synthetic=False, source="my photos")
    loaded = data.load(ds)
    assert not loaded.official and "not verified as the official CIFAR-100 files: md5 not checked" in loaded.describe()
    (ds / data.DATASET_MARKER).unlink()
    assert not data.load(ds, check_md5=False).official
    monkeypatch.setitem(data.OFFICIAL_MD5, "cifar100", {n: data.md5sum(ds / n) for n in data.CIFAR100_FILES})
    loaded = data.load(ds)
    assert loaded.official and "not verified" not in loaded.describe()


def test_download_into_a_file_fails_before_downloading(tmp_path, serve):
    url, _, requests = serve(b"")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for target in (notes, notes / "cifar-100-python"):
        with pytest.raises(DatasetError, match=rf"{notes}: a file, where a folder is needed .*nothing was downloaded"):
            write_data.fetch(target, url=url)
    assert requests == [] and notes.read_text() == "mine"


def tar_gz(*entries: tuple[str, bytes | str]) -> bytes:
    """A tar.gz of (name, content) entries: bytes for a file, str for a symlink to that target."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.mark.parametrize("entries,limits,message", [
    ([("cifar-100-python/train", b"x"), ("cifar-100-python/meta", "train")], {},
     r"holds 'cifar-100-python/meta', which is not a plain file or folder \(a link or device\)"),
    ([(f"cifar-100-python/f{i}", b"x") for i in range(5)], {"MAX_ARCHIVE_MEMBERS": 3}, "more than 3 entries"),
    ([("cifar-100-python/train", b"\0" * 5000)], {"MAX_EXTRACTED_BYTES": 4096},
     "would extract to 5000 bytes, more than the 4096 allowed"),
])
def test_extraction_is_bounded_and_refuses_links(tmp_path, serve, monkeypatch, entries, limits, message):
    url, md5, _ = serve(tar_gz(*entries))
    monkeypatch.setitem(data.ARCHIVES, "cifar100", (url, md5, "cifar-100-python"))
    for name, value in limits.items():
        monkeypatch.setattr(write_data, name, value)
    with pytest.raises(DatasetError, match=rf"{message}; nothing was extracted"):
        write_data.fetch(tmp_path / "cifar-100-python")
    assert not (tmp_path / "cifar-100-python").exists()


def test_an_array_as_python2_numpy_pickled_it_reads_back(tmp_path):
    """The official files' form: dtype args ('u1', 0, 1), its state (3, '|', None, None, None, -1, -1, 0)."""
    pixels = bytes(range(256)) * 12
    raw = (b"\x80\x02}q\x00U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03"
           b"K\x00\x85U\x01b\x87Rq\x04(K\x01K\x01M\x00\x0c\x86cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq\x06"
           b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T\x00\x0c\x00\x00" + pixels + b"tbs.")
    (tmp_path / "batch").write_bytes(raw)
    array = safe_pickle.unpickle(tmp_path / "batch")["data"]
    assert array.dtype == np.uint8 and array.shape == (1, 3072) and array.tobytes() == pixels
