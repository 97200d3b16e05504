import csv
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from cifar100 import data, train, write_data
from cifar100.config import ConfigError, make_config

from .conftest import SAMPLE_DIR, WEIGHTS_DIR, run_cli


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    return write_data.write_synthetic(tmp_path_factory.mktemp("train") / "cifar-100-python", n_train=2000, n_test=500)


def smoke(train_data, run_dir, **overrides):
    return make_config("smoke", {"data_dir": str(train_data), "runs_dir": str(run_dir.parent),
                                 "name": run_dir.name, **overrides})


def epochs_in(history: Path) -> list[int]:
    with open(history) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_smoke_preset_learns_the_synthetic_signal(tmp_path):
    # 10 classes: the seconds-long smoke run converges there; on 100 classes with 10 images per class its
    # test top-1 swings between about 0.08 and 0.25 from seed to seed.
    dataset = write_data.write_synthetic(tmp_path / "cifar-10", kind="cifar10", n_train=2000, n_test=500)
    run_dir = train.run(smoke(dataset, tmp_path / "smoke", hem=True), verbose=0)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["data"]["synthetic"] is True and results["data"]["classes"] == 10  # compare's top-5 needs it
    assert results["test"]["top1"] > 0.6  # chance is 0.1
    assert results["test"]["top5"] >= results["test"]["top1"]
    # random weights: no head phase, five fine-tuning epochs with every layer (BatchNorm too) training
    assert epochs_in(run_dir / "history.csv") == list(range(1, 6))  # counted from 1, as the progress bar
    assert results["optimization"]["head"] is None
    assert results["mining"]["examples_forward"] == 5 * 500  # reweight scores half of the 1,000 each epoch
    for name in ("config.json", "best.keras", "history.csv", "results.json", "classes.json"):
        assert (run_dir / name).is_file(), name
    assert results["train_images_per_second"] > 0 and results["environment"]["keras"] == keras.__version__
    assert len(results["hardest_examples"]["losses"]) == 64
    assert not (run_dir / "backup").exists()
    best = keras.saving.load_model(run_dir / "best.keras")
    test = data.load(dataset)
    accuracy = np.mean(best.predict(test.x_test, verbose=0).argmax(1) == test.y_test)
    assert abs(accuracy - results["test"]["top1"]) < 1e-3


@pytest.mark.parametrize("overrides,message", [
    ({"backbone": "vgg99"}, r"setting 'backbone': unknown backbone 'vgg99'"),
    ({"backbone": "xception", "image_size": 64}, r"setting 'image_size': 64 px is below xception's minimum .* 71"),
    ({"finetune_epochs": 0}, r"setting 'finetune_epochs' must be >= 1 and <= 100000, got 0"),
    ({"head_epochs": -1}, r"setting 'head_epochs' must be >= 1 and <= 100000, got -1"),
    ({"data_dir": "/nonexistent/cifar"}, r"setting 'data_dir': /nonexistent/cifar: dataset folder not found"),
    ({"weights": "/nonexistent/w.weights.h5"}, r"setting 'weights': file /nonexistent/w.weights.h5 not found"),
    ({"weights": "/tmp"}, r"setting 'weights': file /tmp is not a regular file"),
    ({"backbone": "mobilenetv3small", "weights": str(WEIGHTS_DIR / "mobilenet_v2_1.0_imagenet_notop.weights.h5")},
     r"setting 'weights': .* does not fit backbone 'mobilenetv3small'"),
])
def test_a_config_that_cannot_work_fails_before_training(train_data, tmp_path, overrides, message):
    if "mobilenet_v2" in str(overrides.get("weights", "")) and not (WEIGHTS_DIR).exists():
        pytest.skip("shared weights are not on this machine")
    with pytest.raises(ConfigError, match=message):
        train.run(smoke(train_data, tmp_path / "bad", **overrides), verbose=0)
    assert not (tmp_path / "bad" / "history.csv").exists()


def test_phase_1_weights_or_a_backup_of_another_model_are_named_in_one_line(train_data, tmp_path):
    """Files of a run of another dataset (10 classes, not 100): Keras' loader fails deep inside, in its words."""
    from cifar100 import models
    from cifar100.callbacks import CheckedBackupAndRestore
    from cifar100.config import RunError

    config = smoke(train_data, tmp_path / "run")
    training = train.Training(config)
    training.set_phase("head")
    assert not training.needs("head")  # random weights: phase 1 skipped, its weights saved
    training.close()
    other = models.build_model(config, num_classes=10)
    other.save_weights(config.run_dir() / "phase1.weights.h5")
    training = train.Training(config)
    training.set_phase("finetune")
    with pytest.raises(RunError, match=r"phase1.weights.h5: not phase 1's weights of this run's model \(ValueError"):
        training.data("finetune")
    training.close()

    backup = tmp_path / "backup"
    x, y = np.zeros((4, 32, 32, 3), np.uint8), np.eye(10, dtype=np.float32)[:4]
    other.compile(optimizer="adam", loss="categorical_crossentropy")
    other.fit(x, y, epochs=1, verbose=0, callbacks=[CheckedBackupAndRestore(backup)])
    files = {path.name: path.read_bytes() for path in backup.iterdir()}
    model = models.build_model(config, num_classes=100)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    with pytest.raises(RunError, match=r"backup/latest.weights.h5: not a backup of this run's model \(ValueError"):
        model.fit(x, np.eye(100, dtype=np.float32)[:4], epochs=2, verbose=0,
                  callbacks=[CheckedBackupAndRestore(backup)])
    assert {path.name: path.read_bytes() for path in backup.iterdir()} == files


def test_the_steps_of_a_phase_out_of_order_are_refused_and_train_nothing(train_data, tmp_path):
    """The notebook's steps (set_phase, data, compile, callbacks, fit, end) each refuse to run before the
    step they need."""
    from cifar100.config import RunError

    config = smoke(train_data, tmp_path / "steps")
    training = train.Training(config)
    with pytest.raises(RunError, match=r"call set_phase\('finetune'\) first"):
        training.needs("finetune")
    training.set_phase("finetune")
    with pytest.raises(RunError, match=r"run phase 'head' first"):
        training.data("finetune")
    training.set_phase("head")
    assert not training.needs("head")  # random weights: phase 1 is skipped
    training.set_phase("finetune")
    with pytest.raises(RunError, match=r"call training.data\('finetune'\) first"):
        training.callbacks("finetune")
    model, batches, validation = training.data("finetune")
    with pytest.raises(RunError, match=r"compile the model that training.data\('finetune'\) gave before fit"):
        training.callbacks("finetune")
    model.compile(keras.optimizers.SGD(0.01), keras.losses.CategoricalCrossentropy(label_smoothing=0.1))
    with pytest.raises(ConfigError, match=r"compiled otherwise than the settings say \(optimizer: SGD \(settings: "
                       r"Adam\); loss.label_smoothing: 0.1 \(settings: 0\)\)"):
        training.callbacks("finetune")  # an edited compile would train under the settings' name
    model.compile(keras.optimizers.Adam(config.finetune_learning_rate * 2), "categorical_crossentropy")
    with pytest.raises(ConfigError, match=r"optimizer.learning_rate: 0.006 \(settings: 0.003\)\)"):
        training.callbacks("finetune")
    model.compile(keras.optimizers.Adam(config.finetune_learning_rate), "categorical_crossentropy")
    assert training.callbacks("finetune")  # the settings' compile, written out by hand
    training.data("finetune")
    train.compile_model(model, train.learning_rate(config, "finetune", len(batches)), config)
    assert training.callbacks("finetune")
    training.data("finetune")  # a second attempt (a cell run again) needs a fresh compile too
    with pytest.raises(RunError, match=r"compile the model"):
        training.callbacks("finetune")
    with pytest.raises(RunError, match=r"call finish\(\) once phase 'finetune' has ended"):
        training.finish()
    with pytest.raises(RunError, match=r"the settings changed since this training was made \(seed: 0 -> 1\)"):
        training.check(config.replace(seed=1))
    training.check(config)  # the same settings: fine
    training.close()
    assert not (tmp_path / "steps" / "history.csv").exists()


@pytest.fixture(scope="module")
def cli_run(train_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli("train", "--preset", "smoke", "--data", str(train_data), "--run-dir", str(run_dir),
                     "--set", "finetune_epochs=2", "--verbose", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def cli_in_process(capsys, *args: str):
    """The command line's `main` in this process (the training above ran it in a process of its own): the
    exit status and what it printed, as run_cli gives them."""
    from types import SimpleNamespace

    from cifar100.__main__ import main

    capsys.readouterr()
    status = main(list(args))
    printed = capsys.readouterr()
    return SimpleNamespace(returncode=status, stdout=printed.out, stderr=printed.err)


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_cli_train_shows_progress_and_writes_the_run(cli_run):
    run_dir, result = cli_run
    assert "Epoch 2/2" in result.stdout and "SYNTHETIC data, not CIFAR-100" in result.stdout
    assert json.loads((run_dir / "config.json").read_text())["finetune_epochs"] == 2
    # to a pipe: a line per epoch (not a bar redrawn per step), no terminal escapes, no timing counters
    epoch_lines = [line for line in result.stdout.splitlines() if "/step" in line]
    assert len(epoch_lines) == 2 and "\x1b[" not in result.stdout, result.stdout[-2000:]
    assert all("val_accuracy" in line and "epoch_seconds" not in line and len(line) < 200 for line in epoch_lines)


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_cli_figures_draws_every_figure_of_a_run_and_says_why_one_does_not_apply(cli_run, capsys):
    run_dir, _ = cli_run
    result = cli_in_process(capsys, "figures", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    drawn = {path.stem for path in (run_dir / "figures").glob("*.png")}
    assert {"training_curves", "class_confusion", "per_class_accuracy", "superclass_confusion", "confused_pairs",
            "misclassified"} <= drawn
    assert f"{run_dir / 'figures' / 'class_confusion'}.png" in result.stdout
    assert "(hardest_examples: no hardest examples: hard-example mining was off in this run" in result.stdout


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_cli_evaluate_prints_test_metrics(cli_run, capsys):
    run_dir, _ = cli_run
    result = cli_in_process(capsys, "evaluate", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert f"test top-1 {results['test']['top1']:.4f}" in result.stdout
    assert "superclass accuracy" in result.stdout


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_cli_predict_gives_top5_names_for_any_image(cli_run, tmp_path, capsys):
    run_dir, _ = cli_run
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(big)
    real = SAMPLE_DIR / "cifar100_00_49.png"  # a real CIFAR-100 test image, where ../shared exists
    if not real.exists():
        real = tmp_path / "small.png"
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(real)
    result = cli_in_process(capsys, "predict", str(run_dir), str(real), str(big))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith((str(real), str(big)))]
    assert len(lines) == 2
    names = json.loads((run_dir / "classes.json").read_text())["class_names"]
    for line in lines:
        predictions = line.split(": ", 1)[1].split(", ")
        assert len(predictions) == 5
        assert all(p.rsplit(" ", 1)[0] in names for p in predictions)
        probabilities = [float(p.rsplit(" ", 1)[1]) for p in predictions]
        assert probabilities == sorted(probabilities, reverse=True)


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_cli_predict_refuses_a_file_that_is_not_an_image(cli_run, tmp_path, capsys):
    run_dir, _ = cli_run
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = cli_in_process(capsys, "predict", str(run_dir), str(bad))
    assert result.returncode == 2 and "notes.png: cannot read as an image" in result.stderr


@pytest.mark.parametrize("argv,status,expected", [
    (["train", "--preset", "smoke", "--set", "colour=blue"], 2, "--set colour: unknown setting; the settings are "),
    (["train", "--set", "head_learnin_rate=0.1"], 2, "did you mean 'head_learning_rate'"),
    (["train", "--help"], 0, "--set KEY=VALUE"),
])
def test_cli_answers_help_and_refuses_unknown_settings_before_loading_tensorflow(argv, status, expected):
    script = ("import sys\nfrom cifar100.__main__ import main\ntry:\n    status = main(sys.argv[1:])\n"
              "except SystemExit as stop:\n    status = stop.code\n"
              "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow was imported'\n"
              "sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == status, result.stderr[-2000:]
    assert expected in result.stdout + result.stderr
