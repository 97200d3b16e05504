"""A model file loaded safely, the test metrics of a run, predictions on image files, and export (SavedModel and
TFLite, each checked against Keras' own predictions)."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from cifar100 import data, runs
from cifar100.config import Config, DatasetError, RunError, printable, shown
from cifar100.keras_fixes import keras
from cifar100.safe_pickle import open_regular

MAX_MODEL_BYTES = 2 << 30
MEMBERS = {"config.json", "metadata.json", "model.weights.h5"}
MAX_ACTIVATION_BYTES = 1 << 30  # per image and layer: Xception at 299 px needs 11 MB
SLACK = 16 << 20  # what a weights file holds beyond its arrays: names and metadata


def _keras_classes_only(node, path: Path) -> None:
    """Refuse a model config naming anything but Keras' own classes (a Lambda layer or a function runs code)."""
    if isinstance(node, dict):
        module, name = node.get("module"), node.get("class_name")
        special = isinstance(name, str) and name.startswith("__") and name != "__lambda__"  # a tensor, a tuple
        keras_own = isinstance(module, str) and (module == "keras" or module.startswith("keras."))
        if "class_name" in node and not special and (not keras_own or node.get("registered_name") not in (None, name)):
            raise RunError(f"{path}: names {shown(module)}.{shown(name)}, not one of Keras' own classes (a Lambda, a "
                           "function or a class of one's own would run its code): refused")
        for value in node.values():
            _keras_classes_only(value, path)
    elif isinstance(node, list):
        for value in node:
            _keras_classes_only(value, path)


def _uncompiled(node):
    """A model config without its compile configs (a nested model that `fit` trained, such as phase 1's head,
    keeps one, and building its optimizer would allocate)."""
    if isinstance(node, dict):
        return {key: _uncompiled(value) for key, value in node.items() if key != "compile_config"}
    return [_uncompiled(value) for value in node] if isinstance(node, list) else node


def _all_layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _all_layers(layer)


def load_model(path: str | Path) -> keras.Model:
    """A .keras model file from anywhere, after cheap checks: a regular zip file; only Keras' own classes in its
    config; a uint8 (32, 32, 3) input; and variables, built without allocating, that need no more bytes than its
    weights file stores, and layer outputs of at most 1 GiB an image. Then Keras loads it in safe mode. Each
    refusal is one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: not found (is {path.parent} a run folder whose training has finished an epoch?)")
    raw = runs.read_file(path, MAX_MODEL_BYTES)
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            members = archive.infolist()
            sizes = {info.filename: info.file_size for info in members}
            if not {"config.json", "model.weights.h5"} <= set(sizes) <= MEMBERS or sum(sizes.values()) > len(raw) \
                    or any(info.compress_type != zipfile.ZIP_STORED for info in members):
                raise RunError(f"{path}: not a Keras model file as Keras writes it ({', '.join(MEMBERS)}, stored "
                               f"uncompressed); found {printable(sorted(sizes))[:120]}")
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, ValueError, RecursionError) as exc:
        raise RunError(f"{path}: damaged or not a .keras file ({printable(exc)[:80]})") from None
    _keras_classes_only(config, path)
    try:
        with keras.StatelessScope(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = keras.saving.deserialize_keras_object(_uncompiled(config), safe_mode=True)
            needed = sum(math.prod(w.shape) * np.dtype(w.dtype).itemsize for w in model.weights)
            shape, dtype = tuple(model.inputs[0].shape), model.inputs[0].dtype
            largest = max((math.prod(layer.output.shape[1:]) for layer in _all_layers(model)
                           if hasattr(layer, "output") and None not in layer.output.shape[1:]), default=0)
    except RunError:
        raise
    except Exception as exc:  # a damaged config can fail Keras in any way
        raise RunError(f"{path}: its model cannot be built ({type(exc).__name__}: {printable(exc)[:120]})") from None
    if shape != (None, 32, 32, 3) or dtype != "uint8":
        raise RunError(f"{path}: takes {dtype} images of shape {shape}, not this project's uint8 (None, 32, 32, 3)")
    if largest * 4 > MAX_ACTIVATION_BYTES:
        raise RunError(f"{path}: a layer of its model outputs {largest:,} numbers an image (more than "
                       f"{MAX_ACTIVATION_BYTES >> 20} MiB): refused")
    if needed > sizes["model.weights.h5"] + SLACK:
        raise RunError(f"{path}: its model declares {needed:,} bytes of weights, its file stores "
                       f"{sizes['model.weights.h5']:,}: refused")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return keras.saving.load_model(path, safe_mode=True)
    except Exception as exc:
        raise RunError(f"{path}: Keras could not load it ({type(exc).__name__}: {printable(exc)[:120]})") from None


def results(model: keras.Model, dataset: data.Dataset, validation: tuple, history: list) -> dict:
    """What results.json holds: validation and test top-1 and top-5, per class and superclass accuracy, the test
    predictions (for the figures), and the training speed."""
    def scores(images, labels):
        probabilities = model.predict(images, batch_size=128, verbose=0)
        top5 = np.argsort(-probabilities, axis=1)[:, :5]
        return probabilities.argmax(1), float(np.mean(top5[:, 0] == labels)), float(np.mean(
            (top5 == labels[:, None]).any(1)))

    _, val_top1, val_top5 = scores(*validation)
    predicted, top1, top5 = scores(dataset.x_test, dataset.y_test)
    hits = predicted == dataset.y_test
    test = {"top1": top1, "top5": top5, "per_class": [float(hits[dataset.y_test == c].mean()) if np.any(
        dataset.y_test == c) else None for c in range(dataset.num_classes)]}
    if dataset.superclass is not None:
        test["superclass"] = float(np.mean(dataset.superclass[predicted] == dataset.superclass[dataset.y_test]))
    seconds = sum(row.get("seconds", 0) for row in history)
    examples = sum(row.get("examples", 0) for row in history)
    from cifar100.distribute import gpus

    data_info = {"name": dataset.name, "classes": dataset.num_classes, "class_names": dataset.class_names}
    return {"data": data_info, "validation": {"top1": val_top1, "top5": val_top5}, "test": test,
            "test_predictions": predicted.tolist(), "seconds": seconds,
            "epochs": len(history), "train_images_per_second": examples / seconds if seconds else 0.0,
            "device": ", ".join(str(g.name) for g in gpus()) or f"CPU ({os.cpu_count()} cores)"}


def load_image(path: str | Path) -> np.ndarray:
    """A PNG or JPEG of any size as a 32x32 RGB uint8 image (16-bit images scaled); anything else is one line."""
    from PIL import Image

    with open_regular(Path(path), 64 << 20) as handle, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(handle) as image:
                if image.mode in ("I", "I;16", "I;16B", "I;16L") and image.format in ("PNG", "PPM"):
                    image = Image.fromarray((np.asarray(image, np.float64) / 257).round().clip(0, 255).astype("uint8"))
                elif image.mode in ("I", "F"):
                    raise DatasetError(f"{path}: 32-bit or floating-point pixels, of no defined range: save it "
                                       "with 8 or 16 bits a channel")
                return np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BOX), dtype=np.uint8)
        except DatasetError:
            raise
        except Exception as exc:  # a broken or hostile file can fail a decoder in any way
            raise DatasetError(f"{path}: cannot read as an image ({type(exc).__name__}: {printable(exc)[:80]})"
                               ) from None


def class_names(run_dir: str | Path) -> list[str]:
    """The class names a finished run's results.json records."""
    path = Path(run_dir) / "results.json"
    names = runs.read_json(path).get("data", {}).get("class_names")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise RunError(f"{path}: no list of class names under data.class_names (a run of an earlier version?)")
    return [shown(name, 40).strip("'") for name in names]


def run_config(run_dir: Path) -> Config:
    return Config.from_dict(runs.read_json(Path(run_dir) / "config.json"), f"{Path(run_dir) / 'config.json'}")


def export(run_dir: str | Path, out_dir: str | Path, images: np.ndarray | None = None) -> dict:
    """best.keras as a SavedModel (signature `serve`: uint8 images -> probabilities) and a TFLite file in a new
    folder, each checked against Keras' predictions on `images` (default: 64 random images); a format that
    disagrees is an error and nothing is left."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists():
        raise RunError(f"{out_dir}: exists; export writes a new folder")
    model = load_model(run_dir / "best.keras")
    if images is None:
        images = np.random.default_rng(0).integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    expected = model.predict(images, verbose=0)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.export(partial / "saved_model", format="tf_saved_model", verbose=False)
        model.export(partial / "model.tflite", format="litert", verbose=False)
        report = {}
        for name in ("saved_model", "model.tflite"):
            difference = float(np.max(np.abs(run_exported(partial / name, images) - expected)))
            if difference > 1e-4:
                raise RunError(f"{run_dir}: the exported {name} differs from the Keras model by {difference:.2g}")
            report[name] = {"max_probability_difference": difference, "checked_on": len(images)}
        runs.write_json(partial / "export.json", report)
        os.rename(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return report


def run_exported(path: Path, images: np.ndarray) -> np.ndarray:
    """Probabilities from an exported SavedModel folder or .tflite file for uint8 images."""
    import tensorflow as tf

    images = np.ascontiguousarray(images, dtype=np.uint8)
    if path.suffix == ".tflite":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interpreter = tf.lite.Interpreter(model_path=str(path))
        source = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(source, images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(source, images)
        interpreter.invoke()
        return np.asarray(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
    loaded = tf.saved_model.load(str(path))
    return np.asarray(loaded.serve(images))
