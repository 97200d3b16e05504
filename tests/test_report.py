import json

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from cifar100 import report  # noqa: E402
from cifar100.data import Dataset  # noqa: E402
from cifar100.runs import RunError  # noqa: E402

HEADER = "phase,epoch,loss,accuracy,val_loss,val_accuracy,val_top5,learning_rate,seconds"


def fake_dataset(n_test=40, name="SYNTHETIC data in the CIFAR-100 format") -> Dataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100 + n_test, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(100 + n_test) % 10
    return Dataset(images[:100], labels[:100], images[100:], labels[100:], [f"class_{k}" for k in range(10)],
                   np.arange(10) // 2, [f"group_{k}" for k in range(5)], name)


def fake_results(dataset, wrong=3, val=0.5, test=0.4, data="CIFAR-100") -> dict:
    predicted = dataset.y_test.copy()
    predicted[:wrong] = (predicted[:wrong] + 1) % 10
    return {"data": {"name": data, "classes": 10}, "validation": {"top1": val, "top5": 0.9},
            "test": {"top1": test, "top5": 0.9, "per_class": list(np.linspace(0.1, 1, 10)[::-1])},
            "test_predictions": predicted.tolist(), "seconds": 125.0, "train_images_per_second": 100.0,
            "device": "cpu", "epochs": 5}


def write_run(folder, config=None, val=0.5, test=0.4, optimizer="Adam(learning_rate=0.0001)", data="CIFAR-100"):
    folder.mkdir(parents=True)
    head = {"optimizer": "Adam(learning_rate=0.001)", "loss": "CategoricalCrossentropy()", "trains": "2 of 9"}
    files = {"config.json": {"preset": "smoke", "seed": 0, "head_epochs": 2, "data_dir": str(folder), **(config or {})},
             "recipe.json": {"model": ["Input", "Dense"], "head": head, "finetune": {**head, "optimizer": optimizer}},
             "results.json": fake_results(fake_dataset(), val=val, test=test, data=data)}
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return folder


def test_training_curves_draw_the_phase_boundary_between_head_and_finetune(tmp_path):
    rows = [f"{p},{e},{2 / e},{0.1 * e},{2.2 / e},{0.09 * e},{0.3 + 0.05 * e},{1e-3 / e},3.5"
            for p, e in [("head", 1), ("head", 2), ("finetune", 3), ("finetune", 4), ("finetune", 5)]]
    (tmp_path / "history.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    figure = report.training_curves(tmp_path)
    assert (tmp_path / "figures" / "training_curves.png").stat().st_size > 10_000
    for ax in figure.axes:
        (boundary,) = [line for line in ax.lines if line.get_label() == "fine-tuning starts"]
        assert list(boundary.get_xdata()) == [2.5, 2.5]
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel()
    (rates,) = [line for line in figure.axes[2].lines if line.get_label() == "learning rate"]
    assert list(rates.get_ydata()) == pytest.approx([1e-3 / e for e in range(1, 6)])  # every epoch, on a linear scale
    assert [line.get_label() for line in figure.axes[1].lines][:3] == ["training top-1", "validation top-1",
                                                                       "validation top-5"]


def test_a_malformed_history_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "history.csv").write_text(HEADER + "\nhead,1,not a number,0.1\n")
    with pytest.raises(RunError, match="history.csv"):
        report.training_curves(tmp_path)


def test_each_run_figure_writes_its_png(tmp_path):
    dataset = fake_dataset()
    results = fake_results(dataset, wrong=3)
    assert len(report.samples(dataset).axes) == 10 * 8
    figure = report.confusion(results, dataset, tmp_path)
    shares = figure.axes[0].images[0].get_array()
    assert np.allclose(shares.sum(1), 1) and shares[0, 0] == 0.75  # class 0: 3 of its 4 test images wrong
    figure = report.per_class_accuracy(results, dataset, tmp_path)
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()][:2] == ["class_9", "class_8"]  # worst first
    figure = report.misclassified(results, dataset, tmp_path)
    assert [ax.get_title() for ax in figure.axes if ax.images] == [
        "class_0 ->\nclass_1", "class_1 ->\nclass_2", "class_2 ->\nclass_3"]
    for name in ("confusion", "per_class_accuracy", "misclassified"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 5_000
    report.misclassified(fake_results(dataset, wrong=0), dataset, tmp_path / "none")
    assert (tmp_path / "none" / "figures" / "misclassified.png").exists()
    with pytest.raises(RunError, match="test_predictions"):
        report.confusion({**results, "test_predictions": [0, 1]}, dataset, tmp_path)


def test_hardest_examples_shows_the_highest_losses_first(tmp_path):
    from cifar100.keras_fixes import keras

    dataset = fake_dataset()
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    figure = report.hardest_examples(model, dataset.x_train, dataset.y_train, dataset, tmp_path, count=6, limit=50)
    probabilities = model.predict(dataset.x_train[:50], verbose=0)
    losses = -np.log(np.clip(probabilities[np.arange(50), dataset.y_train[:50]], 1e-7, 1))
    captions = [ax.get_title() for ax in figure.axes if ax.images]
    assert len(captions) == 6 and f"loss {losses.max():.2f}" in captions[0]
    assert "first 50 training images" in figure.texts[0].get_text()
    assert (tmp_path / "figures" / "hardest_examples.png").stat().st_size > 5_000


def test_compare_averages_seeds_labels_what_differs_and_skips_damaged_runs(tmp_path, capsys):
    runs = tmp_path / "models"
    current = write_run(runs / "a", val=0.5, test=0.40)
    write_run(runs / "b", {"seed": 1}, val=0.6, test=0.42)
    write_run(runs / "c", {"head_epochs": 3}, val=0.7, test=0.30)
    write_run(runs / "d", {"head_epochs": 9}, data="SYNTHETIC data in the CIFAR-100 format")
    write_run(runs / "e", {"head_epochs": 4})
    (runs / "e" / "results.json").write_text(json.dumps({"data": {"name": "CIFAR-100"}, "validation": {"top1": "x"}}))
    (runs / "unfinished").mkdir()
    figure = report.compare(runs, current=current)
    out = capsys.readouterr().out
    assert "skipped e: " in out and "results.json" in out and "unfinished" not in out
    lines = [line for line in out.splitlines() if "head_epochs=" in line]
    assert len(lines) == 2 and "head_epochs=9" not in out  # synthetic data: another group
    assert lines[0].startswith("  head_epochs=3 ") and "70.00%" in lines[0] and "1 run" in lines[0]
    assert lines[1].startswith("* head_epochs=2 ") and "2 seeds" in lines[1] and "55.00% ± 7.07%" in lines[1]
    assert "41.00%" in lines[1] and "2.1 min" in lines[1]
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["head_epochs=3", "head_epochs=2\n(2 seeds)"]
    assert [t.get_fontweight() for t in ax.get_yticklabels()] == ["normal", "bold"]
    assert [p.get_width() for p in ax.patches] == pytest.approx([0.7, 0.55])
    assert report.TEST_REPORT in [t.get_text() for t in ax.get_legend().get_texts()]
    assert (current / "figures" / "comparison.png").exists()


def test_labels_name_a_differing_recipe_field_and_no_runs_is_one_line(tmp_path, capsys):
    runs = tmp_path / "models"
    write_run(runs / "sgd", optimizer="SGD(learning_rate=0.01, momentum=0.9)")
    write_run(runs / "adamw", optimizer="AdamW(learning_rate=0.0001, weight_decay=0.05)", val=0.6)
    figure = report.compare(runs)
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == [
        "finetune.optimizer=AdamW(learning_rate=…", "finetune.optimizer=SGD(learning_rate=0.…"]
    capsys.readouterr()
    assert report.compare(tmp_path / "empty") is None
    assert capsys.readouterr().out.count("\n") == 1
