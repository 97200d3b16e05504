"""What a finished run reports: the best checkpoint evaluated on validation and (once) on the test set, the
speed and cost of training, the environment; written to the run folder's results.json."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np

from cifar100 import mining as hem
from cifar100 import models, run_folder
from cifar100.config import Config
from cifar100.tflogs import keras  # Keras, imported without TensorFlow's start-up lines


def write(config: Config, run_dir: Path, splits, seconds: float) -> dict:
    """Evaluate the best checkpoint on validation and (once) on test; write results.json."""
    from cifar100 import evaluate

    best = evaluate.load_checkpoint(run_dir / "best.keras", config, splits.dataset.num_classes)
    val = evaluate.basic_metrics(best, splits.x_val, splits.y_val, splits.dataset.num_classes,
                                 models.inference_batch_size(config))
    rows = run_folder.history_rows(run_dir)
    state = run_folder.read_state(run_dir)
    # the speed of training on images (phase 1 on cached features trains on features, not images)
    image_rows = rows[state.get("head_epochs_done", 0):] if config.head_features == "cached" else rows
    speeds = [float(r["train_images_per_second"]) for r in image_rows if r.get("train_images_per_second")]
    feature_seconds = float(state.get("head_feature_seconds") or 0)
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
        "train_seconds_total": round(feature_seconds + sum(float(r["epoch_seconds"]) for r in rows
                                                           if r.get("epoch_seconds")), 1),
        "head_feature_seconds": feature_seconds or None,
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
        predicted = best.predict(splits.x_train[indices], batch_size=models.inference_batch_size(config),
                                 verbose=0).argmax(1)
        results["hardest_examples"] = {"train_set_indices": splits.train_indices[indices].tolist(),
                                       "labels": splits.y_train[indices].tolist(),
                                       "predicted": predicted.tolist(),
                                       "losses": [round(float(v), 4) for v in losses]}
    run_folder.write_json(run_dir / "results.json", results)
    results["test"] = evaluate.evaluate_run(run_dir, dataset=splits.dataset)  # the test set, once, at the end
    return results


def _mining_totals(config: Config, rows: list[dict]) -> dict | None:
    """What hard-example mining did over the run: examples and seconds of its scoring and training passes,
    and the mean fraction of an epoch's examples backpropagated, over the epochs it trained (not phase 1 on
    cached features, which logs 0). Only the counters are summed (not the scoring pass's loss or accuracy)."""
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
