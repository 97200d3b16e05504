"""`evaluate` and `predict` on broken and hostile files: one line naming the file, and no traceback."""

import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cifar100 import write_data
from cifar100.__main__ import main
from cifar100.config import Config, DatasetError


@pytest.fixture(scope="module")
def run_dir(untrained_run):
    return untrained_run


def png_chunk(kind: bytes, content: bytes) -> bytes:
    return struct.pack(">I", len(content)) + kind + content + struct.pack(">I", zlib.crc32(kind + content))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels and holds none: a decompression bomb's header."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", b"") + png_chunk(b"IEND", b""))


def test_evaluate_names_a_damaged_checkpoint(run_dir, tmp_path, capsys):
    damaged = tmp_path / "run"
    shutil.copytree(run_dir, damaged)
    raw = (damaged / "best.keras").read_bytes()
    (damaged / "best.keras").write_bytes(raw[: len(raw) // 2])
    assert main(["evaluate", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert f"{damaged / 'best.keras'}: damaged or not a Keras model file" in err and "not found" not in err


def test_evaluate_refuses_a_dataset_of_other_classes(run_dir, tmp_path, capsys):
    cifar10 = write_data.write_synthetic(tmp_path / "cifar10", kind="cifar10", n_train=50, n_test=20)
    assert main(["evaluate", str(run_dir), "--data", str(cifar10)]) == 2
    err = capsys.readouterr().err
    assert f"{cifar10}: the dataset has 10 classes (cifar10), but the run {run_dir} was trained on 100" in err


def test_predict_names_each_bad_file_and_predicts_the_others(run_dir, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(good)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(100_000, 100_000))
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    assert main(["predict", str(run_dir), str(bomb), str(good), str(text), str(fifo)]) == 2
    out, err = capsys.readouterr()
    assert out.startswith(f"{good}: ") and len(out.splitlines()) == 1
    assert f"{bomb}: cannot read as an image (DecompressionBombError" in err
    assert f"{text}: cannot read as an image" in err and f"{fifo}: not a regular file" in err
    assert err.startswith(f"note: {run_dir} was trained on SYNTHETIC data, not CIFAR-100")  # synthetic_cifar100
    assert len(err.splitlines()) == 4 and "Traceback" not in err


def test_images_of_more_than_8_bits_are_scaled_or_refused(tmp_path):
    from cifar100 import evaluate

    ramp = np.repeat(np.arange(32, dtype=np.uint32)[None, :] * 2114, 32, axis=0)  # 0 to 65534, left to right
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "grey16.png")
    loaded = evaluate.load_image(tmp_path / "grey16.png")
    assert loaded.shape == (32, 32, 3) and loaded.dtype == np.uint8
    assert np.allclose(loaded[:, :, 0], np.rint(ramp / 257), atol=1) and 126 < loaded.mean() < 129  # not clipped
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "grey16.pgm")  # Pillow opens it as 32-bit ("I")
    assert np.array_equal(evaluate.load_image(tmp_path / "grey16.pgm"), loaded)
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "int32.tif")
    Image.fromarray(ramp.astype(np.float32) / 65535).save(tmp_path / "float.tif")
    for name, kind in (("int32.tif", "a 32-bit integer"), ("float.tif", "a floating-point")):
        with pytest.raises(DatasetError, match=rf"{name}: {kind} image, whose range of values is not defined"):
            evaluate.load_image(tmp_path / name)


def test_names_from_files_print_without_terminal_escapes(run_dir, tmp_path, capsys):
    """An image's file name, and paths and names in a run folder's JSON files, come from someone else."""
    evil = tmp_path / "\x1b]0;owned\x07\x1b[31mred.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(evil, format="PNG")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    classes = json.loads((run / "classes.json").read_text())
    (run / "classes.json").write_text(json.dumps({**classes, "kind": ["not", "a", "name"]}))
    assert main(["predict", str(run), str(evil), str(tmp_path / "\x1b[2Jmissing.png")]) == 2
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "Traceback" not in err
    assert out.startswith(f"{tmp_path}/\\x1b]0;owned\\x07\\x1b[31mred.png: ") and "missing.png: file not found" in err
    os.symlink("/etc/passwd", run / "\x1b]0;owned\x07link")  # a file name inside the run folder
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert "\\x1b]0;owned\\x07link: a symbolic link in the run folder" in err and "\x1b" not in err
    (run / "\x1b]0;owned\x07link").unlink()
    saved = json.loads((run / "config.json").read_text())
    for path in ("/data/\x1b]0;owned\x07", "/data/cifar\x00-100"):  # a terminal escape; a NUL byte
        (run / "config.json").write_text(json.dumps({**saved, "data_dir": path}))
        for command in (["evaluate", str(run)], ["evaluate", str(run), "--data", saved["data_dir"]]):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert "config.json: setting 'data_dir'" in err and "holds control characters" in err, err
            assert "\x1b" not in err and "\x00" not in err and len(err.splitlines()) == 1


def test_evaluate_says_when_the_data_is_not_the_official_files(run_dir, tmp_path, capsys):
    x, y = np.zeros((100, 32, 32, 3), np.uint8), np.arange(100)
    mine = write_data.write_official(tmp_path / "mine", "cifar100", x, y, x, y, synthetic=False, source="my photos")
    evaluated = tmp_path / "run"
    shutil.copytree(run_dir, evaluated)
    assert main(["evaluate", str(evaluated), "--data", str(mine)]) == 0
    out = capsys.readouterr().out
    assert f"{evaluated} on {mine}: test top-1" in out
    assert "(CIFAR-100-format data, not verified as the official CIFAR-100 files: md5 not checked)" in out
    assert "its results.json is left as it is" in out and not (evaluated / "results.json").exists()

    config = Config.load(evaluated / "config.json").replace(data_dir=str(mine))  # now it is the run's own data
    config.save(evaluated / "config.json")
    assert main(["evaluate", str(evaluated)]) == 0
    assert "not verified as the official CIFAR-100 files: md5 not checked)" in capsys.readouterr().out
    results = json.loads((evaluated / "results.json").read_text())
    assert results["data"] == {"kind": "cifar100", "path": str(mine), "synthetic": False, "official": False}
