"""A trained model outside this repo: best.keras in plain Keras, the same probabilities however it is called,
and the exported SavedModel, TFLite and ONNX files giving predict's answers on real images."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from cifar100 import evaluate, run_folder, train
from cifar100.__main__ import main
from cifar100.config import Config, RunError, make_config

from .conftest import SAMPLE_DIR

pytestmark = pytest.mark.slow  # a training run and exports: left out of `make test-fast`


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synthetic_cifar100):
    """A finished run trained with augmentation and dropout (the layers that must not run at inference)."""
    runs = tmp_path_factory.mktemp("runs")
    config = make_config("smoke", {"data_dir": str(synthetic_cifar100), "runs_dir": str(runs), "name": "run",
                                   "image_size": 40, "augment": "basic", "dropout": 0.5, "finetune_epochs": 2})
    return train.run(config, verbose=0)


@pytest.fixture(scope="module")
def real_and_test_images(synthetic_cifar100):
    """The 20 real CIFAR-100 test images (where ../shared is here) and the synthetic test set, uint8."""
    from cifar100 import data

    images = [data.load(synthetic_cifar100).x_test]
    real = sorted(SAMPLE_DIR.glob("cifar100_*.png"))
    if real:
        images.insert(0, np.stack([evaluate.load_image(path) for path in real]))
    return np.concatenate(images)


def test_best_keras_loads_in_a_process_that_never_imports_this_package(trained_run, real_and_test_images, tmp_path):
    np.save(tmp_path / "images.npy", real_and_test_images)
    script = f"""
import sys, numpy as np, keras
model = keras.saving.load_model({str(trained_run / 'best.keras')!r})  # safe_mode is on by default
images = np.load({str(tmp_path / 'images.npy')!r})
np.savez({str(tmp_path / 'out.npz')!r}, predict=model.predict(images, verbose=0),
         call=keras.ops.convert_to_numpy(model(images)))
assert not [name for name in sys.modules if name.startswith("cifar100")], "the package was imported"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)  # not the repo: `import cifar100` would fail there
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    here = keras.saving.load_model(trained_run / "best.keras").predict(real_and_test_images, verbose=0)
    np.testing.assert_allclose(out["predict"], here, atol=1e-6)
    np.testing.assert_allclose(out["call"], here, atol=1e-6)


def test_the_saved_model_has_no_augmentation_and_calling_it_changes_nothing(trained_run, real_and_test_images):
    model = keras.saving.load_model(trained_run / "best.keras")
    assert type(model.get_layer("upsample")) is keras.layers.Resizing
    assert not [layer.name for layer in model.layers if "random" in layer.name]
    before = [w.copy() for w in model.get_weights()]
    expected = model.predict(real_and_test_images, verbose=0)
    for _ in range(2):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(model(real_and_test_images)), expected, atol=1e-6)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(model(real_and_test_images, training=False)),
                                   expected, atol=1e-6)
    for weight, kept in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(weight, kept)


def test_export_writes_each_form_and_each_gives_predicts_answers(trained_run, real_and_test_images, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(trained_run), str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"saved_model", "model.tflite", "model.onnx", "classes.json",
                                               "export.json"}
    assert json.loads((out / "classes.json").read_text()) == run_folder.read_json(trained_run / "classes.json")
    expected = keras.saving.load_model(trained_run / "best.keras").predict(real_and_test_images, verbose=0)
    for path in (out / "saved_model", out / "model.tflite", out / "model.onnx"):
        got = evaluate.run_exported(path, real_and_test_images)
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got.argmax(1), expected.argmax(1), err_msg=path.name)
        np.testing.assert_allclose(got, expected, atol=evaluate.EXPORT_TOLERANCE, err_msg=path.name)
    import tensorflow as tf

    signature = tf.saved_model.load(str(out / "saved_model")).signatures["serve"].structured_input_signature[1]
    (spec,) = signature.values()
    assert spec.dtype == tf.uint8 and tuple(spec.shape) == (None, 32, 32, 3)


def test_export_never_writes_into_an_existing_folder(trained_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", str(trained_run), str(out)]) == 2
    assert "exists: export writes a new folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_export_refuses_a_form_that_disagrees_and_leaves_nothing(trained_run, tmp_path, monkeypatch):
    exported = evaluate.run_exported

    def off_by_a_little(path, images):  # as a converter that changed the arithmetic would give
        got = exported(path, images)
        return got + (1e-3 if path.suffix == ".tflite" else 0)

    monkeypatch.setattr(evaluate, "run_exported", off_by_a_little)
    with pytest.raises(RunError, match=r"the exported tflite does not give the Keras model's predictions"):
        evaluate.export_run(trained_run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its partial copy


def test_a_run_folder_of_the_earlier_model_format_is_refused_in_one_line(trained_run, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained_run, old)
    state = run_folder.read_state(old)
    del state["model_format"]  # as an earlier version of the project wrote it
    run_folder.write_json(old / "state.json", state)
    for command in (["evaluate", str(old)], ["export", str(old), str(tmp_path / "out")],
                    ["predict", str(old), str(SAMPLE_DIR / "cifar100_00_49.png")]):
        assert main(command) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "was trained by an earlier version of this project" in errors[0]
    config = Config.load(old / "config.json").replace(runs_dir=str(tmp_path), name="old")
    with pytest.raises(RunError, match="earlier version of this project"):
        train.Training(config)
    assert not (tmp_path / "out").exists()
