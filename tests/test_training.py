"""main.ipynb's recipe end to end on SYNTHETIC data: a run, found again, resumed after a kill, an edited recipe
in a folder of its own, hard-example mining, refusals that leave nothing behind."""

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
import types

import matplotlib
import numpy as np
import pytest

from cifar100 import batches, callbacks, data, notebook
from cifar100.keras_fixes import keras
from tests.conftest import ROOT, run_cli

matplotlib.use("Agg")
SMALL = {"max_train_images": 300, "finetune_epochs": 2, "augment": "basic", "dropout": 0.2, "hem": True}


def run_notebook(data_dir, runs_dir, path=notebook.NOTEBOOK):
    parameters = {"PRESET": "smoke", "DATA_DIR": str(data_dir), "RUNS_DIR": str(runs_dir), "VERBOSE": 0,
                  "DOWNLOAD": False, "SETTINGS": SMALL}
    return notebook.run(parameters, path)


def history(run_dir):
    with open(run_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


def cli_train(data_dir, runs_dir):
    sets = [f"--set={key}={value}" for key, value in SMALL.items()]
    return [sys.executable, "-m", "cifar100", "train", "--preset", "smoke", "--data", str(data_dir),
            f"--set=runs_dir={runs_dir}", *sets]


def run_folder(runs_dir):
    return next(path for path in runs_dir.iterdir() if path.is_dir())


@pytest.fixture(scope="module")
def finished(synthetic_cifar100, tmp_path_factory):
    """A run trained from start to end by the command line, uninterrupted."""
    runs_dir = tmp_path_factory.mktemp("finished")
    subprocess.run(cli_train(synthetic_cifar100, runs_dir), check=True, capture_output=True, cwd=ROOT)
    return run_folder(runs_dir)


@pytest.mark.slow
def test_a_run_saves_a_plain_keras_model_and_the_same_run_is_found_again(synthetic_cifar100, finished, tmp_path):
    results = json.loads((finished / "results.json").read_text())
    assert results["data"]["name"] == "SYNTHETIC data in the CIFAR-100 format"
    assert [row["phase"] for row in history(finished)] == ["head"] + ["finetune"] * SMALL["finetune_epochs"]
    assert list((finished / "logs").glob("events.out.tfevents.*"))  # TensorBoard's, written with each epoch
    loaded = keras.saving.load_model(finished / "best.keras")  # plain Keras, no project code
    predicted = loaded.predict(data.load(synthetic_cifar100).x_test, verbose=0).argmax(1)
    assert predicted.tolist() == results["test_predictions"]
    shutil.copytree(finished.parent, tmp_path / "runs")
    saved = (tmp_path / "runs" / finished.name / "checkpoint.npz").stat().st_mtime_ns
    again = run_notebook(synthetic_cifar100, tmp_path / "runs")  # in a notebook: the same settings and recipe
    assert again["run"].dir == tmp_path / "runs" / finished.name
    assert again["run"].dir.joinpath("checkpoint.npz").stat().st_mtime_ns == saved  # nothing trained


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_result(synthetic_cifar100, finished, tmp_path):
    process = subprocess.Popen(cli_train(synthetic_cifar100, tmp_path), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("*/history.csv")) or len(history(run_folder(tmp_path))) < 2:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # in phase 2, after its first epoch
    process.wait()
    assert not (run_folder(tmp_path) / "results.json").exists()
    subprocess.run(cli_train(synthetic_cifar100, tmp_path), check=True, capture_output=True, cwd=ROOT)
    whole, resumed = history(finished), history(run_folder(tmp_path))
    assert len(resumed) == len(whole) == 1 + SMALL["finetune_epochs"]
    for a, b in zip(whole, resumed, strict=True):
        for key in ("loss", "val_loss", "val_accuracy", "learning_rate"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), (a["epoch"], key)


@pytest.mark.slow
def test_an_edited_phase_2_trains_in_a_folder_of_its_own_from_phase_1s_checkpoint(synthetic_cifar100, finished,
                                                                                   tmp_path):
    shutil.copytree(finished.parent, tmp_path / "runs")
    edited = tmp_path / "edited.ipynb"
    text = notebook.NOTEBOOK.read_text()
    old = "training_model.compile(optimizer=optimizer(config.finetune_learning_rate"
    assert old in text
    edited.write_text(text.replace(old, "training_model.compile(optimizer=keras.optimizers.SGD(0.01) or ("
                                        "config.finetune_learning_rate"))
    again = run_notebook(synthetic_cifar100, tmp_path / "runs", path=edited)["run"].dir
    assert again != tmp_path / "runs" / finished.name and again.parent == tmp_path / "runs"
    recipe = json.loads((again / "recipe.json").read_text())
    assert recipe["finetune"]["optimizer"].startswith("SGD(") and recipe["head"] == json.loads(
        (finished / "recipe.json").read_text())["head"]
    head_rows = [row for row in history(finished) if row["phase"] == "head"]
    assert [row for row in history(again) if row["phase"] == "head"] == head_rows  # carried, not trained again
    assert (again / "best.keras").exists() and (again / "results.json").exists()


def test_hard_example_mining_weights_the_examples_of_larger_cross_entropy_up():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    x = np.random.default_rng(0).normal(size=(200, 4)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, size=200)
    train = batches.TrainBatches(x, y, 3, 32, weighted=True)
    mining = callbacks.HardExampleMining(train, fraction=1.0, strength=1.0, floor=0.5)
    mining.set_model(model)
    mining.on_epoch_end(0, {})
    losses = callbacks.cross_entropy(model.predict(x, verbose=0), y)
    assert np.corrcoef(losses, train.weights)[0, 1] > 0.99
    assert train.weights.mean() == pytest.approx(1.0, abs=1e-4) and train.weights.min() >= 0.5 - 1e-6
    assert train[0][2].shape == (32,)  # the weights reach fit with each batch


def test_each_epoch_reads_another_order_and_the_same_epoch_the_same_one():
    train = batches.TrainBatches(np.zeros((100, 32, 32, 3), np.uint8), np.arange(100) % 10, 10, 100, seed=3)
    orders = []
    for epoch in (0, 1, 0):
        train.set_epoch(epoch)
        orders.append(train[0][1].argmax(1))
    assert not np.array_equal(orders[0], orders[1]) and np.array_equal(orders[0], orders[2])


def test_a_refused_setting_or_missing_data_is_one_line_and_leaves_no_folder(synthetic_cifar100, tmp_path):
    bad = run_cli("train", "--preset", "smoke", "--data", str(synthetic_cifar100), "--set", "image_size=0",
                  "--set", f"runs_dir={tmp_path}")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "setting 'image_size'" in bad.stderr
    missing = run_cli("train", "--preset", "smoke", "--data", str(tmp_path / "nothing"), "--set",
                      f"runs_dir={tmp_path}")
    assert missing.returncode == 2 and "python -m cifar100 data download" in missing.stderr
    assert missing.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_a_resumed_phase_gives_each_callback_back_its_counters(tmp_path):
    saved = {"EarlyStopping0.wait": 3, "EarlyStopping0.best": 0.5, "EarlyStopping0.best_epoch": 4,
             "ReduceLROnPlateau1.wait": 1, "ReduceLROnPlateau1.best": 0.9, "ReduceLROnPlateau1.cooldown_counter": 2,
             "best": 0.7}
    run = types.SimpleNamespace(dir=tmp_path, phase="finetune", arrays={"mining": np.full(10, 2.0, np.float32)},
                                state={"phase": "finetune", "callbacks": saved})
    others = [keras.callbacks.EarlyStopping(), keras.callbacks.ReduceLROnPlateau(), callbacks.BestModel(run)]
    for callback in others:
        callback.on_train_begin()  # Keras' own reset at fit's start, before the checkpoint's
    train = batches.TrainBatches(np.zeros((10, 4)), np.arange(10) % 2, 2, 5, weighted=True)
    callbacks.RunCheckpoint(run, train, others).on_train_begin()
    assert (others[0].wait, others[0].best, others[0].best_epoch) == (3, 0.5, 4)
    assert (others[1].wait, others[1].best, others[1].cooldown_counter) == (1, 0.9, 2)
    assert others[2].best == 0.7 and train.weights.tolist() == [2.0] * 10
