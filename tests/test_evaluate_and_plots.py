
import matplotlib
import numpy as np
import pytest

from cifar100 import evaluate, plots

matplotlib.use("Agg")

# 4 classes in 2 superclasses: {0, 1} -> 0 and {2, 3} -> 1
NAMES = ["cat", "dog", "car", "bus"]
COARSE = ["animals", "vehicles"]
FINE_TO_COARSE = np.array([0, 0, 1, 1])
LABELS = np.array([0, 0, 1, 1, 2, 2, 3, 3])
PROBABILITIES = np.array([
    [0.70, 0.10, 0.10, 0.10],  # 0 -> 0 right
    [0.25, 0.50, 0.15, 0.10],  # 0 -> 1 wrong, same superclass; true class ranked 2nd
    [0.10, 0.60, 0.20, 0.10],  # 1 -> 1 right
    [0.10, 0.06, 0.80, 0.04],  # 1 -> 2 wrong, other superclass; true class ranked 3rd
    [0.05, 0.05, 0.85, 0.05],  # 2 -> 2 right
    [0.05, 0.05, 0.30, 0.60],  # 2 -> 3 wrong, same superclass
    [0.05, 0.05, 0.10, 0.80],  # 3 -> 3 right
    [0.40, 0.30, 0.20, 0.10],  # 3 -> 0 wrong, other superclass; true class ranked last
])


def test_metrics_match_hand_computed_values():
    m = evaluate.detailed_metrics(PROBABILITIES, LABELS, NAMES, FINE_TO_COARSE, COARSE, top_pairs=10)
    assert m["top1"] == 0.5  # rows 0, 2, 4, 6
    # top-2 isn't top-5 with 4 classes; the module uses k = min(5, C - 1) = 3: all but row 7 have the
    # true class in their 3 most probable
    assert m["top5"] == 0.875
    assert m["per_class"] == {"cat": 0.5, "dog": 0.5, "car": 0.5, "bus": 0.5}
    # superclass of the prediction right for rows 0, 1, 2, 4, 5, 6
    assert m["superclass_accuracy"] == 0.75
    assert m["per_superclass"]["animals"] == {"fine_top1": 0.5, "superclass_accuracy": 0.75, "images": 4}
    assert m["per_superclass"]["vehicles"] == {"fine_top1": 0.5, "superclass_accuracy": 0.75, "images": 4}
    expected_loss = -np.mean(np.log(PROBABILITIES[np.arange(8), LABELS]))
    assert m["loss"] == pytest.approx(expected_loss, abs=1e-4)
    pairs = {(p["true"], p["predicted"]): p["count"] for p in m["most_confused"]}
    assert pairs == {("cat", "dog"): 1, ("dog", "car"): 1, ("car", "bus"): 1, ("bus", "cat"): 1}


def test_top5_on_100_classes_counts_the_five_most_probable():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(100), size=50)
    labels = rng.integers(0, 100, 50)
    ranks = (probabilities > probabilities[np.arange(50), labels][:, None]).sum(1)
    m = evaluate.summary_metrics(probabilities, labels, 100)
    assert m["top5"] == pytest.approx(np.mean(ranks < 5), abs=1e-4)
    assert m["top1"] == pytest.approx(np.mean(probabilities.argmax(1) == labels), abs=1e-4)


def history():
    return {"epoch": np.arange(1.0, 5.0), "loss": np.array([3, 2, 1.5, 1.0]), "val_loss": np.array([3, 2.2, 1.8, 1.6]),
            "accuracy": np.array([.1, .3, .5, .6]), "val_accuracy": np.array([.1, .25, .4, .45]),
            "learning_rate": np.array([1e-3, 1e-3, 1e-4, 3e-5])}


def test_training_curves_have_labelled_axes_and_the_phase_boundary():
    figure = plots.training_curves(history(), phase_boundary=2, title="r", synthetic=True)
    loss, accuracy, lr = figure.axes
    assert loss.get_xlabel() == "epoch" and loss.get_ylabel() == "cross-entropy loss"
    assert accuracy.get_ylabel() == "top-1 accuracy" and lr.get_yscale() == "log"
    assert [line.get_label() for line in loss.get_lines()][:2] == ["training", "validation (from the training set)"]
    assert any(line.get_xdata()[0] == 2.5 for line in accuracy.get_lines())  # the boundary, between epochs 2 and 3
    assert "SYNTHETIC" in figure._suptitle.get_text()
    figure.canvas.draw()  # tick labels are made when drawn: plain numbers, never raw mathtext
    labels = [tick.get_text() for ax in figure.axes for tick in ax.get_yticklabels() + ax.get_xticklabels()]
    assert labels and not [text for text in labels if "$" in text or "mathdefault" in text]


def test_training_curves_show_what_mining_scored_and_backpropagated():
    mined = {**history(), "examples_forward": np.full(4, 1000.0), "examples_backprop": np.array([1000, 600, 400, 350.]),
             "forward_seconds": np.full(4, 2.0), "backprop_seconds": np.array([9, 6, 4, 3.5])}
    figure = plots.training_curves(mined, phase_boundary=2)
    assert len(figure.axes) == 4 and len(plots.training_curves(history()).axes) == 3
    backprop, forward = figure.axes[3].get_lines()[:2]
    np.testing.assert_array_equal(backprop.get_ydata(), [1000, 600, 400, 350])
    assert backprop.get_label() == "backpropagated: 22 s in all"
    assert forward.get_label() == "scored (forward only): 8 s in all"


def test_figures_are_closed_in_pyplot_so_a_notebook_shows_each_once():
    # Jupyter's inline backend shows every figure still open at the end of a cell; the notebook shows each
    # figure by returning it, so a figure left open would appear twice.
    import matplotlib.pyplot as plt

    plt.close("all")
    plots.training_curves(history(), phase_boundary=2)
    plots.confused_pairs([])
    plots.class_balance(np.arange(40) % 4, NAMES)
    plots.misclassified(np.zeros((8, 32, 32, 3), np.uint8), LABELS, PROBABILITIES.argmax(1), NAMES)
    assert plt.get_fignums() == []


def test_superclass_confusion_is_row_normalised_with_names():
    figure = plots.superclass_confusion(LABELS, PROBABILITIES.argmax(1), FINE_TO_COARSE, COARSE)
    ax = figure.axes[0]
    np.testing.assert_allclose(ax.get_images()[0].get_array(), [[0.75, 0.25], [0.25, 0.75]])
    assert [t.get_text() for t in ax.get_yticklabels()] == COARSE
    assert ax.get_xlabel() == "predicted superclass" and ax.get_ylabel() == "true superclass"


def test_confused_pairs_and_image_grids_show_names():
    m = evaluate.detailed_metrics(PROBABILITIES, LABELS, NAMES)
    ax = plots.confused_pairs(m["most_confused"]).axes[0]
    assert "cat -> dog" in [t.get_text() for t in ax.get_yticklabels()]
    images = np.zeros((8, 32, 32, 3), np.uint8)
    grid = plots.misclassified(images, LABELS, PROBABILITIES.argmax(1), NAMES)
    titles = [ax.get_title() for ax in grid.axes if ax.get_title()]
    assert titles[0] == "true: cat\npred: dog" and len(titles) == 4
    hardest = plots.hardest_examples(images[:2], np.array([3, 1]), np.array([4.2, 3.1]), NAMES,
                                     predicted=np.array([0, 2]))
    assert [ax.get_title() for ax in hardest.axes][:2] == ["label: bus\npred: cat\nloss 4.20",
                                                           "label: dog\npred: car\nloss 3.10"]
    samples = plots.samples_per_class(np.zeros((40, 32, 32, 3), np.uint8), np.arange(40) % 4, NAMES, classes=4)
    assert [samples.axes[i * 8].get_ylabel() for i in range(4)] == NAMES
    balance = plots.class_balance(np.arange(40) % 4, NAMES).axes[0]
    assert balance.get_ylabel() == "images that train" and "the 40 images that train: 10 to 10" in balance.get_title()


def test_the_class_confusion_is_ordered_by_superclass_and_row_normalised():
    # classes 0..3 in superclasses [1, 0, 1, 0]: the figure lists dog, bus (superclass 0), then cat, car
    fine_to_coarse = np.array([1, 0, 1, 0])
    predicted = PROBABILITIES.argmax(1)
    figure = plots.class_confusion(LABELS, predicted, NAMES, fine_to_coarse)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["dog", "bus", "cat", "car"]
    shares = ax.get_images()[0].get_array()
    order = [1, 3, 0, 2]
    for i, true in enumerate(order):
        for j, guess in enumerate(order):
            expected = np.mean(predicted[LABELS == true] == guess)
            assert shares[i, j] == pytest.approx(expected)
    assert [line.get_ydata()[0] for line in ax.get_lines() if len(set(line.get_ydata())) == 1][:1] == [1.5]
    big = plots.class_confusion(np.arange(100), np.arange(100), [f"c{k}" for k in range(100)])
    assert big.axes[0].get_images()[0].get_array().shape == (100, 100) and "100 classes" in big.axes[0].get_title()


def test_per_class_accuracy_lists_the_classes_worst_first():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    predicted = np.array([0, 0, 1, 0, 3, 3, 3, 0])  # cat 100%, dog 50%, car 0%, bus 50%
    ax = plots.per_class_accuracy(labels, predicted, NAMES).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["car", "dog", "bus", "cat"]
    assert [bar.get_height() for bar in ax.patches] == [0.0, 0.5, 0.5, 1.0]
    assert "mean over the classes 50.0%" in ax.get_legend().get_texts()[0].get_text()


def test_the_learning_rate_panel_keeps_a_schedule_that_ends_at_zero_in_view():
    cosine = {**history(), "learning_rate": np.array([1e-3, 7e-4, 2e-4, 0.0])}
    lr = plots.training_curves(cosine).axes[2]
    low, _ = lr.get_ylim()
    assert lr.get_yscale() == "symlog" and low <= 0.0  # on a log axis the final 0 would fall off the panel
    lr.figure.canvas.draw()
    assert "0" in [tick.get_text() for tick in lr.get_yticklabels()]
    zeros = plots.training_curves({**history(), "learning_rate": np.zeros(4)}).axes[2]  # one short cosine epoch
    zeros.figure.canvas.draw()
    assert zeros.get_yscale() == "linear" and "linear" in zeros.get_ylabel() and zeros.get_ylim()[0] == 0.0
    assert len(zeros.lines[0].get_ydata()) == 4 and "0" in [tick.get_text() for tick in zeros.get_yticklabels()]


def test_figures_are_saved_as_png(tmp_path):
    path = plots.save(plots.compare_runs([]), tmp_path, "empty")
    assert path == tmp_path / "figures" / "empty.png" and path.read_bytes()[:4] == b"\x89PNG"
