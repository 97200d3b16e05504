import csv
import io
import os
import pickle
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar100 import data, safe_pickle, write_data
from cifar100.data import DatasetError

from .conftest import SAMPLE_DIR, run_cli


def random_split_arrays(n_train, n_test, classes, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n_train),
            rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n_test))


@pytest.mark.parametrize("kind,classes", [("cifar100", 100), ("cifar10", 10)])
def test_round_trip_reads_back_exact_arrays(tmp_path, kind, classes):
    x_train, y_train, x_test, y_test = random_split_arrays(53, 17, classes)
    write_data.write_official(tmp_path, kind, x_train, y_train, x_test, y_test)
    ds = data.load(tmp_path)
    assert ds.kind == kind and ds.synthetic
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (53, 32, 32, 3)
    np.testing.assert_array_equal(ds.x_train, x_train)
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.x_test, x_test)
    np.testing.assert_array_equal(ds.y_test, y_test)
    assert len(ds.class_names) == classes


def test_written_files_read_like_the_official_ones(synthetic_cifar100):
    """Readers that use pickle.load(f, encoding='bytes'), as the dataset's own page shows, see bytes keys."""
    with open(synthetic_cifar100 / "train", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert set(batch) == {b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (1000, 3072)
    with open(synthetic_cifar100 / "meta", "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert meta[b"fine_label_names"][0] == b"apple" and len(meta[b"coarse_label_names"]) == 20


def test_other_data_in_the_official_format_is_marked_and_named(tmp_path):
    x_train, y_train, x_test, y_test = random_split_arrays(20, 10, 10)
    names = [f"thing{i}" for i in range(10)]
    write_data.write_official(tmp_path, "cifar10", x_train, y_train, x_test, y_test, synthetic=False,
                        source="Fashion-MNIST, padded", class_names=names)
    ds = data.load(tmp_path)
    assert not ds.synthetic and ds.source == "Fashion-MNIST, padded" and ds.class_names == names
    assert "source: Fashion-MNIST, padded" in ds.describe() and "SYNTHETIC" not in ds.describe()


def test_a_broken_marker_is_named(dataset_dir):
    (dataset_dir / data.DATASET_MARKER).write_text("{not json")
    with pytest.raises(DatasetError, match=r"DATASET.json: not valid JSON"):
        data.load(dataset_dir)
    (dataset_dir / data.DATASET_MARKER).write_text('{"source": "x", "synthetic": "false"}')
    with pytest.raises(DatasetError, match=r"DATASET.json: 'synthetic' must be true or false, found 'false'"):
        data.load(dataset_dir)
    (dataset_dir / data.DATASET_MARKER).write_text('{"source": "' + "x" * 100_000 + '"}')
    with pytest.raises(DatasetError, match=r"DATASET.json: 100\d+ bytes; expected a small JSON object"):
        data.load(dataset_dir)


def test_cifar100_superclasses_follow_the_official_mapping(synthetic_cifar100):
    ds = data.load(synthetic_cifar100)
    assert ds.coarse_names[ds.fine_to_coarse[ds.class_names.index("maple_tree")]] == "trees"
    assert ds.coarse_names[ds.fine_to_coarse[ds.class_names.index("whale")]] == "aquatic_mammals"
    np.testing.assert_array_equal(np.bincount(ds.fine_to_coarse, minlength=20), np.full(20, 5))


def read_sample():
    with open(SAMPLE_DIR / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    images = np.stack([np.asarray(Image.open(SAMPLE_DIR / r["file"]).convert("RGB")) for r in rows])
    return images, np.array([int(r["fine_label"]) for r in rows]), [r["fine_label_name"] for r in rows]


@pytest.mark.skipif(not SAMPLE_DIR.is_dir(), reason="needs ../shared/data/cifar100-test-sample")
def test_real_cifar100_pixels_and_names_survive_the_official_layout(tmp_path):
    images, labels, names = read_sample()
    rows = data.images_to_rows(images)
    # official layout: 1024 red bytes, then green, then blue, each plane row-major
    np.testing.assert_array_equal(rows[:, :1024], images[..., 0].reshape(20, 1024))
    np.testing.assert_array_equal(rows[:, 1024:2048], images[..., 1].reshape(20, 1024))
    np.testing.assert_array_equal(rows[3, 2048 + 32 * 5 + 7], images[3, 5, 7, 2])
    write_data.write_official(tmp_path, "cifar100", images, labels, images, labels)
    ds = data.load(tmp_path)
    np.testing.assert_array_equal(ds.x_test, images)
    assert [ds.class_names[y] for y in ds.y_test] == names


def write_malicious(path: Path, payload) -> None:
    path.write_bytes(pickle.dumps(payload, protocol=2))


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CallsFunction:
    def __reduce__(self):
        return (eval, ("__import__('builtins').print('pwned')",))


@pytest.mark.parametrize("make_payload", [
    lambda marker: {"data": RunsCommand(marker)},
    lambda marker: [CallsFunction()],
])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, make_payload):
    x_train, y_train, x_test, y_test = random_split_arrays(10, 10, 100)
    write_data.write_official(tmp_path, "cifar100", x_train, y_train, x_test, y_test)
    marker = tmp_path / "PWNED"
    write_malicious(tmp_path / "train", make_payload(marker))
    with pytest.raises(DatasetError) as err:
        data.load(tmp_path)
    assert "train" in str(err.value) and "refused" in str(err.value)
    assert not marker.exists()


@pytest.fixture
def dataset_dir(tmp_path):
    x_train, y_train, x_test, y_test = random_split_arrays(20, 10, 100)
    return write_data.write_official(tmp_path / "ds", "cifar100", x_train, y_train, x_test, y_test)


def rewrite(path, **changes):
    batch = safe_pickle.unpickle(path)
    batch.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del batch[key]
    write_data.write_batch(path, batch)


def test_missing_folder_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DatasetError) as err:
        data.load(tmp_path / "nowhere")
    message = str(err.value)
    assert "nowhere" in message and "not found" in message
    assert "python -m cifar100 data download" in message and "cifar-100-python.tar.gz" in message


def test_missing_file_is_named(dataset_dir):
    (dataset_dir / "test").unlink()
    with pytest.raises(DatasetError, match=r"test: missing file.*missing \['test'\]"):
        data.load(dataset_dir)


def test_folder_without_cifar_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"no CIFAR files found.*notes.txt"):
        data.load(tmp_path)
    for index in range(3000):
        (tmp_path / f"photo-{index:04d}.jpg").touch()
    with pytest.raises(DatasetError, match=r"no CIFAR files found.*found \['notes.txt', 'photo-0000.jpg'") as error:
        data.load(tmp_path)
    assert len(str(error.value)) < 600  # a few names, not all 3001


def test_truncated_file(dataset_dir):
    raw = (dataset_dir / "train").read_bytes()
    (dataset_dir / "train").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match=r"train: truncated or corrupt"):
        data.load(dataset_dir)


def test_corrupt_file(dataset_dir):
    (dataset_dir / "meta").write_bytes(b"this is not a pickle at all")
    with pytest.raises(DatasetError, match=r"meta: truncated or corrupt"):
        data.load(dataset_dir)


def test_wrong_keys(dataset_dir):
    rewrite(dataset_dir / "train", fine_labels=None)
    with pytest.raises(DatasetError, match=r"train: wrong keys.*missing \['fine_labels'\]"):
        data.load(dataset_dir)


def test_wrong_sizes(dataset_dir):
    rewrite(dataset_dir / "test", data=np.zeros((10, 3000), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"test: wrong sizes.*\(N, 3072\).*\(10, 3000\)"):
        data.load(dataset_dir)


def test_wrong_dtype(dataset_dir):
    rewrite(dataset_dir / "test", data=np.zeros((10, 3072), dtype=np.float32))
    with pytest.raises(DatasetError, match=r"test: wrong sizes.*uint8.*float32"):
        data.load(dataset_dir)


def test_labels_out_of_range(dataset_dir):
    rewrite(dataset_dir / "train", fine_labels=[100] + [0] * 19)
    message = r"train: labels out of range in 'fine_labels': expected 0..99, found \[100\]"
    with pytest.raises(DatasetError, match=message):
        data.load(dataset_dir)


def test_image_and_label_counts_differ(dataset_dir):
    rewrite(dataset_dir / "train", fine_labels=[0] * 19)
    with pytest.raises(DatasetError, match=r"train: image and label counts differ: 20 images.*19 labels"):
        data.load(dataset_dir)


def test_wrong_number_of_class_names(dataset_dir):
    rewrite(dataset_dir / "meta", fine_label_names=["a", "b"])
    with pytest.raises(DatasetError, match=r"meta: 'fine_label_names' must hold 100 names, found 2"):
        data.load(dataset_dir)


def test_md5_checked_for_official_names_and_skippable(dataset_dir, monkeypatch):
    (dataset_dir / data.DATASET_MARKER).unlink()
    with pytest.raises(DatasetError, match=r"train: md5 mismatch: expected the official 16019d7e"):
        data.load(dataset_dir)
    assert data.load(dataset_dir, check_md5=False).md5["train"] == "skipped"
    official = {name: data.md5sum(dataset_dir / name) for name in data.CIFAR100_FILES}
    monkeypatch.setitem(data.OFFICIAL_MD5, "cifar100", official)
    assert data.load(dataset_dir).md5 == {name: "ok (official)" for name in data.CIFAR100_FILES}


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(10), 50)
    train_idx, val_idx = data.split(labels, val_fraction=0.1, seed=3)
    assert len(val_idx) == 50 and len(train_idx) == 450
    assert not set(train_idx) & set(val_idx) and len(set(train_idx) | set(val_idx)) == 500
    np.testing.assert_array_equal(np.bincount(labels[val_idx]), np.full(10, 5))
    np.testing.assert_array_equal(data.split(labels, 0.1, seed=3)[1], val_idx)
    assert not np.array_equal(data.split(labels, 0.1, seed=4)[1], val_idx)


def test_split_rejects_a_bad_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        data.split(np.zeros(10), val_fraction=1.5)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_download_fails_fast_with_instructions(tmp_path):
    with pytest.raises(DatasetError) as err:
        write_data.fetch(tmp_path / "cifar-100-python", url=f"http://127.0.0.1:{closed_port()}/cifar-100-python.tar.gz")
    assert "could not download" in str(err.value) and "tar xzf cifar-100-python.tar.gz" in str(err.value)
    assert not (tmp_path / "cifar-100-python").exists()


def test_download_from_a_silent_server_times_out(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # accepts the connection but never answers
        # without the timeout this would wait for ever: the test would hang, not pass
        with pytest.raises(DatasetError, match=r"could not download .*timed out"):
            write_data.fetch(tmp_path / "x", url=f"http://127.0.0.1:{server.getsockname()[1]}/a.tar.gz", timeout=1)


@pytest.fixture
def archive_server(tmp_path, serve):
    """Serves a CIFAR-100-shaped tar.gz on loopback; yields (url, md5)."""
    source = tmp_path / "src" / "cifar-100-python"
    write_data.write_synthetic(source, n_train=100, n_test=100)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source, arcname="cifar-100-python")
    url, md5, _ = serve(buffer.getvalue(), "cifar-100-python.tar.gz")
    return url, md5


def test_download_checks_md5_and_extracts(tmp_path, archive_server, monkeypatch):
    url, md5 = archive_server
    monkeypatch.setitem(data.ARCHIVES, "cifar100", (url, md5, "cifar-100-python"))
    target = tmp_path / "data" / "cifar-100-python"
    ds = data.load(target, download=True)
    assert len(ds.y_train) == 100 and (target / "meta").is_file()


def test_download_fills_the_repos_empty_data_folder(tmp_path, archive_server, monkeypatch):
    url, md5 = archive_server
    monkeypatch.setitem(data.ARCHIVES, "cifar100", (url, md5, "cifar-100-python"))
    target = tmp_path / "cifar-100-python"
    target.mkdir()
    (target / ".gitkeep").touch()
    with pytest.raises(DatasetError, match="not found"):
        data.load(target)
    data.load(target, download=True)
    assert (target / "train").is_file() and (target / ".gitkeep").exists()
    with pytest.raises(DatasetError, match="already holds files"):
        write_data.fetch(target)


def test_download_with_wrong_md5_extracts_nothing(tmp_path, archive_server, monkeypatch):
    url, _ = archive_server
    monkeypatch.setitem(data.ARCHIVES, "cifar100", (url, "0" * 32, "cifar-100-python"))
    with pytest.raises(DatasetError, match="md5 mismatch of the downloaded archive"):
        write_data.fetch(tmp_path / "cifar-100-python")
    assert not (tmp_path / "cifar-100-python").exists()


def test_synthetic_data_carries_a_learnable_signal():
    labels = np.repeat(np.arange(10), 20)
    images = write_data.synthetic_images(labels, 10, seed=0).reshape(200, -1).astype(float)
    centroids = np.stack([images[labels == c].mean(0) for c in range(10)])
    nearest = np.argmin(((images[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() > 0.9


def test_cli_writes_and_verifies_a_dataset(tmp_path):
    made = run_cli("data", "synthetic", str(tmp_path / "d"), "--train", "300", "--test", "100")
    assert made.returncode == 0, made.stderr
    verified = run_cli("data", "verify", str(tmp_path / "d"))
    assert verified.returncode == 0, verified.stderr
    assert "train: 300 images, test: 100 images, 100 classes" in verified.stdout
    assert "SYNTHETIC" in verified.stdout and "md5 train: skipped (not the official files)" in verified.stdout


def test_cli_reports_errors_without_a_traceback(tmp_path):
    result = run_cli("data", "verify", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "dataset folder not found" in result.stderr and "Traceback" not in result.stderr
