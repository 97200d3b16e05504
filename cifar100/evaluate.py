"""Test metrics of a run, its results.json, prediction on image files, and export (SavedModel, TFLite, ONNX); a
run's checkpoint and weights files, checked against its model before Keras reads them."""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import platform
import shutil
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, top_k_accuracy_score

from cifar100 import data, keras_internals, models, run_folder
from cifar100 import mining as hem
from cifar100.config import Config, DatasetError, RunError, first_line
from cifar100.keras_internals import keras  # Keras, imported without TensorFlow's start-up lines


def predict_probabilities(model: keras.Model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return keras_internals.predict(model, images, batch_size).astype(np.float64)


def basic_metrics(model: keras.Model, images: np.ndarray, labels: np.ndarray, num_classes: int,
                  batch_size: int = 256) -> dict:
    """Loss, top-1 and top-5 accuracy of `model` on a labelled set."""
    probabilities = predict_probabilities(model, images, batch_size)
    return summary_metrics(probabilities, labels, num_classes)


def summary_metrics(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    classes = np.arange(num_classes)
    k = min(5, num_classes - 1)
    clipped = np.clip(probabilities, 1e-7, 1)
    normalised = clipped / clipped.sum(axis=1, keepdims=True)  # float32 softmax sums to 1 only roughly
    return {
        "loss": round(float(log_loss(labels, normalised, labels=classes)), 4),
        "top1": round(float(accuracy_score(labels, probabilities.argmax(1))), 4),
        "top5": round(float(top_k_accuracy_score(labels, probabilities, k=k, labels=classes)), 4),
        "images": int(len(labels)),
    }


def detailed_metrics(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str],
                     fine_to_coarse: np.ndarray | None = None, coarse_names: list[str] | None = None,
                     top_pairs: int = 10) -> dict:
    """Everything the report shows: summary metrics, per_class recall, the most confused pairs and, with
    superclasses, `superclass_accuracy` (right when in the true superclass) and both accuracies per superclass."""
    num_classes = len(class_names)
    predicted = probabilities.argmax(1)
    matrix = confusion_matrix(labels, predicted, labels=np.arange(num_classes))
    support = matrix.sum(1)
    per_class = np.divide(np.diag(matrix), support, out=np.full(num_classes, np.nan), where=support > 0)
    result = summary_metrics(probabilities, labels, num_classes)
    result["per_class"] = {name: _round(v) for name, v in zip(class_names, per_class, strict=False)}
    off_diagonal = matrix.copy()
    np.fill_diagonal(off_diagonal, 0)
    order = np.argsort(-off_diagonal, axis=None)[:top_pairs]
    result["most_confused"] = [
        {"true": class_names[t], "predicted": class_names[p], "count": int(off_diagonal[t, p])}
        for t, p in zip(*np.unravel_index(order, off_diagonal.shape), strict=False) if off_diagonal[t, p] > 0
    ]
    if fine_to_coarse is not None and coarse_names:
        true_coarse, predicted_coarse = fine_to_coarse[labels], fine_to_coarse[predicted]
        result["superclass_accuracy"] = round(float(np.mean(true_coarse == predicted_coarse)), 4)
        result["per_superclass"] = {}
        for index, name in enumerate(coarse_names):
            members = true_coarse == index
            if members.any():
                result["per_superclass"][name] = {
                    "fine_top1": round(float(np.mean(predicted[members] == labels[members])), 4),
                    "superclass_accuracy": round(float(np.mean(predicted_coarse[members] == index)), 4),
                    "images": int(members.sum()),
                }
    return result


def _round(value: float):
    return None if np.isnan(value) else round(float(value), 4)


def load_run(run_dir: str | Path, model: keras.Model | None = None) -> tuple[Config, keras.Model, dict]:
    """The config, the best checkpoint and the class information of a run folder, each checked. `model`: the
    run's model as built (a model edited in the notebook), to load the checkpoint's weights into."""
    run_dir = Path(run_dir)
    for name in ("config.json", "best.keras", "classes.json"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name} not found: is {run_dir} a finished run folder?")
    run_folder.refuse_links(run_dir)
    run_folder.check_model_format(run_dir)
    config = Config.load(run_dir / "config.json")
    classes = data.read_classes(run_dir)
    model = load_checkpoint(run_dir / "best.keras", config, len(classes["class_names"]), model)
    return config, model, classes


def load_checkpoint(path: Path, config: Config, num_classes: int, model: keras.Model | None = None) -> keras.Model:
    """The run's model built from its (checked) settings (or `model`), with the weights of the .keras file at
    `path` (not the file's own model description, so a foreign file cannot make Keras build anything). A file
    that is not this run's model is a RunError naming it."""
    if model is not None:
        return _load_weights(path, model)
    if config.model:
        raise RunError(f"{path.parent}: holds a model edited in a notebook (setting model={config.model}), which "
                       "cifar100/models.py cannot build: load it in that notebook (evaluate.load_run(run_dir, "
                       "model=the edited model)), or with keras.saving.load_model in code of your own if you "
                       "trust the file")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(models.precision_policy(config.mixed_precision))
    try:
        model = models.build_model(config.replace(weights=None), num_classes)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return _load_weights(path, model)


def _load_weights(path: Path, model: keras.Model) -> keras.Model:
    _check_archive(path, weight_bytes(model))
    damaged = f"{path}: not this run's model (damaged, or not what its config.json describes)"
    with warnings.catch_warnings():  # Keras warns about each part of a file that does not fit
        warnings.simplefilter("ignore")
        try:
            model.load_weights(path)
        except Exception as exc:  # a damaged file can make Keras' loader fail in any way
            raise RunError(f"{damaged}: loading it failed with {type(exc).__name__}: {first_line(exc)}; "
                           "restore it, or train the run again in a new run folder") from None
    return model


def _check_archive(path: Path, expected_bytes: int) -> None:
    """Refuse, before Keras reads it, a .keras file holding more than the model needs."""
    damaged = f"{path}: damaged or not a Keras model file"
    limit = 2 * expected_bytes + MAX_WEIGHTS_SLACK
    with data.open_regular(path) as handle:
        if not zipfile.is_zipfile(handle):
            raise RunError(f"{damaged}: not a zip archive, as a .keras file is (truncated?)")
        try:
            with zipfile.ZipFile(handle) as archive:
                members = archive.infolist()
                total = sum(member.file_size for member in members)
                if len(members) > 64 or total > limit:
                    raise RunError(f"{path}: holds {len(members)} files of {total} bytes, more than this run's "
                                   f"model needs ({limit} bytes): not this run's model")
                raw = archive.read("model.weights.h5")
        except (zipfile.BadZipFile, KeyError, OSError, ValueError, RuntimeError) as exc:
            raise RunError(f"{damaged}: {type(exc).__name__}: {first_line(exc)}") from None
    check_weights(raw, expected_bytes, path)


def weight_bytes(model) -> int:
    """The bytes of a model's weights: what a weights file of it holds."""
    return sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in model.weights)


MAX_WEIGHTS_SLACK = 16 << 20  # what a weights or .keras file may hold beyond the arrays: its names and metadata


def check_weights(raw: bytes, expected_bytes: int, where: Path) -> None:
    """Refuse HDF5 weights (bytes) whose arrays exceed what a model of `expected_bytes` needs: h5py allocates an
    array as large as the file declares, however small the (compressed) file is."""
    import h5py

    arrays = []
    try:
        with h5py.File(io.BytesIO(raw), "r") as weights:
            weights.visititems(lambda name, item: arrays.append(item.size * item.dtype.itemsize)
                               if isinstance(item, h5py.Dataset) else None)
    except (OSError, ValueError, RuntimeError) as exc:
        raise RunError(f"{where}: damaged weights file ({type(exc).__name__}: {first_line(exc)})"
                       ) from None
    if sum(arrays) > 2 * expected_bytes + MAX_WEIGHTS_SLACK:
        raise RunError(f"{where}: its weights file holds {sum(arrays)} bytes of arrays, more than this run's model "
                       f"needs ({expected_bytes} bytes): not this run's model")


def check_weights_file(path: Path, model, copies: int = 1) -> None:
    """`check_weights` for a .weights.h5 file before loading it into `model`: `copies` 3 for a backup (Adam's two)."""
    expected = copies * weight_bytes(model)
    check_weights(run_folder.read_bytes(path, "weights file", 2 * expected + MAX_WEIGHTS_SLACK), expected, path)


def evaluate_run(run_dir: str | Path, data_dir: str | Path | None = None,
                 dataset: data.Dataset | None = None, model: keras.Model | None = None) -> dict:
    """Test metrics of the run's best checkpoint on `dataset`, or `data_dir` (default: the run's). Only on the
    run's own data are they written into results.json, with test_predictions.npz."""
    run_dir = Path(run_dir)
    config, model, classes = load_run(run_dir, model)
    dataset = dataset or data.load(data_dir or config.data_dir)
    if dataset.num_classes != len(classes["class_names"]):
        raise DatasetError(f"{dataset.path}: the dataset has {dataset.num_classes} classes ({dataset.kind}), but "
                           f"the run {run_dir} was trained on {len(classes['class_names'])}: evaluate it on a "
                           f"dataset of its own classes (--data)")
    if classes["class_names"] != dataset.class_names:
        raise DatasetError(f"{dataset.path}: the dataset names its classes otherwise than the run {run_dir} (its "
                           "classes.json): evaluate it on a dataset of its own classes (--data)")
    probabilities = predict_probabilities(model, dataset.x_test, models.inference_batch_size(config))
    # the superclasses are the dataset's (a run folder's classes.json only names them)
    metrics = detailed_metrics(probabilities, dataset.y_test, dataset.class_names, dataset.fine_to_coarse,
                               dataset.coarse_names)
    # flip test-time augmentation, reported beside (never instead of) the plain numbers
    mirrored = predict_probabilities(model, dataset.x_test[:, :, ::-1], models.inference_batch_size(config))
    metrics["flip_tta"] = summary_metrics((probabilities + mirrored) / 2, dataset.y_test, dataset.num_classes)
    if Path(dataset.path).resolve() != Path(config.data_dir).resolve():
        return metrics
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=probabilities.astype(np.float16), labels=dataset.y_test)
    run_folder.write_atomic(run_dir / "test_predictions.npz", buffer.getvalue())
    results_path = run_dir / "results.json"
    results = run_folder.read_json(results_path) if results_path.exists() else {}
    results["test"] = metrics
    known = results.get("data") if isinstance(results.get("data"), dict) else {}
    results["data"] = {**known, "kind": dataset.kind, "path": str(dataset.path), "synthetic": dataset.synthetic,
                       "official": dataset.official}
    run_folder.write_json(results_path, results)
    return metrics


def load_image(path: str | Path) -> np.ndarray:
    """A PNG or JPEG -> a 32x32 RGB uint8 image; anything else (a decompression bomb too) is a DatasetError."""
    from PIL import Image

    with data.open_regular(path) as handle, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(handle) as image:
                image = _eight_bits(image, path).convert("RGB")
                if image.size != (32, 32):
                    image = image.resize((32, 32), Image.Resampling.BOX if min(image.size) >= 32 else
                                         Image.Resampling.BICUBIC)
                return np.asarray(image, dtype=np.uint8)
        except DatasetError:
            raise
        except Exception as exc:  # a broken or hostile file can make a decoder fail in any way
            raise DatasetError(f"{path}: cannot read as an image ({type(exc).__name__}: "
                               f"{first_line(exc)})") from None


def _eight_bits(image, path):
    """16-bit greyscale scaled to 8 bits (Pillow's RGB conversion clips it: a dark image came out white); a 32-bit
    integer or a floating-point image, whose range no format defines, is refused."""
    from PIL import Image

    if image.mode.startswith("I;16") or (image.mode == "I" and image.format in ("PNG", "PPM")):  # 16 bits at most
        return Image.fromarray(np.rint(np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    if image.mode in ("I", "F"):
        raise DatasetError(f"{path}: a {'32-bit integer' if image.mode == 'I' else 'floating-point'} image, whose "
                           "range of values is not defined: save it with 8 or 16 bits per channel (PNG, JPEG)")
    return image


def predict_files(run_dir: str | Path, paths: list[str | Path],
                  top: int = 5) -> list[list[tuple[str, float]] | DatasetError]:
    """The top (class, probability) pairs of each image file; an unreadable file's DatasetError in its place."""
    config, model, classes = load_run(run_dir)
    loaded = []
    for path in paths:
        try:
            loaded.append(load_image(path))
        except DatasetError as exc:
            loaded.append(exc)
    readable = [image for image in loaded if isinstance(image, np.ndarray)]
    batch = models.inference_batch_size(config)
    rows = iter(predict_probabilities(model, np.stack(readable), batch) if readable else [])
    names = classes["class_names"]
    return [item if isinstance(item, DatasetError) else _top_classes(next(rows), names, top) for item in loaded]


def _top_classes(probabilities: np.ndarray, names: list[str], top: int) -> list[tuple[str, float]]:
    return [(names[c], float(probabilities[c])) for c in np.argsort(-probabilities)[:top]]


# --- export for serving --------------------------------------------------------------------------------

EXPORT_TOLERANCE = 1e-4  # the largest difference in any probability from the Keras model's, for each format


def export_run(run_dir: str | Path, out_dir: str | Path, images: np.ndarray | None = None) -> dict:
    """Write the run's inference model to a new folder `out_dir`: saved_model/ (signature `serve`: uint8 images
    -> probabilities), model.tflite, model.onnx (with tf2onnx and onnxruntime), classes.json and export.json (each
    form against `model.predict` on `images`, default 256 test images). A form whose top-1 differs, or whose
    probabilities differ by more than EXPORT_TOLERANCE, is an error and nothing is left."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        raise RunError(f"{out_dir} exists: export writes a new folder; name another one, or delete that one")
    config, model, classes = load_run(run_dir)
    images, source = (images, "the images given") if images is not None else _export_check_images(config)
    expected = predict_probabilities(model, images, models.inference_batch_size(config)).astype(np.float32)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        written = _export_formats(model, partial)
        run_folder.write_json(partial / "classes.json", classes)
        checks = {}
        for form, path in written.items():
            got = run_exported(path, images)
            checks[form] = {"file": path.name, "max_probability_difference": float(np.max(np.abs(got - expected))),
                            "top1_agrees": float(np.mean(got.argmax(1) == expected.argmax(1)))}
            if checks[form]["top1_agrees"] < 1 or checks[form]["max_probability_difference"] > EXPORT_TOLERANCE:
                raise RunError(f"{run_dir}: the exported {form} does not give the Keras model's predictions on "
                               f"{len(images)} images ({source}): {checks[form]}; nothing was written")
        report = {"run": str(run_dir), "checked_on": f"{len(images)} images ({source})", "formats": checks,
                  "keras": keras.__version__}
        run_folder.write_json(partial / "export.json", report)
        os.rename(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return report


def _export_formats(model: keras.Model, folder: Path) -> dict[str, Path]:
    """Keras' own exports of `model` into `folder`; ONNX only where its converter and runtime are installed."""
    model.export(folder / "saved_model", format="tf_saved_model", verbose=False)
    model.export(folder / "model.tflite", format="litert", verbose=False)
    written = {"saved_model": folder / "saved_model", "tflite": folder / "model.tflite"}
    if importlib.util.find_spec("tf2onnx") and importlib.util.find_spec("onnxruntime"):
        logging.getLogger("tf2onnx").setLevel(logging.CRITICAL)  # its optimiser logs the passes it skips
        with warnings.catch_warnings():  # Keras' tf2onnx patch asks numpy for np.object
            warnings.simplefilter("ignore", FutureWarning)
            model.export(folder / "model.onnx", format="onnx", verbose=False)
        written["onnx"] = folder / "model.onnx"
    return written


def run_exported(path: Path, images: np.ndarray) -> np.ndarray:
    """Probabilities from an exported model (a SavedModel folder, a .tflite or an .onnx file) for uint8 images."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, {session.get_inputs()[0].name: images})[0], dtype=np.float32)
    import tensorflow as tf

    if path.suffix == ".tflite":
        with warnings.catch_warnings():  # tf.lite.Interpreter's notice that LiteRT will replace it
            warnings.simplefilter("ignore")
            interpreter = tf.lite.Interpreter(model_path=str(path))
        source = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(source, images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(source, images)
        interpreter.invoke()
        return np.asarray(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), dtype=np.float32)
    loaded = tf.saved_model.load(str(path))  # kept while it runs: its function refers to its variables
    return np.asarray(loaded.serve(images), dtype=np.float32)


def _export_check_images(config: Config, count: int = 256) -> tuple[np.ndarray, str]:
    """Up to `count` of the run's test images; random images where its dataset cannot be read here."""
    try:
        dataset = data.load(config.data_dir)
        return dataset.x_test[:count], f"the first of the test set in {config.data_dir}"
    except (DatasetError, OSError):
        random = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        return random, f"random images: the dataset {config.data_dir} could not be read"


# --- results.json: what a finished run reports -----------------------------------------------------------

def write_results(config: Config, run_dir: Path, splits, seconds: float, model: keras.Model | None = None) -> dict:
    """Evaluate the best checkpoint on validation and (once) on test; write results.json. `model`: the run's
    model as built, when models.py cannot build it (an edited model)."""
    best = load_checkpoint(run_dir / "best.keras", config, splits.dataset.num_classes, model)
    val = basic_metrics(best, splits.x_val, splits.y_val, splits.dataset.num_classes,
                                 models.inference_batch_size(config))
    rows = run_folder.history_rows(run_dir)
    state = run_folder.read_state(run_dir)
    # the speed of training on images (phase 1 on cached features trains on features, not images)
    image_rows = rows[state.get("head_epochs_done", 0):] if config.head_features == "cached" else rows
    speeds = [float(r["train_images_per_second"]) for r in image_rows if r.get("train_images_per_second")]
    feature_seconds = float(state.get("head_feature_seconds") or 0)
    activation_seconds = float(state.get("finetune_activation_seconds") or 0)
    results = {
        "run": config.run_name(),
        "backbone": config.backbone,
        "image_size": config.image_size,
        "data": {"kind": splits.dataset.kind, "path": str(splits.dataset.path), "synthetic": splits.dataset.synthetic,
                 "official": splits.dataset.official, "classes": splits.dataset.num_classes,
                 "train_images": int(len(splits.train_indices)), "val_images": int(len(splits.val_indices)),
                 "test_images": int(len(splits.dataset.y_test))},
        "validation": val,
        "epochs_run": len(rows),
        "best_epoch": int(rows[int(np.argmax([float(r["val_accuracy"]) for r in rows]))]["epoch"]) if rows else None,
        "wall_seconds_this_process": round(seconds, 1),
        "train_seconds_total": round(feature_seconds + activation_seconds
                                     + sum(float(r["epoch_seconds"]) for r in rows if r.get("epoch_seconds")), 1),
        "head_feature_seconds": feature_seconds or None,
        "finetune_activation_seconds": activation_seconds or None,
        "seconds_outside_steps_per_epoch": _mean(r.get("other_seconds") for r in image_rows),
        # what each phase's optimiser was given (after any scaling asked with reference_batch_size)
        "optimization": {phase: state.get(f"{phase}_compiled") for phase in ("head", "finetune")},
        "train_images_per_second": round(float(np.median(speeds)), 1) if speeds else None,
        "mining": _mining_totals(config, rows),
        "environment": environment(),
    }
    if config.hem:  # the hardest training examples for the best model, to be shown
        indices, losses = hem.hardest_examples(best, splits.x_train, splits.y_train, config.hem_fraction,
                                               config.hem_keep, config.seed, models.inference_batch_size(config))
        predicted = predict_probabilities(best, splits.x_train[indices], models.inference_batch_size(config)).argmax(1)
        results["hardest_examples"] = {"train_set_indices": splits.train_indices[indices].tolist(),
                                       "labels": splits.y_train[indices].tolist(),
                                       "predicted": predicted.tolist(),
                                       "losses": [round(float(v), 4) for v in losses]}
    run_folder.write_json(run_dir / "results.json", results)
    results["test"] = evaluate_run(run_dir, dataset=splits.dataset, model=model)  # the test set, once, at the end
    return results


def _mining_totals(config: Config, rows: list[dict]) -> dict | None:
    """What hard-example mining did: its counters summed over the run, and the mean backpropagated fraction
    over the epochs that backpropagated (not phase 1 on cached features)."""
    if not config.hem:
        return None
    totals = {key: sum(float(r.get(key) or 0) for r in rows) for key in hem.COUNTERS}
    fractions = [float(r.get("backprop_fraction") or 0) for r in rows if float(r.get("examples_backprop") or 0) > 0]
    return {"mode": config.hem_mode, **{k: round(v, 1) if k.endswith("seconds") else int(v) for k, v in totals.items()},
            "backprop_fraction": round(float(np.mean(fractions)), 4) if fractions else None}


def _mean(values) -> float | None:
    numbers = [float(v) for v in values if v not in (None, "")]
    return round(float(np.mean(numbers)), 2) if numbers else None


def environment() -> dict:
    versions = {}
    for name in ("tensorflow", "jax"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = module.__version__
    return {"python": sys.version.split()[0], "keras": keras.__version__, "backend": keras.backend.backend(),
            **versions, "numpy": np.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "gpus": models.gpu_names() or None,
            "device": ", ".join(models.gpu_names()) or f"CPU ({os.cpu_count()} cores)"}
