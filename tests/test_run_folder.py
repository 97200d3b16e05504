"""The run folder's guarantees: settings checked before anything is written, one process per folder, atomic
rewrites, and a run killed at any point that resumes to exactly the run it would have been."""

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from cifar100 import models, run_folder, train, write_data
from cifar100.config import PRESETS, Config, ConfigError, RunError, make_config, validate

from .conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return write_data.write_synthetic(tmp_path_factory.mktemp("rf") / "cifar-10", kind="cifar10", n_train=1000,
                                      n_test=200)


def smoke(dataset, run_dir, **overrides):
    return make_config("smoke", {"data_dir": str(dataset), "runs_dir": str(run_dir.parent), "name": run_dir.name,
                                 **overrides})


# --- settings --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting,value,message", [
    ("head_learning_rate", float("nan"), "must be a finite number, got nan"),
    ("finetune_learning_rate", 0.0, "must be > 0, got 0.0"),
    ("head_learning_rate", float("inf"), "must be a finite number"),
    ("reduce_lr_factor", 1.5, "must be > 0 and < 1, got 1.5"),
    ("reduce_lr_factor", 0, "must be > 0 and < 1, got 0"),
    ("dropout", 1.0, "must be >= 0 and < 1, got 1.0"),
    ("label_smoothing", -0.1, "must be >= 0 and < 1"),
    ("early_stopping_patience", -1, "must be >= 0 and <= 100000, got -1"),
    ("reduce_lr_patience", 2.5, "must be an integer, got 2.5"),
    ("seed", -3, "must be >= 0 and < 4294967296, got -3"),
    ("image_size", 99999999999, "must be >= 1 and <= 1024, got 99999999999"),
    pytest.param("batch_size", 10**5000, "must be >= 1 and <= 65536, got an integer of about 5000 digits",
                 id="batch_size-5000-digits"),
    ("batch_size", True, "must be an integer, got True"),
    ("head_learning_rate", "fast", "must be a number, got 'fast'"),
    ("hem", "yes", "must be True or False, got 'yes'"),
    ("augment", "sharpen", "'sharpen' is not one of"),
    ("name", "../elsewhere", "must be a plain folder name"),
])
def test_every_setting_is_checked_against_its_meaning_before_anything_is_created(small_data, tmp_path, setting,
                                                                                   value, message):
    run_dir = tmp_path / "runs" / "bad"
    config = smoke(small_data, run_dir).replace(**{setting: value})
    with pytest.raises(ConfigError, match=f"setting '{setting}'.*" + message.replace("(", r"\(").replace(".", r"\.")):
        train.run(config, verbose=0)
    assert not (tmp_path / "runs").exists()


def test_choices_have_one_spelling_used_everywhere(small_data, tmp_path):
    from cifar100 import models

    assert Config(augment="MixUp").augment == "mixup"
    assert Config(augment=None).augment == "none" and models.augmentation_layers(Config(augment=None)) == []
    assert make_config("smoke", ["augment=CUTMIX"]).augment == "cutmix"
    assert Config(weights="None").weights is None and Config(weights="ImageNet").weights == "imagenet"
    assert Config(jit_compile="False").jit_compile == "false"


@pytest.mark.parametrize("content", [b"", b"not a weights file\n", b"\x89HDF\r\n\x1a\n" + b"\0" * 40])
def test_a_weights_file_that_is_not_hdf5_is_named_with_its_setting(small_data, tmp_path, content):
    weights = tmp_path / "broken.weights.h5"
    weights.write_bytes(content)
    with pytest.raises(ConfigError, match=f"setting 'weights': {weights} is not a readable Keras weights file"):
        validate(smoke(small_data, tmp_path / "run", weights=str(weights)))


def test_a_command_that_failed_before_training_can_be_corrected_in_the_same_folder(small_data, tmp_path):
    run_dir = tmp_path / "named"
    first = smoke(small_data, run_dir, seed=1)
    assert run_folder.claim(first, run_dir) is False  # e.g. then the model could not be built
    corrected = smoke(small_data, run_dir, seed=2)
    assert run_folder.claim(corrected, run_dir) is False
    assert Config.load(run_dir / "config.json") == corrected
    (run_dir / "history.csv").write_text("epoch,loss\n")  # a fit that failed in its first step, after phase 1
    (run_dir / "phase1.weights.h5").write_bytes(b"skipped without pretrained weights: the initial ones")
    again = smoke(small_data, run_dir, seed=3)
    assert run_folder.claim(again, run_dir) is False and Config.load(run_dir / "config.json") == again


def test_a_model_of_other_classes_than_the_data_claims_no_folder(small_data, tmp_path):
    """It took the folder of the recipe's fingerprint for its own class count, failed in fit's first step, and
    left the folder refusing the notebook's model ever after."""
    config = smoke(small_data, tmp_path / "run")
    with pytest.raises(RunError, match=r"the model gives 100 probabilities, the data have 10 classes: build it"):
        train.Training(config, model=models.new_model(config, 100))
    assert not (tmp_path / "run").exists()


def test_a_run_folder_with_progress_and_other_settings_is_left_alone(small_data, tmp_path):
    run_dir = tmp_path / "taken"
    run_folder.claim(smoke(small_data, run_dir, seed=1), run_dir)
    (run_dir / "history.csv").write_text("epoch,loss\n0,1.0\n")
    before = (run_dir / "config.json").read_text()
    with pytest.raises(RunError, match=r"holds a run with other settings \(seed: 1 -> 2\)"):
        run_folder.claim(smoke(small_data, run_dir, seed=2), run_dir)
    assert (run_dir / "config.json").read_text() == before


def test_the_same_training_settings_resume_whatever_the_folder_was_called(small_data, tmp_path):
    run_dir = tmp_path / "named"
    run_folder.claim(smoke(small_data, run_dir), run_dir)
    (run_dir / "history.csv").write_text("epoch,loss\n0,1.0\n")
    elsewhere = smoke(small_data, run_dir).replace(name="", runs_dir=str(tmp_path / ".." / tmp_path.name))
    assert run_folder.claim(elsewhere, run_dir) is True


@pytest.mark.parametrize("damage", ["", "{\"backbone\": ", "[1, 2]", "{\"batch_size\": 64, \"bogus\": }"])
def test_a_damaged_config_json_is_named_and_never_loses_progress(small_data, tmp_path, damage):
    run_dir = tmp_path / "damaged"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(damage)
    config = smoke(small_data, run_dir)
    assert run_folder.claim(config, run_dir) is False  # nothing trained there yet: taken over
    assert Config.load(run_dir / "config.json") == config

    (run_dir / "config.json").write_text(damage)
    (run_dir / "history.csv").write_text("epoch,loss\n0,1.0\n")
    with pytest.raises(RunError, match=r"config.json: damaged config.json.* delete .* to start over"):
        run_folder.claim(config, run_dir)
    assert (run_dir / "config.json").read_text() == damage and (run_dir / "history.csv").exists()


def test_a_damaged_history_is_named_and_left_as_it_is(tmp_path):
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss\n0,1.0\nthis is not, a row\n")
    with pytest.raises(RunError, match=r"history.csv: damaged history .*line 3 is not a row"):
        run_folder.settle_phase(tmp_path, tmp_path / "backup", 0, 3)
    assert history.read_text() == "epoch,loss\n0,1.0\nthis is not, a row\n"


def committed_at(run_dir, epoch: int, history: str):
    """A run folder whose head phase committed `epoch`, with `history`, a best.keras of epoch 0 and an empty
    checkpoints' scratch folder: (the backup folder, the checkpoints' folder)."""
    backup = run_dir / "backup" / "head"
    keras_backup(backup, epoch)
    run_folder.mark_committed(backup)
    (run_dir / "history.csv").write_text(history)
    (run_dir / "best.keras").write_text("epoch 0")
    (run_dir / run_folder.CHECKPOINTS).mkdir()
    return backup, run_dir / run_folder.CHECKPOINTS


def test_a_restarted_phase_keeps_only_what_committed_epochs_wrote(tmp_path):
    """Backup says 2 epochs are done. Epoch 1's checkpoint was written but not published (killed after the
    commit); epoch 2 wrote a history row and a better checkpoint but was never committed (a ghost)."""

    backup, checkpoints = committed_at(tmp_path, 2, "epoch,val_accuracy\n1,0.5\n2,0.6\n3,0.9\n")
    (checkpoints / "best-0002.keras").write_text("epoch 1")
    (checkpoints / "best-0003.keras").write_text("epoch 2, never committed")

    assert run_folder.settle_phase(tmp_path, backup, 0, 3) == 2
    assert (tmp_path / "history.csv").read_text() == "epoch,val_accuracy\n1,0.5\n2,0.6\n"
    assert (tmp_path / "best.keras").read_text() == "epoch 1" and list(checkpoints.iterdir()) == []
    assert run_folder.best_val_accuracy(tmp_path) == 0.6  # the next checkpoint must beat epoch 1, not the ghost
    for value in ("nan", "inf", "1.5"):  # NaN would beat nothing, and best.keras would stay epoch 1's for good
        (tmp_path / "history.csv").write_text(f"epoch,val_accuracy\n1,{value}\n2,0.6\n")
        with pytest.raises(RunError, match=rf"history.csv: damaged history: val_accuracy {value} at epoch 1"):
            run_folder.best_val_accuracy(tmp_path)


def test_the_checkpoints_scratch_folder_is_settled_by_epoch_number_whatever_else_it_holds(tmp_path):
    backup, checkpoints = committed_at(tmp_path, 2, "epoch,val_accuracy\n1,0.5\n2,0.6\n")
    (checkpoints / "best-0002.keras").write_text("epoch 2")
    (checkpoints / "best-10000.keras").write_text("epoch 10000, never committed")  # past 4 digits: by number
    (checkpoints / "tmpk3j2x9q1").write_text("Keras' temporary file of a save that a kill cut short")
    (checkpoints / "best-abc.keras").write_text("not an epoch's")  # int() of its name crashed the resume
    (checkpoints / "folder").mkdir()
    with pytest.raises(RunError, match=r"checkpoints/folder: not a file, in the checkpoints' scratch folder"):
        run_folder.settle_phase(tmp_path, backup, 0, 3)
    assert (tmp_path / "best.keras").read_text() == "epoch 0" and len(list(checkpoints.iterdir())) == 5
    (checkpoints / "folder").rmdir()
    assert run_folder.settle_phase(tmp_path, backup, 0, 3) == 2
    assert (tmp_path / "best.keras").read_text() == "epoch 2" and list(checkpoints.iterdir()) == []


def test_a_backup_outside_the_phase_or_a_history_without_its_epochs_is_refused_and_nothing_changes(tmp_path):
    """Each of these is in range and of the right type alone; together they would train other epochs than asked
    (a backup at epoch 50 of a phase of epochs 3 to 5) or let a worse model replace best.keras (no history: no
    best to beat)."""
    backup = tmp_path / "backup" / "finetune"
    keras_backup(backup, 50)
    run_folder.mark_committed(backup)
    history = "epoch,val_accuracy\n1,0.5\n2,0.6\n"
    (tmp_path / "history.csv").write_text(history)
    with pytest.raises(RunError, match=r"training_metadata.json: the backup holds epoch 50, outside this phase's "
                                       r"epochs 3 to 5"):
        run_folder.settle_phase(tmp_path, backup, 2, 5)
    keras_backup(backup, 4)
    run_folder.mark_committed(backup)
    with pytest.raises(RunError, match=r"history.csv: no row of epoch 4, which the run has done"):
        run_folder.settle_phase(tmp_path, backup, 2, 5)
    assert (tmp_path / "history.csv").read_text() == history
    (tmp_path / "history.csv").unlink()
    with pytest.raises(RunError, match=r"history.csv: no row of epoch 4"):
        run_folder.settle_phase(tmp_path, backup, 2, 5)
    (tmp_path / "history.csv").write_text(history + "3,0.7\n4,0.4\n5,0.9\n")  # epoch 5: never committed
    assert run_folder.settle_phase(tmp_path, backup, 2, 5) == 4
    assert (tmp_path / "history.csv").read_text() == history + "3,0.7\n4,0.4\n"


def test_phase_1_done_without_its_weights_or_after_more_epochs_than_it_has_is_refused(small_data, tmp_path):
    config = smoke(small_data, tmp_path / "run")
    training = train.Training(config)
    training.set_phase("head")
    assert not training.needs("head")  # random weights: phase 1 skipped, its weights and 0 epochs recorded
    training.close()
    (tmp_path / "run" / "phase1.weights.h5").rename(tmp_path / "phase1.weights.h5")
    training = train.Training(config)
    training.set_phase("head")
    with pytest.raises(RunError, match=r"state.json: records phase 1 done after 0 epochs, but phase1.weights.h5 is "
                                       r"missing"):
        training.needs("head")  # it used to train phase 1 again, dropping the history of later epochs
    training.close()
    (tmp_path / "phase1.weights.h5").rename(tmp_path / "run" / "phase1.weights.h5")
    run_folder.write_state(tmp_path / "run", head_epochs_done=5)
    training = train.Training(config)
    training.set_phase("finetune")
    with pytest.raises(RunError, match=r"records phase 1 done after 5 epochs, but the phase has 1"):
        training.data("finetune")
    training.close()


def test_an_epoch_is_committed_once_its_backup_and_history_row_are_on_disk(tmp_path, monkeypatch):
    """Keras writes the backup and CSVLogger the row without syncing them: after a power cut committed.json could
    name an epoch whose files never reached the disk."""
    backup = tmp_path / "backup" / "finetune"
    keras_backup(backup, 1)
    keras_backup(backup, 2)  # and its .bkp copies of epoch 1
    (tmp_path / "history.csv").write_text("epoch,loss\n1,1.0\n2,0.9\n")
    synced = []
    monkeypatch.setattr(run_folder.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    run_folder.mark_committed(backup)
    names = [os.path.relpath(path, tmp_path) for path in synced]
    assert names[:5] == ["backup/finetune/latest.weights.h5", "backup/finetune/training_metadata.json",
                         "backup/finetune/latest.weights.h5.bkp", "backup/finetune/training_metadata.json.bkp",
                         "history.csv"]
    assert names[5:] == ["backup/finetune/.committed.json.tmp"]  # then committed.json itself


def keras_backup(folder, epoch, steps=("bkp", "weights", "epoch")):
    """The steps of BackupAndRestore(double_checkpoint=True) at an epoch's end: the previous backup copied to
    *.bkp, then the new weights, then the new epoch number. A kill is a shorter `steps`."""
    import keras

    folder.mkdir(parents=True, exist_ok=True)
    if "bkp" in steps:
        for name in ("latest.weights.h5", "training_metadata.json"):
            if (folder / name).exists():
                shutil.copyfile(folder / name, folder / f"{name}.bkp")
    if "weights" in steps:
        init = keras.initializers.Constant(float(epoch))
        keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, kernel_initializer=init)]).save_weights(
            folder / "latest.weights.h5")
    if "epoch" in steps:
        (folder / "training_metadata.json").write_text(json.dumps({"epoch": epoch, "batch": 0}))


@pytest.mark.parametrize("steps,expected", [
    (("bkp", "weights", "epoch"), "previous"),  # backup written, killed before it was marked committed
    (("bkp", "weights"), "previous"),  # new weights beside the old epoch number
    (("bkp",), "ok"),  # killed before the new weights: the latest backup is still the committed one
    ((), "ok"),
])
def test_a_backup_is_restored_to_the_last_committed_epoch(tmp_path, steps, expected):
    folder = tmp_path / "backup"
    keras_backup(folder, 1)
    run_folder.mark_committed(folder)
    keras_backup(folder, 2)
    run_folder.mark_committed(folder)
    keras_backup(folder, 3, steps)
    assert run_folder.repair_backup(folder) == expected
    assert run_folder.committed_epochs(folder, 0) == 2


def test_a_truncated_backup_falls_back_and_one_never_committed_is_removed(tmp_path):
    folder = tmp_path / "backup"
    keras_backup(folder, 1)
    run_folder.mark_committed(folder)
    keras_backup(folder, 2, ("bkp",))
    (folder / "latest.weights.h5").write_bytes((folder / "latest.weights.h5").read_bytes()[:96])  # mid-write
    assert run_folder.repair_backup(folder) == "previous" and run_folder.committed_epochs(folder, 0) == 1
    fresh = tmp_path / "fresh"
    keras_backup(fresh, 1)  # the phase's first backup, killed before it was marked committed
    assert run_folder.repair_backup(fresh) == "removed" and not fresh.exists()


@pytest.mark.parametrize("damage", ["latest", "metadata", "committed"])
def test_a_committed_backup_that_no_kill_could_leave_is_named_and_kept(tmp_path, damage):
    """A kill leaves latest or its .bkp copy whole: with neither matching committed.json the folder is damaged,
    and removing it would silently restart the phase from its first epoch."""
    folder = tmp_path / "backup"
    keras_backup(folder, 1)
    run_folder.mark_committed(folder)
    keras_backup(folder, 2)
    run_folder.mark_committed(folder)
    if damage == "latest":
        (folder / "latest.weights.h5").write_bytes(os.urandom(5000))
    elif damage == "metadata":
        (folder / "training_metadata.json").write_text("{}")
    else:
        (folder / "committed.json").write_text(json.dumps({**json.loads((folder / "committed.json").read_text()),
                                                            "epoch": "2"}))
    files = {path.name: path.read_bytes() for path in folder.iterdir()}
    with pytest.raises(RunError, match=r"backup: damaged backup: neither latest.weights.h5 .* Nothing was changed"):
        run_folder.repair_backup(folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == files


def test_a_rewrite_killed_before_its_rename_leaves_the_old_file(tmp_path, monkeypatch):
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss\n0,1.0\n1,0.9\n2,0.8\n")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_folder.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run_folder.trim_history(history, 1)
    assert history.read_text() == "epoch,loss\n0,1.0\n1,0.9\n2,0.8\n"
    with pytest.raises(KeyboardInterrupt):
        run_folder.write_state(tmp_path, finished=True)
    assert not (tmp_path / "state.json").exists()


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_a_second_process_on_a_locked_run_folder_says_who_holds_it(small_data, tmp_path):
    run_dir = tmp_path / "locked"
    with run_folder.RunLock(run_dir):
        result = run_cli("train", "--preset", "smoke", "--data", str(small_data), "--run-dir", str(run_dir))
    assert result.returncode == 2
    assert f"error: {run_dir} is in use by process {os.getpid()}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "history.csv").exists()
    with run_folder.RunLock(run_dir):  # released when its holder is done
        pass


def test_the_lock_is_shared_within_a_process_and_released_with_its_last_holder(tmp_path):
    import fcntl

    first, second = run_folder.RunLock(tmp_path), run_folder.RunLock(tmp_path)
    first.acquire()
    second.acquire()  # a notebook cell run again, while the previous run's training still holds the folder
    first.release()
    first.release()  # a second release of one hold changes nothing
    with open(tmp_path / ".lock") as other, pytest.raises(OSError):  # what another process would meet
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    second.release()
    with open(tmp_path / ".lock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # the folder removed while held (as an error message advises): the next hold locks the new folder's file
    gone = tmp_path / "gone"
    held = run_folder.RunLock(gone).acquire()
    shutil.rmtree(gone)
    again = run_folder.RunLock(gone).acquire()
    held.release()  # the old hold's release leaves the new lock alone
    with open(gone / ".lock") as other, pytest.raises(OSError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    again.release()
    with open(gone / ".lock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


# --- TensorBoard ----------------------------------------------------------------------------------------

def tensorboard_scalars(logs) -> dict:
    """{(split, tag): [(step, value), ...]} of every TensorBoard event file under logs/, in step order."""
    import tensorflow as tf

    scalars = {}
    for path in sorted(logs.glob("*/events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                scalars.setdefault((path.parent.name, value.tag), []).append((event.step, round(number, 6)))
    return {key: sorted(points) for key, points in scalars.items()}


def test_tensorboard_logs_each_committed_epoch_once_and_fills_in_one_left_out(tmp_path):
    from cifar100.callbacks import write_tensorboard

    history = tmp_path / "history.csv"
    history.write_text("epoch,loss,val_loss,val_accuracy,learning_rate\n1,2.0,2.5,0.1,0.001\n2,1.5,2.0,0.3,0.001\n")
    write_tensorboard(tmp_path)
    write_tensorboard(tmp_path)  # a second call (a resumed process) writes nothing again
    with history.open("a") as handle:  # epoch 3 committed, its logging killed; epoch 4 logs both
        handle.write("3,1.2,1.9,0.4,0.0003\n4,1.0,1.8,0.5,0.0001\n")
    write_tensorboard(tmp_path)
    scalars = tensorboard_scalars(tmp_path / "logs")
    assert scalars[("train", "epoch_loss")] == [(1, 2.0), (2, 1.5), (3, 1.2), (4, 1.0)]
    assert scalars[("validation", "epoch_loss")] == [(1, 2.5), (2, 2.0), (3, 1.9), (4, 1.8)]
    assert scalars[("validation", "epoch_accuracy")] == [(1, 0.1), (2, 0.3), (3, 0.4), (4, 0.5)]
    assert [step for step, _ in scalars[("train", "epoch_learning_rate")]] == [1, 2, 3, 4]
    next(tmp_path.glob("logs/validation/*.epoch-000004.v2")).unlink()  # killed between the two splits' files
    write_tensorboard(tmp_path)
    scalars = tensorboard_scalars(tmp_path / "logs")
    assert scalars[("validation", "epoch_loss")] == [(1, 2.5), (2, 2.0), (3, 1.9), (4, 1.8)]
    assert scalars[("train", "epoch_loss")] == [(1, 2.0), (2, 1.5), (3, 1.2), (4, 1.0)]


def test_a_folder_of_other_settings_is_refused_with_its_history_untouched(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = make_config("smoke", {"runs_dir": str(tmp_path), "name": "run"})
    config.replace(seed=5).save(run_dir / "config.json")
    (run_dir / "history.csv").write_text("epoch,loss\n0,1.0\n")  # an earlier version's, counted from 0
    run_folder.write_state(run_dir, model_format=run_folder.MODEL_FORMAT)
    with pytest.raises(RunError, match="holds a run with other settings"):
        run_folder.claim(config, run_dir)
    assert (run_dir / "history.csv").read_text() == "epoch,loss\n0,1.0\n"  # not renumbered: not this run's
    assert run_folder.claim(config.replace(seed=5), run_dir) is True
    assert (run_dir / "history.csv").read_text() == "epoch,loss\n1,1.0\n"


# --- the best checkpoint ----------------------------------------------------------------------------------

def test_best_keras_is_the_best_validation_epoch_not_the_last(tmp_path):
    """The phase's callbacks, fed a scripted validation accuracy (best at the second of four epochs), leave
    best.keras with that epoch's weights."""
    import keras
    import numpy as np

    from cifar100 import callbacks
    from cifar100.batches import TrainBatches, one_hot

    scripted = [0.3, 0.9, 0.5, 0.4]

    class Script(keras.callbacks.Callback):  # runs first: every later callback sees the scripted number
        def __init__(self):
            super().__init__()
            self.weights = []

        def on_epoch_end(self, epoch, logs=None):
            logs["val_accuracy"] = scripted[epoch]
            self.weights.append([w.copy() for w in self.model.get_weights()])

    config = make_config("smoke", {"runs_dir": str(tmp_path), "name": "run", "early_stopping_patience": 10})
    run_dir = config.run_dir()
    run_dir.mkdir()
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), np.arange(64) % 4
    sampler = TrainBatches(images, labels, 4, 16, seed=0)
    model = models.new_model(config, 4)
    train.compile_model(model, 1e-2, config)
    script = Script()
    model.fit(sampler, validation_data=(images[:16], one_hot(labels[:16], 4)), epochs=4, shuffle=False, verbose=0,
              callbacks=[script, *callbacks.callback_set(config, run_dir, "finetune", sampler, None, None, None)])
    best = keras.saving.load_model(run_dir / "best.keras")
    for got, expected in zip(best.get_weights(), script.weights[1], strict=True):
        np.testing.assert_array_equal(got, expected)
    assert any(not np.array_equal(a, b) for a, b in zip(script.weights[1], script.weights[3], strict=True))


# --- the Keras internals resume relies on ------------------------------------------------------------------

def test_keras_keeps_a_restored_epoch_for_later_fits_until_it_is_forgotten(tmp_path):
    """Why cifar100.keras_internals.forget_restored_epoch exists, and that it still works: a model restored by
    BackupAndRestore starts every later fit() at the restored epoch, whatever initial_epoch that fit asks."""
    import keras
    import numpy as np

    from cifar100 import keras_internals

    x, y = np.zeros((8, 2), "float32"), np.zeros((8, 1), "float32")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    backup = keras.callbacks.BackupAndRestore(tmp_path / "backup", delete_checkpoint=False)
    model.fit(x, y, epochs=3, callbacks=[backup], verbose=0)  # leaves a backup of epoch 3
    assert len(model.fit(x, y, epochs=5, callbacks=[backup], verbose=0).epoch) == 2  # restored: epochs 4-5

    assert model.fit(x, y, initial_epoch=0, epochs=4, verbose=0).epoch == [3]  # Keras: still starts at 3
    keras_internals.forget_restored_epoch(model)
    assert model.fit(x, y, initial_epoch=0, epochs=4, verbose=0).epoch == [0, 1, 2, 3]


# --- killed and resumed ----------------------------------------------------------------------------------

class Killed(BaseException):
    """In-process stand-in for SIGKILL at a kill point: nothing in the library catches it, and what a real kill
    would also drop (the folder's lock) is let go by the training's `finally`."""


def arm_kill(point: str, epoch: int, die) -> list:
    """Call `die()` at `point` (at `epoch` where it names one); returns what to put back (see disarm)."""
    import keras

    from cifar100 import callbacks

    def before(cls, name, when):
        original = getattr(cls, name)

        def patched(*args, **kwargs):
            if when(*args, **kwargs):
                die()
            return original(*args, **kwargs)
        setattr(cls, name, patched)
        return cls, name, original

    if point == "before_commit":  # history row and checkpoint written, the epoch's backup not
        return before(keras.callbacks.BackupAndRestore, "on_epoch_end", lambda self, e, logs=None: e == epoch)
    if point == "after_backup":  # the epoch's backup written, not yet marked committed
        return before(callbacks.CommitEpoch, "on_epoch_end", lambda self, e, logs=None: e == epoch)
    if point == "after_commit":  # the epoch committed, its checkpoint not yet published
        return before(callbacks.run_folder, "publish_checkpoint", lambda run_dir, n: n == epoch + 1)
    if point == "after_phase":  # a phase's fit() returned, nothing after it done
        return before(train.Training, "end", lambda self, phase: phase == "head")
    if point == "history_row":  # any phase, phase 1 on cached features too: as an epoch's row is written
        return before(callbacks.HistoryLog, "on_epoch_end", lambda self, e, logs=None: e == epoch)
    if point == "during_finish":
        return before(train.evaluate, "write_results", lambda *args, **kwargs: True)
    raise ValueError(point)


# A real SIGKILL, in a process of its own
KILLER = textwrap.dedent("""
    import os, signal, sys
    from tests.test_run_folder import arm_kill
    from cifar100 import train
    from cifar100.config import Config

    arm_kill(sys.argv[2], int(sys.argv[3]), lambda: os.kill(os.getpid(), signal.SIGKILL))
    train.run(Config.load(sys.argv[1]), verbose=0)
""")

METRICS = ("epoch", "accuracy", "loss", "top5", "val_accuracy", "val_loss", "val_top5", "learning_rate")


def tensorboard_metrics(logs) -> dict:
    """The TensorBoard scalars of the metrics (not the timings, which differ from run to run)."""
    return {key: points for key, points in tensorboard_scalars(logs).items()
            if key[1].removeprefix("epoch_") in METRICS}


def metric_rows(run_dir):
    with open(run_dir / "history.csv") as handle:
        return [{k: row[k] for k in METRICS} for row in csv.DictReader(handle)]


def mining_rows(run_dir):
    with open(run_dir / "history.csv") as handle:
        return [(row["examples_forward"], row["examples_backprop"]) for row in csv.DictReader(handle)]


# One run of the notebook's default recipe, cpu-small, in small (phase 1 on cached features, atomic: a kill
# there redoes it; then warm-up + cosine fine-tuning with label smoothing), with random augmentation, dropout and
# selective-backprop mining (its window of recent losses and its draws must resume too). Epochs 0-1 are phase 1,
# 2-5 fine-tuning. Killed seven times where a kill could do harm, each time resumed from the folder the kill
# left: as phase 1 writes a row; between the phases; before an epoch's backup (its history row and checkpoint
# written: in the warm-up, and later); after it (checkpoint not yet published); after the commit; and during the
# final evaluation. The first fine-tuning kill is a real SIGKILL in a process of its own; the others stop the
# run in this process (Killed), which is quicker and, as nothing catches it, leaves the folder as a kill would.
KILLS = [("history_row", 1), ("after_phase", 0), ("before_commit", 2), ("after_backup", 3), ("after_commit", 4),
         ("before_commit", 5), ("during_finish", 0)]
REAL_KILL = ("before_commit", 2)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> dict:
    weights = tmp_path_factory.mktemp("weights") / "tinycnn.weights.h5"  # given weights: phase 1 runs
    models.tiny_cnn().save_weights(weights)
    recipe = {key: value for key, value in PRESETS["cpu-small"].items()
              if key in ("head_features", "lr_schedule", "warmup_epochs", "label_smoothing")}
    assert recipe == {"head_features": "cached", "lr_schedule": "cosine", "warmup_epochs": 1, "label_smoothing": 0.1}
    return dict(recipe, head_epochs=2, finetune_epochs=4, augment="basic", dropout=0.2, weights=str(weights),
                hem=True, hem_mode="selective")


def kill_at(config, kills, folder) -> None:
    """Run `config` once for each (point, epoch) of `kills`, stopped there: REAL_KILL by SIGKILL in a process
    of its own, the others in this process."""
    config.save(folder / "config.json")
    for point, epoch in kills:
        if (point, epoch) == REAL_KILL:
            killed = subprocess.run([sys.executable, "-c", KILLER, str(folder / "config.json"), point, str(epoch)],
                                    cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert killed.returncode == -9, f"not killed at {point} {epoch}: {killed.stderr[-2000:]}"
        else:
            def die(point=point):
                raise Killed(point)
            cls, name, original = arm_kill(point, epoch, die)
            try:
                train.run(Config.load(folder / "config.json"), verbose=0)
                raise AssertionError(f"not stopped at {point} {epoch}")
            except Killed:
                pass
            finally:
                setattr(cls, name, original)
        assert not run_folder.finished(config.run_dir())


@pytest.mark.slow
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_run(small_data, killed_run, tmp_path):
    whole = tmp_path / "whole"
    train.run(smoke(small_data, whole, **killed_run), verbose=0)
    run_dir = tmp_path / "run"
    config = smoke(small_data, run_dir, **killed_run)
    kill_at(config, KILLS, tmp_path)

    train.run(config, verbose=0)
    assert metric_rows(run_dir) == metric_rows(whole)  # the cosine's learning rates and every metric
    assert mining_rows(run_dir) == mining_rows(whole)  # the same examples backpropagated each epoch
    got, expected = (json.loads((d / "results.json").read_text()) for d in (run_dir, whole))
    assert got["best_epoch"] == expected["best_epoch"] and got["epochs_run"] == expected["epochs_run"]
    assert got["validation"] == expected["validation"]
    assert got["hardest_examples"] == expected["hardest_examples"]
    assert not (run_dir / "backup").exists() and not (run_dir / run_folder.CHECKPOINTS).exists()
    # TensorBoard: every epoch once, as the uninterrupted run logged it (an epoch redone after a kill not twice)
    logged = tensorboard_metrics(run_dir / "logs")
    assert logged == tensorboard_metrics(whole / "logs")
    assert [step for step, _ in logged[("validation", "epoch_accuracy")]] == list(range(1, 7))


@pytest.mark.slow
def test_phase_2_on_cached_activations_stopped_resumes_to_the_uninterrupted_run(small_data, killed_run, tmp_path):
    """The top of the backbone fine-tuned on cached activations (computed again by the resumed process), stopped
    in process in its warm-up epoch before the backup and after a later commit."""
    settings = {**killed_run, "hem": False, "finetune_features": "cached", "finetune_fraction": 0.5,
                "finetune_views": 3, "finetune_epochs": 3}
    whole = tmp_path / "whole"
    train.run(smoke(small_data, whole, **settings), verbose=0)
    run_dir = tmp_path / "run"
    config = smoke(small_data, run_dir, **settings)
    kill_at(config, [("before_commit", 2), ("after_commit", 3)], tmp_path)
    committed = sorted((run_dir / "backup" / "finetune").glob("callbacks-*.json"))[-1]  # the committed epoch's
    committed.rename(tmp_path / committed.name)  # lost: the callbacks would start afresh, early stopping forgotten
    with pytest.raises(RunError, match=rf"{committed.name}: missing: the state of the callbacks .* Nothing was"):
        train.run(config, verbose=0)
    (tmp_path / committed.name).rename(committed)
    train.run(config, verbose=0)
    assert metric_rows(run_dir) == metric_rows(whole)
    got, expected = (json.loads((d / "results.json").read_text()) for d in (run_dir, whole))
    assert got["best_epoch"] == expected["best_epoch"] and got["validation"] == expected["validation"]
