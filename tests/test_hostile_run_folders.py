"""Run folders, model files and datasets from someone else: never written or read through a link or into a
FIFO, each file checked in shape, type and size before use, one line naming the file, no dataset destroyed."""

import io
import json
import os
import pickle
import shutil
import subprocess
import time
import zipfile

import h5py
import keras
import numpy as np
import pytest

from cifar100 import compare, data, evaluate, models, plots, run_folder, train, write_data
from cifar100.__main__ import main
from cifar100.callbacks import ResumeState
from cifar100.config import Config, ConfigError, DatasetError, RunError, make_config

from .test_compare import fake_run


@pytest.fixture(scope="module")
def run_dir(untrained_run):
    return untrained_run


def copy(run_dir, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(run_dir, target)
    return target


@pytest.mark.parametrize("name", [".lock", "test_predictions.npz", ".results.json.tmp", "history.csv"])
def test_a_link_in_a_run_folder_is_refused_and_nothing_is_written_through_it(run_dir, tmp_path, capsys, name):
    run = copy(run_dir, tmp_path)
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (run / name).unlink(missing_ok=True)
    os.symlink(victim, run / name)
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / name}: a symbolic link in the run folder" in err and len(err.strip().splitlines()) == 1
    assert victim.read_text() == "keep me"


def test_a_file_of_several_hard_links_is_never_written_through(run_dir, tmp_path, capsys, synthetic_cifar100):
    """The lock is written in place by every command that takes it (as a second name of best.keras it overwrote the
    model); a training run also writes history.csv and the backups in place. A folder copied with `cp -al` (every
    file a hard link) is read as any other."""
    run = copy(run_dir, tmp_path)
    linked = tmp_path / "linked"
    subprocess.run(["cp", "-al", str(run), str(linked)], check=True)
    assert main(["evaluate", str(linked)]) == 0  # read (its results.json rewritten atomically: a file of its own)
    capsys.readouterr()
    os.link(run / "best.keras", run / ".lock")  # best.keras's third name (the copy holds the second)
    before = (run / "best.keras").read_bytes()
    for command in (["evaluate", str(run)], ["export", str(run), str(tmp_path / "exported")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{run / '.lock'}: a file of 3 hard links in the run folder" in err
        assert len(err.strip().splitlines()) == 1
    assert (run / "best.keras").read_bytes() == before
    fresh = copy(run_dir, tmp_path, "fresh")  # no file of it linked but the one below
    (tmp_path / "precious.txt").write_text("keep me")
    (fresh / "history.csv").unlink(missing_ok=True)
    os.link(tmp_path / "precious.txt", fresh / "history.csv")
    config = Config.load(fresh / "config.json").replace(runs_dir=str(tmp_path), name="fresh")
    with pytest.raises(RunError, match=r"history.csv: a file of 2 hard links in the run folder"):
        train.Training(config)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_an_atomic_write_replaces_a_link_and_its_temporary_file_never_writes_through_one(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / ".state.json.tmp")
    os.symlink(victim, tmp_path / "state.json")
    run_folder.write_json(tmp_path / "state.json", {"finished": True})
    assert victim.read_text() == "keep me" and not (tmp_path / "state.json").is_symlink()
    assert json.loads((tmp_path / "state.json").read_text()) == {"finished": True}


def test_a_fifo_or_a_huge_file_where_a_json_file_should_be_is_one_line_at_once(tmp_path):
    os.mkfifo(tmp_path / "state.json")
    started = time.perf_counter()
    with pytest.raises(RunError, match=r"state.json: state.json is not a regular file"):
        run_folder.read_state(tmp_path)
    assert time.perf_counter() - started < 5  # not blocked on the FIFO
    (tmp_path / "results.json").write_text('{"n": ' + "9" * 5000 + "}")
    with pytest.raises(RunError, match=r"results.json: damaged results.json .*ValueError"):
        run_folder.read_json(tmp_path / "results.json")


def rewritten(model_file, tmp_path, replace: dict):
    """A copy of a .keras file with some members replaced or added (name -> bytes)."""
    out = tmp_path / "best.keras"
    with zipfile.ZipFile(model_file) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, replace.get(info.filename, source.read(info.filename)))
        for name in set(replace) - set(source.namelist()):
            target.writestr(name, replace[name])
    return out


def test_a_model_file_asking_for_a_huge_layer_builds_only_the_runs_model(run_dir, tmp_path):
    run = copy(run_dir, tmp_path)
    with zipfile.ZipFile(run / "best.keras") as archive:
        config = json.loads(archive.read("config.json"))
    text = json.dumps(config).replace('"units": 100', '"units": 4000000000')
    assert text != json.dumps(config)
    shutil.move(rewritten(run / "best.keras", tmp_path, {"config.json": text}), run / "best.keras")
    _, model, _ = evaluate.load_run(run)  # the file's architecture is never built
    assert model.get_layer("classifier").units == 100


def test_a_model_file_holding_more_than_the_model_is_refused_before_it_is_read(run_dir, tmp_path):
    run = copy(run_dir, tmp_path)
    bomb = rewritten(run / "best.keras", tmp_path, {"padding.bin": bytes(200 << 20)})  # 200 MB of zeros
    shutil.move(bomb, run / "best.keras")
    assert (run / "best.keras").stat().st_size < 2 << 20
    started = time.perf_counter()
    with pytest.raises(RunError, match=r"best.keras: holds 4 files of \d+ bytes, more than this run's model"):
        evaluate.load_run(run)
    assert time.perf_counter() - started < 10

    h5 = io.BytesIO()
    with h5py.File(h5, "w") as weights:  # a small file that declares a 4 GB array
        weights.create_dataset("layers/dense/vars/0", shape=(10**9,), dtype="f4", chunks=(1 << 20,),
                               compression="gzip")
    shutil.move(rewritten(run_dir / "best.keras", tmp_path, {"model.weights.h5": h5.getvalue()}), run / "best.keras")
    with pytest.raises(RunError, match=r"its weights file holds 4000000000 bytes of arrays"):
        evaluate.load_run(run)


def test_compare_skips_each_bad_folder_in_one_line_and_shows_every_good_run(tmp_path, capsys):
    good = [fake_run(tmp_path, "/data/syn", True, top1, seed=seed) for seed, top1 in ((0, 0.5), (1, 0.6))]
    wrong_types = fake_run(tmp_path, "/data/syn", True, 0.5, seed=2)
    (wrong_types / "results.json").write_text(json.dumps({"test": {"top1": "high", "top5": [1]}, "data": []}))
    wrong_shape = fake_run(tmp_path, "/data/syn", True, 0.5, seed=3)
    (wrong_shape / "results.json").write_text(json.dumps({"test": {"top1": 0.5, "top5": 0.6}, "data": [1, 2]}))
    huge = fake_run(tmp_path, "/data/syn", True, 0.5, seed=4)
    (huge / "results.json").write_text('{"test": {"top1": ' + "1" * 5000 + ', "top5": 1}}')
    fifo = fake_run(tmp_path, "/data/syn", True, 0.5, seed=5)
    (fifo / "state.json").unlink()
    os.mkfifo(fifo / "state.json")
    folder_in_place = fake_run(tmp_path, "/data/syn", True, 0.5, seed=7)
    (folder_in_place / "state.json").unlink()
    (folder_in_place / "state.json").mkdir()
    fake_run(tmp_path, "/data/syn", True, 0.55, seed=6).rename(tmp_path / "evil\x1b[2J\x1b[31mname")
    started = time.perf_counter()
    table = compare.format_table(compare.group_runs(compare.find_runs(tmp_path)))
    err = capsys.readouterr().err
    assert time.perf_counter() - started < 10
    assert all(folder.name in table for folder in good) and "evil\\x1b[2J\\x1b[31mname" in table
    assert "\x1b" not in table + err
    skipped = [line for line in err.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 5 and len(err.strip().splitlines()) == 5
    for folder in (wrong_types, wrong_shape, huge):
        assert any(str(folder) in line for line in skipped), folder
    for folder in (fifo, folder_in_place):  # the file named (a folder: not a file descriptor's number)
        assert any(f"{folder / 'state.json'}: state.json is not a regular file" in line for line in skipped), folder


def test_a_saved_config_is_checked_when_it_is_read_back(run_dir, tmp_path):
    run = copy(run_dir, tmp_path)
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "image_size": 99999999999}))
    with pytest.raises(ConfigError, match=r"config.json: setting 'image_size' must be >= 1 and <= 1024"):
        Config.load(run / "config.json")
    (run / "config.json").write_text(json.dumps({**saved, "batch_size": "many"}))
    with pytest.raises(ConfigError, match=r"setting 'batch_size' must be an integer, got 'many'"):
        evaluate.load_run(run)


@pytest.mark.parametrize("change,message", [
    ({"fine_to_coarse": [0] * 100}, None),  # a wrong mapping that is well formed: the dataset's is used
    ({"fine_to_coarse": [99] * 100}, "fine_to_coarse must give each of the 100 classes the index"),
    ({"class_names": "apple"}, "class_names must be a list"),
    ({"class_names": ["\x1b[2J"] * 100}, "name 0 must be 1 to 100 printable characters"),
])
def test_classes_json_is_checked_and_superclasses_come_from_the_data(run_dir, tmp_path, synthetic_cifar100,
                                                                   change, message):
    run = copy(run_dir, tmp_path)
    classes = json.loads((run / "classes.json").read_text())
    (run / "classes.json").write_text(json.dumps({**classes, **change}))
    if message:
        with pytest.raises(RunError, match=message):
            evaluate.load_run(run)
        return
    metrics = evaluate.evaluate_run(run)
    dataset = data.load(synthetic_cifar100)
    predicted = evaluate.predict_probabilities(evaluate.load_run(run)[1], dataset.x_test).argmax(1)
    truth = np.mean(dataset.fine_to_coarse[predicted] == dataset.fine_to_coarse[dataset.y_test])
    assert metrics["superclass_accuracy"] == pytest.approx(truth, abs=1e-4)


def test_callback_state_from_a_backup_sets_only_what_resume_state_saves(tmp_path):
    backup = tmp_path / "run" / "backup" / "finetune"
    backup.mkdir(parents=True)
    state = {"reduce_lr": None, "early_stopping": {"wait": 1, "best": 0.5, "best_epoch": 2, "stopped_epoch": 0},
             "stopped": False, "mining": None}
    ResumeState.save(backup, 3, state)
    assert ResumeState.load(backup, 3) == state
    unimproved = {**state, "reduce_lr": {"wait": 1, "best": float("inf"), "cooldown_counter": 0}}  # no epoch yet
    ResumeState.save(backup, 3, unimproved)
    assert ResumeState.load(backup, 3) == unimproved
    for bad in ({**state, "early_stopping": {**state["early_stopping"], "model": "x"}},
                {**state, "early_stopping": {**state["early_stopping"], "wait": "0"}},
                {**state, "early_stopping": {**state["early_stopping"], "wait": 1e300}},  # stops at once
                {**state, "early_stopping": {**state["early_stopping"], "best_epoch": -1}},
                {**state, "early_stopping": {**state["early_stopping"], "best": float("nan")}},
                {**state, "reduce_lr": {"wait": 0, "best": 1.0, "cooldown_counter": -1e300}},
                {**state, "stopped": "yes"}):
        ResumeState.save(backup, 3, bad)
        with pytest.raises(RunError, match=r"callbacks-0003.json: damaged callback state"):
            ResumeState.load(backup, 3)
    for epoch in (9998, 9999, 10000, 10001):  # kept and found by epoch: by name, 10000 sorts before 9999
        ResumeState.save(backup, epoch, {**state, "early_stopping": {**state["early_stopping"], "best_epoch": epoch}})
    assert sorted(path.name for path in backup.iterdir()) == ["callbacks-10000.json", "callbacks-10001.json",
                                                             "callbacks-9999.json"]
    assert ResumeState.load(backup)["early_stopping"]["best_epoch"] == 10001
    with pytest.raises(RunError, match=r"callbacks-0003.json: missing: the state of the callbacks"):
        ResumeState.load(backup, 3, required=True)
    assert ResumeState.load(backup, 3) is None


def test_a_mining_state_that_does_not_fit_the_run_is_named_not_dropped():
    """A resumed run continues mining where it stopped: a state of another length, infinite losses or none at all
    was dropped without a word, and the run went on as if it had never mined."""
    from cifar100.batches import TrainBatches
    from cifar100.mining import HardExampleMining, SelectiveBackprop

    sampler = TrainBatches(np.zeros((6, 32, 32, 3), np.uint8), np.arange(6) % 3, 3, 2, weighted=True)
    reweight = HardExampleMining(sampler)
    reweight.set_state({"losses": [0.5, None, 1.0, 2.0, 0.1, 3.0]})
    assert reweight.losses[2] == 1.0 and np.isnan(reweight.losses[1]) and sampler.weights is not None
    for bad in ({"losses": [0.5] * 5}, {"losses": [[0.5]] * 6}, {"losses": [float("inf")] * 6}, {"losses": ["x"] * 6},
                {}, None):
        with pytest.raises(RunError, match=r"damaged mining state .*expected 6 losses"):
            reweight.set_state(bad)
    selective = SelectiveBackprop(window=4)
    selective.make_state(keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, activation="softmax")]))
    selective.set_state({"window": [float("nan"), 0.2, 0.3, 0.4], "seen": 9})  # NaN: a scoring pass of NaN
    assert int(keras.ops.convert_to_numpy(selective.seen.value)) == 9
    for bad in ({"window": [0.1] * 3, "seen": 9}, {"window": [float("inf")] * 4, "seen": 9}, {"seen": 9},
                {"window": [-1.0] * 4, "seen": 9}, None):
        with pytest.raises(RunError, match=r"damaged mining state .*a window of 4 recent losses"):
            selective.set_state(bad)


def test_a_torn_last_row_of_the_history_is_dropped_and_a_damaged_one_is_named(tmp_path):
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss,val_accuracy\n0,1.0,0.1\n1,0.9,0.2\n2,0.")  # a write cut short
    assert [row["epoch"] for row in run_folder.history_rows(tmp_path)] == ["0", "1"]
    run_folder.trim_history(history, 5)
    assert history.read_text() == "epoch,loss,val_accuracy\n0,1.0,0.1\n1,0.9,0.2\n"
    history.write_text("epoch,loss,val_accuracy\n0,1.0,0.1\n1,0.9\n2,0.8,0.3\n")  # a short row inside
    with pytest.raises(RunError, match=r"damaged history .*line 3 is not a row"):
        run_folder.history_rows(tmp_path)
    history.write_text("epoch,loss,val_accuracy\n0,1.0,0.1\n0,0.9,0.2\n")  # an epoch twice
    with pytest.raises(RunError, match=r"line 3 is not a row of a later epoch"):
        run_folder.history_rows(tmp_path)


def test_a_run_whose_loss_turns_nan_stops_in_one_line_before_the_evaluation(synthetic_cifar100, tmp_path):
    config = make_config("smoke", {"data_dir": str(synthetic_cifar100), "runs_dir": str(tmp_path), "name": "nan",
                                   "finetune_learning_rate": 1e30, "finetune_epochs": 3})
    with pytest.raises(RunError, match=r"phase 'finetune': the training loss became nan at epoch 1, and "
                                       r"TerminateOnNaN stopped the run; nothing was evaluated"):
        train.run(config, verbose=0)
    assert not (tmp_path / "nan" / "results.json").exists()


def test_a_dataset_with_an_empty_set_or_bad_class_names_is_refused_by_verify(tmp_path):
    x, y = np.zeros((10, 32, 32, 3), np.uint8), np.arange(10)
    empty = write_data.write_official(tmp_path / "empty", "cifar100", x, y, x[:0], y[:0])
    with pytest.raises(DatasetError, match=r"the test set holds no images"):
        data.load(empty)
    for name, message in (("x" * 1_000_000, "name 3 must be 1 to 100 printable characters, found str"),
                          ("bad\x1b[31m", "name 3 must be 1 to 100 printable characters")):
        folder = write_data.write_official(tmp_path / f"names{len(name)}", "cifar10", x, y, x, y,
                                           class_names=[*data.CIFAR10_NAMES[:3], name, *data.CIFAR10_NAMES[4:]])
        with pytest.raises(DatasetError, match=message):
            data.load(folder)


def pickled(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def test_a_pickle_of_colliding_keys_a_huge_integer_or_too_many_opcodes_is_refused_at_once(tmp_path):
    from cifar100.safe_pickle import unpickle

    modulus = 2**61 - 1  # hash(k * modulus) == 0 for every k: every key collides
    colliding = {k * modulus: 0 for k in range(1, 3000)}
    (tmp_path / "collide").write_bytes(pickled({"data": colliding}))
    (tmp_path / "huge").write_bytes(pickled({"labels": [10**5000]}))
    (tmp_path / "long").write_bytes(b"\x80\x02" + b"N" * 2_000_001 + b"}.")  # each N pushes a None
    started = time.perf_counter()
    with pytest.raises(DatasetError, match=r"long: unsafe file, nothing was run: more than 2,000,000 pickle opcodes"):
        unpickle(tmp_path / "long")
    with pytest.raises(DatasetError, match=r"collide: unsafe file, nothing was run: more than 1000 dict"):
        unpickle(tmp_path / "collide")
    with pytest.raises(DatasetError, match=r"huge: unsafe file, nothing was run: an integer of more than 256 bits"):
        unpickle(tmp_path / "huge")
    assert time.perf_counter() - started < 5


def test_data_synthetic_never_overwrites_a_dataset_and_checks_its_numbers(tmp_path, capsys):
    real = write_data.write_synthetic(tmp_path / "cifar-100-python", n_train=100, n_test=20)
    before = {p.name: p.read_bytes() for p in real.iterdir()}
    assert main(["data", "synthetic", str(real)]) == 2
    assert "already holds a dataset (DATASET.json, meta, test, train): nothing was written" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in real.iterdir()} == before
    for args, message in ((["--train", "0"], "training images must be 1 to 100000, got 0"),
                          (["--test", "-5"], "test images must be 1 to 100000, got -5"),
                          (["--train", "10000000000"], "training images must be 1 to 100000"),
                          (["--seed", "-1"], "the seed must be 0 to 4294967295, got -1")):
        assert main(["data", "synthetic", str(tmp_path / "new"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "new").exists()


def test_class_names_with_mathtext_draw_as_text(tmp_path):
    names = [r"$\frac{", "$x$", "plain"]
    images = np.zeros((3, 32, 32, 3), np.uint8)
    figure = plots.misclassified(images, np.array([0, 1, 2]), np.array([1, 2, 0]), names)
    figure.savefig(tmp_path / "figure.png")  # mathtext would fail on the first name
    assert (tmp_path / "figure.png").stat().st_size > 0


def test_evaluate_on_a_folder_that_does_not_exist_creates_nothing(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: run folder not found" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()


def test_figures_check_the_saved_predictions_and_hardest_examples(run_dir, tmp_path, synthetic_cifar100):
    run = copy(run_dir, tmp_path)
    evaluate.evaluate_run(run)
    dataset = data.load(synthetic_cifar100)
    with pytest.raises(RunError, match=r"history.csv: no epochs with loss, accuracy and learning rate"):
        plots.run_figures(run, dataset)
    (run / "history.csv").write_text("epoch,accuracy,learning_rate,loss,val_accuracy,val_loss\n"
                                     "0,0.1,0.01,4.0,0.1,4.1\n")
    assert set(plots.run_figures(run, dataset)) >= {"training_curves", "confused_pairs", "misclassified"}
    np.savez(run / "test_predictions.npz", probabilities=np.array([object()] * 3), labels=dataset.y_test)
    with pytest.raises(RunError, match=r"test_predictions.npz: does not hold this dataset's test predictions"):
        plots.run_figures(run, dataset)
    np.savez(run / "test_predictions.npz", probabilities=np.zeros((5, 100)), labels=dataset.y_test[:5])
    with pytest.raises(RunError, match=r"test_predictions.npz: does not hold this dataset's test predictions"):
        plots.run_figures(run, dataset)
    (run / "test_predictions.npz").write_bytes(b"PK\x03\x04garbage")  # not a zip archive
    with pytest.raises(RunError, match=r"test_predictions.npz: does not hold .* \(BadZipFile"):
        plots.run_figures(run, dataset)
    header = io.BytesIO()  # a small file that declares 8 TB of probabilities
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    with zipfile.ZipFile(run / "test_predictions.npz", "w") as archive:
        archive.writestr("probabilities.npy", header.getvalue() + bytes(64))
        archive.writestr("labels.npy", header.getvalue())
    with pytest.raises(RunError, match=r"test_predictions.npz: does not hold this dataset's test predictions"):
        plots.run_figures(run, dataset)
    evaluate.evaluate_run(run)
    results = json.loads((run / "results.json").read_text())
    results["hardest_examples"] = {"train_set_indices": [10**9], "labels": [0], "losses": [1.0]}
    (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(RunError, match=r"results.json: damaged hardest_examples"):
        plots.run_figures(run, dataset)


def test_prediction_batches_stay_small_at_any_image_size():
    sizes = {size: models.inference_batch_size(Config(image_size=size, batch_size=64)) for size in (32, 160, 1024)}
    assert sizes[32] == 128 and sizes[160] == 109 and sizes[1024] == 2


def test_a_history_epoch_of_other_digits_and_results_of_the_wrong_shape_are_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "history.csv").write_text("epoch,loss\n0,1.0\n\u00b2,0.9\n")  # '²' is a digit to str.isdigit
    with pytest.raises(RunError, match=r"line 3 is not a row of a later epoch"):
        run_folder.history_rows(tmp_path)
    run = copy(run_dir, tmp_path)
    (run / "results.json").write_text('{"data": []}')
    assert main(["evaluate", str(run)]) == 0  # the run's own data: the metrics written again
    assert isinstance(json.loads((run / "results.json").read_text())["data"], dict)
    from cifar100.__main__ import _print_results

    for test in ('{"top1": "x"}', '{"top1": true, "top5": NaN, "images": 10}', '{"top1": 0.5, "top5": 0.9}'):
        (run / "results.json").write_text(f'{{"test": {test}}}')
        with pytest.raises(RunError, match=r"results.json: damaged results.json \(no test top1, top5 and images\)"):
            _print_results(run)
