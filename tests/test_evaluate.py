"""Model files from anywhere, loaded only after cheap checks; export that gives Keras' predictions; images."""

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from cifar100 import evaluate
from cifar100.config import DatasetError, RunError
from cifar100.keras_fixes import keras


def model(inputs=None, lambda_layer=False, width=4):
    inputs = keras.Input((32, 32, 3), dtype="uint8") if inputs is None else inputs
    x = keras.layers.Rescaling(1 / 255)(inputs)
    if lambda_layer:
        x = keras.layers.Lambda(lambda t: t * 2)(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(width, 3)(x))
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))


def saved(tmp_path, m, name="best.keras"):
    m.save(tmp_path / name)
    return tmp_path / name


def test_a_model_file_of_keras_own_layers_loads_and_predicts_the_same(tmp_path):
    original = model()
    loaded = evaluate.load_model(saved(tmp_path, original))
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), original.predict(images, verbose=0), atol=1e-6)


@pytest.mark.parametrize("case, message", [
    ("lambda", "not one of Keras' own classes"), ("input", "not this project's uint8"),
    ("bloated", "declares"), ("not a zip", "damaged or not a .keras file"), ("folder", "regular file"),
    ("extra member", "as Keras writes it"), ("huge layer output", "outputs")])
def test_a_model_file_that_could_run_code_or_exhaust_memory_is_refused_in_one_line(tmp_path, case, message):
    if case == "lambda":
        path = saved(tmp_path, model(lambda_layer=True))
    elif case == "input":
        path = saved(tmp_path, model(keras.Input((64, 64, 3), dtype="uint8")))
    elif case == "bloated":  # a config declaring a huge layer beside a small weights file
        path = saved(tmp_path, model())
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
            weights = archive.read("model.weights.h5")
        text = json.dumps(config).replace('"units": 10,', '"units": 10000000,')
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("config.json", text)
            archive.writestr("model.weights.h5", weights)
            archive.writestr("metadata.json", "{}")
    elif case == "extra member":  # Keras would unpack every member to disk
        path = saved(tmp_path, model())
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr("padding.bin", b"\0" * 1000)
    elif case == "huge layer output":  # Keras' own Resizing, to 100,000 px: 120 GB an image when it predicts
        inputs = keras.Input((32, 32, 3), dtype="uint8")
        outputs = keras.layers.GlobalAveragePooling2D()(keras.layers.Resizing(100_000, 100_000)(inputs))
        path = saved(tmp_path, keras.Model(inputs, outputs))
    elif case == "not a zip":
        path = tmp_path / "best.keras"
        path.write_bytes(b"not a zip file at all")
    else:
        path = tmp_path / "best.keras"
        path.mkdir()
    with pytest.raises(RunError, match=message) as error:
        evaluate.load_model(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


@pytest.mark.slow
def test_export_gives_the_keras_models_predictions_and_a_second_export_refuses_the_folder(tmp_path):
    (tmp_path / "run").mkdir()
    saved(tmp_path / "run", model())
    report = evaluate.export(tmp_path / "run", tmp_path / "out")
    assert set(report) == {"saved_model", "model.tflite"}
    assert all(check["max_probability_difference"] <= 1e-4 for check in report.values())
    assert (tmp_path / "out" / "model.tflite").is_file() and (tmp_path / "out" / "saved_model").is_dir()
    with pytest.raises(RunError, match="exists"):
        evaluate.export(tmp_path / "run", tmp_path / "out")


def test_an_image_of_any_size_and_depth_becomes_32x32_rgb_uint8(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    image = evaluate.load_image(tmp_path / "deep.png")
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert image[0, 0, 0] < 10 and image[0, -1, 0] > 245  # scaled, not clipped to white
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DatasetError, match="broken.png: cannot read as an image"):
        evaluate.load_image(tmp_path / "broken.png")
