"""The run folder: one atomic writer, one bounded reader, runs named by settings and recipe, the lock, and the
checkpoint's refusals."""

import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from cifar100 import batches, callbacks, runs
from cifar100.config import RunError, make_config
from cifar100.keras_fixes import keras


def test_the_writer_replaces_a_link_and_never_writes_through_it(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "history.csv").symlink_to(target)
    runs.write_atomic(tmp_path / "run" / "history.csv", "epoch\n1\n")
    assert target.read_text() == "keep me"
    assert not (tmp_path / "run" / "history.csv").is_symlink()
    assert (tmp_path / "run" / "history.csv").read_text() == "epoch\n1\n"
    assert os.listdir(tmp_path / "run") == ["history.csv"]  # no temporary file left


def test_the_reader_refuses_fifos_folders_and_oversized_files_in_one_line(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    (tmp_path / "results.json").mkdir()
    (tmp_path / "big.json").write_bytes(b" " * 2048)
    for name, limit in (("config.json", 1 << 20), ("results.json", 1 << 20), ("big.json", 1024)):
        with pytest.raises(RunError, match=name) as error:
            runs.read_file(tmp_path / name, limit)
        assert "\n" not in str(error.value)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(RunError, match="expected a JSON object"):
        runs.read_json(tmp_path / "list.json")


def tiny_model(width=8, classes=10):
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(width, 3)(x))
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x))


def started(tmp_path, model=None, optimizer="adam", config=None):
    model = model or tiny_model()
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    run = runs.Run(config or make_config("smoke", {"runs_dir": str(tmp_path)}), model)
    run.start("head", model)
    run.close()
    return run


def test_the_same_recipe_finds_the_same_folder_whatever_keras_named_its_layers(tmp_path):
    first, second = started(tmp_path), started(tmp_path)  # the second model's layers are dense_1, conv2d_1, ...
    assert first.dir == second.dir
    assert first.dir.name.startswith("smoke-")


@pytest.mark.parametrize("change", ["optimizer", "model", "settings"])
def test_another_recipe_or_setting_names_another_folder(tmp_path, change):
    base = started(tmp_path)
    other = started(tmp_path, optimizer=keras.optimizers.SGD(0.1) if change == "optimizer" else "adam",
                    model=tiny_model(width=16) if change == "model" else None,
                    config=make_config("smoke", {"runs_dir": str(tmp_path), "seed": 1})
                    if change == "settings" else None)
    assert other.dir != base.dir
    assert ("seed=1" in other.dir.name) == (change == "settings")


def test_a_run_folder_is_locked_while_another_process_trains_it(tmp_path):
    folder = started(tmp_path).dir
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(folder.parent / f".{folder.name}.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunError, match="another process is training this run"):
            started(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert started(tmp_path).dir == folder  # a cell run again in this process takes the lock again


def trained_epoch(tmp_path, model):
    """One epoch of `model` committed by the run's checkpoint."""
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    run = runs.Run(make_config("smoke", {"runs_dir": str(tmp_path)}), model)
    first, last = run.start("head", model)
    train = batches.TrainBatches(np.zeros((8, 32, 32, 3), np.uint8), np.arange(8) % 10, 10, 4)
    model.fit(train, initial_epoch=first, epochs=first + 1, verbose=0,
              callbacks=callbacks.for_run(run, train, []))
    return run


def test_a_phase_started_again_restores_its_last_finished_epoch_over_what_an_interrupt_left(tmp_path):
    model = tiny_model()
    run = trained_epoch(tmp_path, model)
    saved = [keras.ops.convert_to_numpy(w) for w in model.weights]
    for weight in model.weights:  # what an epoch cut short by Ctrl-C leaves in memory
        weight.assign(np.ones(weight.shape, weight.dtype))
    assert run.start("head", model) == (1, 1)  # smoke: 1 head epoch, done
    for weight, value in zip(model.weights, saved, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(weight), value)


def test_phase_2_is_refused_while_phase_1_is_unfinished(tmp_path):
    model = tiny_model()
    run = runs.Run(make_config("smoke", {"runs_dir": str(tmp_path), "head_epochs": 3}), model)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    run.start("head", model)
    with pytest.raises(RunError, match="phase 1 stopped after epoch 0 of 3"):
        run.start("finetune", model)


def checkpointed(tmp_path, arrays: dict):
    """A run folder whose checkpoint.npz holds `arrays`, and a new Run of the same recipe."""
    run = started(tmp_path)
    run.dir.mkdir(parents=True)
    np.savez(run.dir / "checkpoint.npz", **arrays)
    return run


def test_a_checkpoint_of_another_model_is_named_in_one_line_and_kept(tmp_path):
    state = np.frombuffer(b'{"phase": "head", "epoch": 1, "done": false, "history": [], "callbacks": {}}', np.uint8)
    run = checkpointed(tmp_path, {"state": state, "model/0": np.zeros((5, 5))})
    with pytest.raises(RunError, match="checkpoint of another model") as error:
        started(tmp_path)
    assert "\n" not in str(error.value) and (run.dir / "checkpoint.npz").exists()


def test_a_compressed_checkpoint_bomb_is_refused_before_it_is_unpacked(tmp_path):
    run = started(tmp_path)
    run.dir.mkdir(parents=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("state.npy", b"\0" * (64 << 20))  # 64 MB of zeros in a few KB
    (run.dir / "checkpoint.npz").write_bytes(buffer.getvalue())
    with pytest.raises(RunError, match="damaged or not an .npz file.*hold more than the file"):
        started(tmp_path)


def test_a_damaged_checkpoint_is_named_in_one_line(tmp_path):
    run = started(tmp_path)
    run.dir.mkdir(parents=True)
    (run.dir / "checkpoint.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RunError, match="checkpoint.npz: damaged"):
        started(tmp_path)


def test_an_array_header_declaring_more_than_its_data_is_refused_before_it_is_allocated(tmp_path):
    run = started(tmp_path)
    run.dir.mkdir(parents=True)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": (10**13,)})
    with zipfile.ZipFile(run.dir / "checkpoint.npz", "w") as archive:
        archive.writestr("state.npy", buffer.getvalue() + b"\0" * 64)
    with pytest.raises(RunError, match="declares more than it holds"):
        started(tmp_path)
