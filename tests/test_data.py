"""cifar100.data: the restricted unpickler against hostile files, the loader's checks, the official-format writer,
and the stratified split. No TensorFlow or Keras is imported here."""

import dataclasses
import json
import os
import pickle
import resource
import shutil
import subprocess
import time

import numpy as np
import pytest
from numpy._core import multiarray

from cifar100 import data
from cifar100.config import Config, DatasetError


class Reduce:
    """Pickles as `func(*args)`, then BUILD with `state` when given: any call a file can ask for."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def array_of(dtype, shape, raw: bytes):
    """An array pickled as numpy does (`_reconstruct`, then BUILD), with any dtype, shape and bytes."""
    return Reduce(multiarray._reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, raw))


def dumps(items: dict, protocol: int = 2) -> bytes:
    """A batch as the official files hold it: bytes keys."""
    return pickle.dumps({key.encode(): value for key, value in items.items()}, protocol=protocol)


def repeated_tuple_key(levels: int) -> bytes:
    """{t: 1} where t_i = (t_(i-1), t_(i-1)): a 1 KB file whose key costs 2**levels steps to hash."""
    ops = b"\x80\x02})q\x000"  # PROTO 2, EMPTY_DICT, EMPTY_TUPLE, BINPUT 0, POP
    for i in range(1, levels + 1):
        ops += b"h%ch%c\x86q%c0" % (i - 1, i - 1, i)  # BINGET, BINGET, TUPLE2, BINPUT, POP
    return ops + b"h%cK\x01s." % levels


M61 = 2**61 - 1  # ints k * M61 all hash alike: each dict insertion would compare with all keys before it
BIG = b"x" * 10**6


class Hostile:
    """Builds the content of one file of a copy of the synthetic folder, from its good batches."""

    def __init__(self, train: dict, meta: dict, path, marker):
        self.good_train, self.good_meta, self.path, self.marker = train, meta, path, marker

    def train(self, **changes):
        return dumps({k: v for k, v in {**self.good_train, **changes}.items() if v is not None})

    def meta(self, **changes):
        return dumps({k: v for k, v in {**self.good_meta, **changes}.items() if v is not None})

    def labels(self, change):
        return self.train(fine_labels=[change(v) for v in self.good_train["fine_labels"]])

    def two_superclasses(self):
        coarse = list(self.good_train["coarse_labels"])
        coarse[0] = (coarse[0] + 1) % 20
        return self.train(coarse_labels=coarse)


def case(name, file, build, fragment, named=None):
    return pytest.param(file, build, fragment, file if named is None else named, id=name)


HOSTILE = [
    # code: nothing may run
    case("os-system", "train", lambda h: h.train(data=Reduce(os.system, (f"touch {h.marker}",))),
         "unsafe file, nothing was run: refused to load 'posix.system'"),
    case("builtins-eval", "train", lambda h: h.train(data=Reduce(eval, (f"open({str(h.marker)!r}, 'w')",))),
         "refused to load '__builtin__.eval'"),
    case("subprocess-run", "meta", lambda h: dumps({**h.good_meta, "x": Reduce(subprocess.run, (
        ["touch", str(h.marker)],))}, protocol=4), "refused to load 'subprocess.run'"),
    case("persistent-id", "meta", lambda h: b"\x80\x02}U\x01aU\x01xQs.", "refused a persistent id"),
    case("reconstruct-a-dtype", "train", lambda h: h.train(data=Reduce(multiarray._reconstruct, (
        np.dtype, (0,), b"b"))), "numpy's _reconstruct of anything but ndarray"),
    case("object-dtype", "train", lambda h: h.train(data=array_of(np.dtype("O"), (1,), b"A" * 8)),
         "refused dtype 'O8'"),
    case("object-flags-dtype-state", "train", lambda h: h.train(data=array_of(Reduce(
        np.dtype, ("u8", False, True), (3, "<", None, None, None, -1, -1, 63)), (1,), b"A" * 8)),
        "refused the dtype state"),
    # bombs: each ends in one line, within bounded time and memory
    case("tuple-100000-deep-key", "meta", lambda h: b"\x80\x02})" + b"\x85" * 100_000 + b"K\x01s.",
         "tuples nested more than 100 deep"),
    case("tuple-repeated-2**31-key", "meta", lambda h: repeated_tuple_key(31), "tuples nested more than 100 deep"),
    case("memo-index-2**31", "meta", lambda h: b"\x80\x02}r\x00\x00\x00\x80.",
         "memo index 2147483648 at byte 3: larger than the file could need"),
    case("huge-integer", "train", lambda h: h.train(batch_label=10**1000), "an integer of more than 256 bits"),
    case("colliding-keys", "meta", lambda h: b"\x80\x02}(" + b"".join(
        pickle.dumps(k * M61, protocol=2)[2:-1] + b"N" for k in range(1, 50_001)) + b"u.",
        "more than 2000 dict or set entries"),
    case("ndarray-1e12-called", "train", lambda h: h.train(data=Reduce(np.ndarray, ((10**12,),))),
         "reading failed: TypeError: 'object' object is not callable"),
    case("bytes-1e11-called", "train", lambda h: h.train(data=Reduce(bytes, (10**11,))),
         "_empty_bytes() takes 0 positional arguments"),
    case("shape-beyond-data", "train", lambda h: h.train(data=array_of(np.dtype("u1"), (10**9, 3072), b"x")),
         "an array of shape (1000000000, 3072) whose data holds 1 bytes"),
    case("bytes-reused-by-memo", "train", lambda h: h.train(extra=[array_of(np.dtype("u1"), (10**6,), BIG)
                                                                   for _ in range(50)]),
         "the file builds more than twice its size of data (a memory bomb)"),
    case("name-reused-by-memo", "meta", lambda h: h.meta(fine_label_names=[BIG] * 1000),
         "'fine_label_names' must be a list of distinct names"),
    case("key-reusing-bytes", "train", lambda h: pickle.dumps({(BIG,) * 1000: 0}, protocol=4),
         "missing the keys ['data'"),
    case("2000001-opcodes", "meta", lambda h: b"\x80\x02(" + b"N" * 2_000_001 + b"l.",
         "more than 2,000,000 pickle opcodes"),
    # broken files and what stands in their place
    case("truncated", "train", lambda h: h.train()[:1_000_000], "not a CIFAR batch (a pickled dict); reading failed"),
    case("not-a-dict", "meta", lambda h: pickle.dumps([1, 2], protocol=2), "expected a dict, found list"),
    case("fifo", "meta", lambda h: os.mkfifo(h.path), "expected a regular file of at most"),
    case("folder", "train", lambda h: h.path.mkdir(), "found not a regular file"),
    case("marker-nested-json", "DATASET.json", lambda h: b"[" * 50_000, "expected a JSON object with 'source'"),
    # wrong content
    case("wrong-keys", "train", lambda h: h.train(fine_labels=None), "missing the keys ['fine_labels']"),
    case("data-float32", "train", lambda h: h.train(data=np.zeros((1000, 3072), np.float32)),
         "'data' must be a uint8 array of shape (N, 3072), found ndarray float32 (1000, 3072)"),
    case("data-wrong-shape", "test", lambda h: h.train(data=np.zeros((1000, 3000), np.uint8)),
         "'data' must be a uint8 array of shape (N, 3072), found ndarray uint8 (1000, 3000)"),
    case("labels-out-of-range", "train", lambda h: h.train(fine_labels=[100] + h.good_train["fine_labels"][1:]),
         "'fine_labels' must hold 1000 labels from 0 to 99, found 1000 from 0 to 100"),
    case("labels-floats", "train", lambda h: h.labels(float), "'fine_labels' must be a list of class indices"),
    case("labels-bools", "train", lambda h: h.labels(bool), "'fine_labels' must be a list of class indices"),
    case("labels-beyond-int64", "train", lambda h: h.labels(lambda v: v + 2**100), "integer beyond 64 bits"),
    case("label-count", "train", lambda h: h.train(fine_labels=h.good_train["fine_labels"][:-1]),
         "'fine_labels' must hold 1000 labels from 0 to 99, found 999"),
    case("names-not-strings", "meta", lambda h: h.meta(fine_label_names=list(range(100))),
         "'fine_label_names' must be a list of distinct names of 1 to 100 printable characters"),
    case("names-repeated", "meta", lambda h: h.meta(coarse_label_names=[b"group"] * 20),
         "'coarse_label_names' must be a list of distinct names"),
    case("names-terminal-escape", "meta", lambda h: h.meta(fine_label_names=[b"\x1b[2J"] + [
        f"c{i}".encode() for i in range(99)]), "'fine_label_names' must be a list of distinct names"),
    case("class-in-two-superclasses", "train", Hostile.two_superclasses,
         "a class belongs to two superclasses in 'coarse_labels'", named=""),
]


@pytest.fixture(scope="module")
def good(synthetic_cifar100):
    return data.unpickle(synthetic_cifar100 / "train"), data.unpickle(synthetic_cifar100 / "meta")


@pytest.fixture
def copy(synthetic_cifar100, tmp_path):
    return shutil.copytree(synthetic_cifar100, tmp_path / "cifar-100-python")


@pytest.mark.timeout(60)  # a blocking open (a FIFO) fails the test instead of hanging the run
@pytest.mark.parametrize("file,build,fragment,named", HOSTILE)
def test_hostile_file_is_refused_in_one_line(good, copy, tmp_path, file, build, fragment, named):
    hostile = Hostile(*good, copy / file, tmp_path / "RAN")
    hostile.path.unlink()
    content = build(hostile)
    if content is not None:
        hostile.path.write_bytes(content)
    peak, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    with pytest.raises(DatasetError) as err:
        data.load(copy)
    message = str(err.value)
    assert fragment in message and str(copy / named) in message, message
    assert "\n" not in message and message.isprintable() and len(message) < 1500, message
    assert time.monotonic() - start < 15
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 400_000  # KiB
    assert not hostile.marker.exists()


def random_dataset(classes: int, n_train: int, n_test: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), rng.permutation(np.arange(n_train) % classes),
            rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n_test))


@pytest.mark.parametrize("kind,classes", [("cifar100", 100), ("cifar10", 10)])
def test_write_then_load_gives_back_the_same_data(tmp_path, kind, classes):
    x_train, y_train, x_test, y_test = arrays = random_dataset(classes, 200, 30)
    names = [f"thing_{i}" for i in range(classes)]
    superclass = np.random.default_rng(1).permutation(np.arange(100) // 5) if kind == "cifar100" else None
    ds = data.load(data.write(tmp_path / "ds", kind, *arrays, class_names=names, superclass=superclass))
    for got, expected in zip((ds.x_train, ds.y_train, ds.x_test, ds.y_test), arrays, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (200, 32, 32, 3) and ds.class_names == names
    if kind == "cifar100":
        np.testing.assert_array_equal(ds.superclass, superclass)
        assert ds.superclass_names == [f"group_{i}" for i in range(20)]
    else:
        assert ds.superclass is None and ds.num_classes == 10


def test_written_files_are_protocol_2_pickles_with_bytes_keys_and_channel_planes(synthetic_cifar100):
    raw = (synthetic_cifar100 / "train").read_bytes()
    assert raw[:2] == b"\x80\x02"
    batch = pickle.loads(raw, encoding="bytes")
    assert set(batch) == {b"data", b"fine_labels", b"coarse_labels", b"batch_label"}
    meta = pickle.loads((synthetic_cifar100 / "meta").read_bytes(), encoding="bytes")
    assert meta[b"fine_label_names"][:2] == [b"class_0", b"class_1"] and len(meta[b"coarse_label_names"]) == 20
    images = data.load(synthetic_cifar100).x_train
    for channel in range(3):  # official layout: 1024 red bytes, then green, then blue, each plane row-major
        np.testing.assert_array_equal(batch[b"data"][:, 1024 * channel:1024 * (channel + 1)],
                                      images[..., channel].reshape(1000, 1024))


def test_python2_numpy_pickle_as_in_the_official_files_reads_back(tmp_path):
    pixels = bytes(range(256)) * 12
    raw = (b"\x80\x02}q\x00U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03"
           b"K\x00\x85U\x01b\x87Rq\x04(K\x01K\x01M\x00\x0c\x86cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq\x06"
           b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T\x00\x0c\x00\x00" + pixels + b"tbs.")
    (tmp_path / "batch").write_bytes(raw)
    array = data.unpickle(tmp_path / "batch")["data"]
    assert array.dtype == np.uint8 and array.shape == (1, 3072) and array.tobytes() == pixels


def test_python3_protocol_4_files_read_back(tmp_path):
    """As ../shared/data/cifar10-dev/build.py writes them."""
    x_train, y_train, x_test, y_test = random_dataset(10, 50, 20, seed=4)
    rows = [x.transpose(0, 3, 1, 2).reshape(len(x), 3072) for x in (x_train, x_test)]
    parts = [(f"data_batch_{k}", slice(10 * k - 10, 10 * k)) for k in range(1, 6)]
    for name, x, y in [(n, rows[0][part], y_train[part]) for n, part in parts] + [("test_batch", rows[1], y_test)]:
        with open(tmp_path / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"labels": y.tolist(), b"data": x,
                         b"filenames": [b"f.png"] * len(y)}, handle, protocol=4)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(tmp_path / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_vis": 3072}, handle, protocol=4)
    (tmp_path / "DATASET.json").write_text(json.dumps({"source": "real images", "synthetic": False}))
    ds = data.load(tmp_path)
    np.testing.assert_array_equal(ds.x_train, x_train)
    np.testing.assert_array_equal(ds.y_test, y_test)
    assert ds.class_names == names and ds.name == "CIFAR-10-format data (real images)" and not ds.synthetic


def test_marker_makes_the_name_say_synthetic(synthetic_cifar100):
    ds = data.load(synthetic_cifar100)
    assert ds.name == "SYNTHETIC data in the CIFAR-100 format" and ds.synthetic


def test_without_a_marker_the_files_are_md5_checked(copy):
    (copy / data.MARKER).unlink()
    with pytest.raises(DatasetError) as err:
        data.load(copy)
    message = str(err.value)
    assert message.startswith(f"{copy / 'train'}: md5 ") and f"not the official {data.MD5['train']}" in message
    assert "\n" not in message


def test_a_missing_dataset_says_how_to_download_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".gitkeep").touch()
    for folder in (tmp_path / "nowhere", tmp_path / "empty"):
        with pytest.raises(DatasetError) as err:
            data.load(folder)
        message = str(err.value)
        assert f"python -m cifar100 data download {folder}" in message and message.startswith(f"{folder}: ")
        assert "\n" not in message


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    def get_file(**kwargs):
        raise Exception("URL fetch failure: no network")  # as keras.utils.get_file raises it

    from cifar100.keras_fixes import keras

    monkeypatch.setattr(keras.utils, "get_file", get_file)
    with pytest.raises(DatasetError) as err:
        data.load(tmp_path / "cifar-100-python", download_if_missing=True)
    message = str(err.value)
    assert message.startswith(f"could not download {data.URL} (URL fetch failure: no network)") and "\n" not in message
    assert "python -m cifar100 data download" in message and not (tmp_path / "cifar-100-python").exists()


@pytest.fixture(scope="module")
def dataset(synthetic_cifar100):
    return data.load(synthetic_cifar100)


def keys(images) -> list[bytes]:
    return [image.tobytes() for image in images]


def per_class(labels) -> np.ndarray:
    return np.bincount(labels, minlength=100)


def test_split_is_stratified(dataset):
    (_, y_train), (_, y_val) = data.split(dataset, Config(val_fraction=0.25, seed=0))
    assert len(y_val) == 250 and len(y_train) == 750
    for labels in (y_train, y_val):
        assert np.ptp(per_class(labels)) <= 1


def test_split_is_disjoint_and_never_uses_test_images(dataset):
    without_test = dataclasses.replace(dataset, x_test=None, y_test=None)
    (x_train, y_train), (x_val, y_val) = data.split(without_test, Config(val_fraction=0.2, seed=0))
    train, val = set(keys(x_train)), set(keys(x_val))
    assert len(train) == 800 and len(val) == 200 and not train & val
    assert train | val == set(keys(dataset.x_train)) and not (train | val) & set(keys(dataset.x_test))
    label_of = dict(zip(keys(dataset.x_train), dataset.y_train.tolist(), strict=True))
    assert [label_of[k] for k in keys(x_val)] == y_val.tolist()


def test_split_is_deterministic_per_seed(dataset):
    (_, _), (x_val, _) = data.split(dataset, Config(seed=7))
    (_, _), (x_again, _) = data.split(dataset, Config(seed=7))
    (_, _), (x_other, _) = data.split(dataset, Config(seed=8))
    np.testing.assert_array_equal(x_again, x_val)
    assert len(x_other) == len(x_val) and set(keys(x_other)) != set(keys(x_val))


def test_max_train_images_caps_training_stratified_and_keeps_validation(dataset):
    (x_full, _), (x_val, _) = data.split(dataset, Config(val_fraction=0.2, seed=3))
    (x_train, y_train), (x_capped_val, _) = data.split(dataset, Config(val_fraction=0.2, seed=3, max_train_images=300))
    assert len(y_train) == 300 and np.ptp(per_class(y_train)) <= 1
    assert set(keys(x_train)) <= set(keys(x_full))
    np.testing.assert_array_equal(x_capped_val, x_val)
