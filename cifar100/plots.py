"""Figures of a run and of several runs, as matplotlib Figures (never plt.show); `save` writes one as PNG.
Figures are closed in pyplot once made, so a notebook shows each once and figures made in a loop do not pile up."""

from __future__ import annotations

import functools
import io
import textwrap
import zipfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, PercentFormatter

from cifar100 import data, run_folder
from cifar100.config import RunError, printable


def _plain_text(function):
    """Make a figure function's text plain: names and paths may hold "$", which mathtext would parse (or fail on)."""
    @functools.wraps(function)
    def figure_with_plain_text(*args, **kwargs):
        with plt.rc_context({"text.parse_math": False}):
            return function(*args, **kwargs)

    return figure_with_plain_text


def _subplots(*args, **kwargs) -> tuple[Figure, object]:
    """plt.subplots, with the figure closed in pyplot (it can still be drawn on, saved and displayed)."""
    figure, axes = plt.subplots(*args, **kwargs)
    plt.close(figure)
    return figure, axes


def save(figure: Figure, run_dir: str | Path, name: str) -> Path:
    """The figure as run_dir/figures/<name>.png (written atomically, never through a link)."""
    folder = Path(run_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    if folder.is_symlink():
        raise RunError(f"{folder}: a symbolic link in the run folder; this project writes only regular files there")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    path = folder / f"{name}.png"
    run_folder.write_atomic(path, buffer.getvalue())
    return path


def data_note(synthetic: bool, official: bool | None = True, kind: str = "cifar100") -> str | bool:
    """The figures' `synthetic` argument for a dataset: its data.caveat note, or False."""
    return data.caveat(synthetic, official, kind) or False


def _note(synthetic: bool | str) -> str:
    """The caption for titles: `synthetic` is True, False, or a note of its own (see data_note)."""
    return synthetic if isinstance(synthetic, str) else (data.SYNTHETIC_NOTE if synthetic else "")


def read_history(run_dir: str | Path) -> dict[str, np.ndarray]:
    """history.csv as one array per column, epochs counted from 1 (also in a run an earlier version wrote)."""
    rows = run_folder.history_rows(Path(run_dir))
    history = {key: np.array([float(r[key]) if r[key] else np.nan for r in rows]) for key in rows[0]} if rows else {}
    if rows and history["epoch"][0] == 0:  # an earlier version counted from 0
        history["epoch"] = history["epoch"] + 1
    return history


@_plain_text
def training_curves(history: dict[str, np.ndarray], phase_boundary: int | None = None, title: str = "",
                    synthetic: bool = False) -> Figure:
    """Loss, accuracy and learning rate per epoch, the phase boundary and, with mining, its examples per epoch."""
    epochs = history["epoch"]
    mining = "examples_backprop" in history
    figure, axes = _subplots(1, 4 if mining else 3, figsize=(20 if mining else 15, 4))
    loss_ax, acc_ax, lr_ax = axes[:3]
    if mining:
        _mining_panel(axes[3], epochs, history)
    panels = ((loss_ax, "loss", "cross-entropy loss"), (acc_ax, "accuracy", "top-1 accuracy"))
    for ax, key, label in panels:
        ax.plot(epochs, history[key], "o-", label="training")
        ax.plot(epochs, history[f"val_{key}"], "s-", label="validation (from the training set)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label.capitalize() + " per epoch")
    acc_ax.set_ylim(0, 1)
    rates = history["learning_rate"]
    lr_ax.plot(epochs, rates, "o-", color="tab:green")
    positive = rates[np.isfinite(rates) & (rates > 0)]
    if len(positive) and np.nanmin(rates) <= 0:  # a schedule that ends at 0 (cosine): keep its 0 in view
        lr_ax.set_yscale("symlog", linthresh=float(positive.min()), linscale=0.5)
        lr_ax.set_ylim(bottom=0)
        scale = f"log scale; linear below {positive.min():g}"
    elif len(positive):
        lr_ax.set_yscale("log")
        scale = "log scale"
    else:  # every epoch ended at 0 (a cosine over one short epoch): nothing for a log scale to show
        lr_ax.set_ylim(bottom=0)
        scale = "linear scale"
    # plain numbers: figure text is not parsed as mathtext (_plain_text), which the default log formatter writes
    lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    lr_ax.yaxis.set_minor_formatter(NullFormatter())
    lr_ax.set_xlabel("epoch")
    lr_ax.set_ylabel(f"learning rate ({scale})")
    lr_ax.set_title("Learning rate")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if phase_boundary:
            ax.axvline(phase_boundary + 0.5, color="grey", linestyle="--", label="frozen | fine-tuning")
    loss_ax.legend(fontsize=8)
    figure.suptitle((title or "Training") + _note(synthetic))
    figure.tight_layout()
    return figure


def _mining_panel(ax, epochs: np.ndarray, history: dict[str, np.ndarray]) -> None:
    """Examples per epoch scored (forward only) and backpropagated, with each pass's seconds over the run."""
    for key, seconds, label, style in (("examples_backprop", "backprop_seconds", "backpropagated", "o-"),
                                       ("examples_forward", "forward_seconds", "scored (forward only)", "s--")):
        ax.plot(epochs, history[key], style, label=f"{label}: {np.nansum(history[seconds]):.0f} s in all")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("examples")
    ax.set_title("Hard-example mining: examples per epoch")
    ax.legend(fontsize=8)


TEST_REPORT = "test top-1, reported, not used to choose"


@_plain_text
def compare_runs(groups: list, current: str | None = None) -> Figure:
    """Validation top-1 (and top-5 above 10 classes) of `compare.group_runs` groups: a panel per dataset, bars best
    first, seeds averaged (std as error bar); the test top-1 is a marker, a report only. `current` is in bold."""
    if not groups:
        figure, ax = _subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no finished runs found", ha="center", va="center")
        ax.set_axis_off()
        return figure
    most = max(len(group.rows) for group in groups)
    figure, axes = _subplots(len(groups), 1, figsize=(max(9.0, 1.8 * most + 5), 4.6 * len(groups)), squeeze=False)
    for ax, group in zip(axes[:, 0], groups, strict=True):
        _compare_panel(ax, group, current)
    figure.suptitle("Validation accuracy of every finished run, by dataset, best first (settings are chosen by "
                    "it;\nthe test top-1 is only reported)")
    figure.tight_layout()
    return figure


def _compare_panel(ax, group, current: str | None) -> None:
    rows = group.rows
    positions = np.arange(len(rows))
    several = any(len(row.runs) > 1 for row in rows)
    bars = [("validation.top1", "validation top-1", 1.0)]
    if group.shows_top5:
        bars.append(("validation.top5", "validation top-5", 0.55))
    width = 0.8 / len(bars) if len(bars) > 1 else 0.5
    offsets = (np.arange(len(bars)) - (len(bars) - 1) / 2) * width
    tests = [row.mean("test.top1") for row in rows]
    handles = []
    for offset, (key, name, alpha) in zip(offsets, bars, strict=True):
        means = [row.mean(key) for row in rows]
        errors = [row.std(key) if len(row.runs) > 1 else np.nan for row in rows] if several else None
        handles.append(ax.bar(positions + offset, means, width=width, yerr=errors, capsize=4, label=name,
                              alpha=alpha))
        for x, mean, test, row in zip(positions + offset, means, tests, rows, strict=True):
            top = mean + row.std(key) + 0.015
            if key == "validation.top1":
                top = max(top, test + 0.035)  # above the test marker
            ax.text(x, top, f"{mean:.1%}", ha="center", va="bottom", fontsize=7.5)
    handles += ax.plot(positions + offsets[0], tests, linestyle="none", marker="D", markersize=6,
                       markerfacecolor="white", markeredgecolor="black", label=TEST_REPORT)  # apart: a marker
    labels = [row.label.replace(", ", "\n") + (f"\n({row.runs_text()})" if len(row.runs) > 1 else "")
              for row in rows]
    ax.set_xticks(positions, labels, fontsize=8)
    for tick, row in zip(ax.get_xticklabels(), rows, strict=True):
        if current in [run.name for run in row.runs]:
            tick.set_fontweight("bold")
    spare = max(0.0, (3 - len(rows)) / 2)  # a panel of one or two runs keeps bars of a normal width
    ax.set_xlim(-0.6 - spare, len(rows) - 0.4 + spare)
    ax.set_ylim(0, 1.12)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("validation accuracy")
    ax.set_title(textwrap.fill(group.title, 90), fontsize=10, color="tab:red" if group.synthetic else "black")
    # outside the axes: the legend hides no bar
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)


@_plain_text
def superclass_confusion(labels: np.ndarray, predicted: np.ndarray, fine_to_coarse: np.ndarray,
                         coarse_names: list[str], synthetic: bool = False) -> Figure:
    """The 20x20 confusion matrix of superclasses, each row normalised to the share of its test images."""
    from sklearn.metrics import confusion_matrix

    n = len(coarse_names)
    matrix = confusion_matrix(fine_to_coarse[labels], fine_to_coarse[predicted], labels=np.arange(n))
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    figure, ax = _subplots(figsize=(11, 9.5))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    names = [name.replace("_", " ") for name in coarse_names]
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted superclass")
    ax.set_ylabel("true superclass")
    for i in range(n):
        ax.text(i, i, f"{shares[i, i]:.0%}", ha="center", va="center", fontsize=7,
                color="white" if shares[i, i] > 0.5 else "black")
    figure.colorbar(image, ax=ax, label="share of the true superclass's test images")
    ax.set_title("Superclass confusion on the test set" + _note(synthetic))
    figure.tight_layout()
    return figure


def class_order(num_classes: int, fine_to_coarse: np.ndarray | None = None) -> np.ndarray:
    """The classes in the order the figures list them: grouped by superclass when there are superclasses."""
    classes = np.arange(num_classes)
    return classes if fine_to_coarse is None else np.lexsort((classes, fine_to_coarse))


@_plain_text
def class_confusion(labels: np.ndarray, predicted: np.ndarray, class_names: list[str],
                    fine_to_coarse: np.ndarray | None = None, synthetic: bool = False) -> Figure:
    """The class confusion matrix, rows normalised, by superclass; a square-root colour scale shows small shares."""
    from matplotlib.colors import PowerNorm
    from sklearn.metrics import confusion_matrix

    n = len(class_names)
    order = class_order(n, fine_to_coarse)
    matrix = confusion_matrix(labels, predicted, labels=order)
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    side = 4.5 + 0.11 * n
    figure, ax = _subplots(figsize=(side + 1.5, side))
    image = ax.imshow(shares, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    names = [class_names[k].replace("_", " ") for k in order]
    size = 9 if n <= 20 else 5.5
    ax.set_xticks(range(n), names, rotation=90, fontsize=size)
    ax.set_yticks(range(n), names, fontsize=size)
    if fine_to_coarse is not None:  # the superclasses' borders
        for edge in np.flatnonzero(np.diff(fine_to_coarse[order])) + 0.5:
            ax.axhline(edge, color="grey", linewidth=0.4)
            ax.axvline(edge, color="grey", linewidth=0.4)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, f"{shares[i, j]:.0%}", ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class's test images (square-root scale)")
    grouped = ", ordered by superclass" if fine_to_coarse is not None else ""
    ax.set_title(f"Confusion of the {n} classes on the test set{grouped}" + _note(synthetic))
    figure.tight_layout()
    return figure


@_plain_text
def per_class_accuracy(labels: np.ndarray, predicted: np.ndarray, class_names: list[str],
                       synthetic: bool = False) -> Figure:
    """Test top-1 accuracy of each class (its recall), worst first, with the mean over the classes."""
    n = len(class_names)
    support = np.bincount(labels, minlength=n)
    correct = np.bincount(labels[labels == predicted], minlength=n)
    accuracy = np.divide(correct, support, out=np.full(n, np.nan), where=support > 0)
    order = np.argsort(np.nan_to_num(accuracy, nan=2.0), kind="stable")
    figure, ax = _subplots(figsize=(max(6.0, 0.16 * n + 2), 4))
    ax.bar(range(n), np.nan_to_num(accuracy[order]), color="tab:blue")
    ax.set_xticks(range(n), [class_names[k] for k in order], rotation=90, fontsize=9 if n <= 20 else 6)
    mean = float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else 0.0
    ax.axhline(mean, color="tab:red", linestyle="--", label=f"mean over the classes {mean:.1%}")
    ax.set_ylim(0, 1)
    ax.set_xlim(-0.6, n - 0.4)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("test top-1 of the class")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Test top-1 per class, worst first" + _note(synthetic))
    figure.tight_layout()
    return figure


@_plain_text
def confused_pairs(most_confused: list[dict], synthetic: bool = False) -> Figure:
    """The most frequent (true -> predicted) mistakes between fine classes."""
    figure, ax = _subplots(figsize=(8, 0.4 * max(len(most_confused), 3) + 1.2))
    if not most_confused:
        ax.text(0.5, 0.5, "no confusions: every test image was classified correctly", ha="center", va="center")
        ax.set_axis_off()
        ax.set_title("Most confused pairs of classes" + _note(synthetic))
        return figure
    labels = [f"{p['true']} -> {p['predicted']}" for p in most_confused][::-1]
    counts = [p["count"] for p in most_confused][::-1]
    ax.barh(range(len(counts)), counts, color="tab:red")
    ax.set_yticks(range(len(counts)), labels, fontsize=9)
    ax.set_xlabel("test images (true class -> predicted class)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Most confused pairs of classes" + _note(synthetic))
    ax.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return figure


@_plain_text
def image_grid(images: np.ndarray, captions: list[str], title: str, columns: int = 8) -> Figure:
    rows = max(1, int(np.ceil(len(images) / columns)))
    figure, axes = _subplots(rows, columns, figsize=(columns * 1.6, rows * 2.1), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, image, caption in zip(axes.flat, images, captions, strict=False):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


@_plain_text
def misclassified(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, class_names: list[str],
                  count: int = 24, synthetic: bool = False) -> Figure:
    """Test images the model got wrong, with true and predicted class names."""
    wrong = np.flatnonzero(labels != predicted)[:count]
    captions = [f"true: {class_names[labels[i]]}\npred: {class_names[predicted[i]]}" for i in wrong]
    title = "Misclassified test images" if len(wrong) else "Misclassified test images: none"
    return image_grid(images[wrong], captions, title + _note(synthetic))


@_plain_text
def hardest_examples(images: np.ndarray, labels: np.ndarray, losses: np.ndarray, class_names: list[str],
                     synthetic: bool = False, predicted: np.ndarray | None = None) -> Figure:
    """The training examples the best model finds hardest: label, prediction, cross-entropy."""
    captions = [f"label: {class_names[y]}\n" + (f"pred: {class_names[predicted[i]]}\n" if predicted is not None
                                                else "") + f"loss {loss:.2f}"
                for i, (y, loss) in enumerate(zip(labels, losses, strict=True))]
    return image_grid(images, captions, "Hardest training examples for the best model (the kind mining emphasised)"
                      + _note(synthetic))


@_plain_text
def top_predictions(image: np.ndarray, names: list[str], probabilities: np.ndarray, title: str) -> Figure:
    """An image as the model takes it (32x32), beside its top predicted classes and their probabilities."""
    figure, (left, right) = _subplots(1, 2, figsize=(9, 3), gridspec_kw={"width_ratios": [1, 2]})
    left.imshow(image, interpolation="nearest")
    left.set_axis_off()
    left.set_title("the model's input (32x32)", fontsize=9)
    rows = np.arange(len(names))[::-1]
    right.barh(rows, probabilities, color="tab:blue")
    right.set_yticks(rows, [textwrap.shorten(name, 40) for name in names])
    right.set_xlim(0, 1)
    right.xaxis.set_major_formatter(PercentFormatter(1.0))
    right.set_xlabel("predicted probability")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


@_plain_text
def samples_per_class(images: np.ndarray, labels: np.ndarray, class_names: list[str], classes: int = 10,
                      per_class: int = 8, synthetic: bool = False) -> Figure:
    """A grid of training images: one row per class (the first `classes` classes)."""
    figure, axes = _subplots(classes, per_class, figsize=(per_class * 1.2, classes * 1.25), squeeze=False)
    for row, cls in enumerate(range(min(classes, len(class_names)))):
        members = np.flatnonzero(labels == cls)[:per_class]
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if col < len(members):
                ax.imshow(images[members[col]], interpolation="nearest")
        axes[row, 0].set_ylabel(class_names[cls], rotation=0, ha="right", va="center", fontsize=9)
    shown_classes = min(classes, len(class_names))
    figure.suptitle(f"Sample training images (32x32) of the first {shown_classes} of {len(class_names)} classes"
                    + _note(synthetic))
    figure.tight_layout()
    return figure


@_plain_text
def class_balance(labels: np.ndarray, class_names: list[str], synthetic: bool = False) -> Figure:
    """Images per class of `labels`: the images that train (after the validation split and any cap)."""
    counts = np.bincount(labels, minlength=len(class_names))
    figure, ax = _subplots(figsize=(14, 3.5))
    ax.bar(range(len(counts)), counts)
    step = max(1, len(class_names) // 50)
    ax.set_xticks(range(0, len(counts), step), class_names[::step], rotation=90, fontsize=7)
    ax.set_ylabel("images that train")
    ax.set_title(f"Class balance of the {counts.sum():,} images that train: {counts.min()} to {counts.max()} per "
                 "class" + _note(synthetic))
    figure.tight_layout()
    return figure


def run_figures(run_dir: str | Path, dataset) -> dict[str, Figure | str]:
    """Every figure of a finished, evaluated run, saved in run_dir/figures/ (one that does not apply: a str why)."""
    run_dir = Path(run_dir)
    run_folder.refuse_links(run_dir)
    results = run_folder.read_json(run_dir / "results.json")
    state = run_folder.read_state(run_dir)
    info = results.get("data") if isinstance(results.get("data"), dict) else {}
    synthetic = data_note(info.get("synthetic") is not False, info.get("official"), dataset.kind)
    names = dataset.class_names
    labels, predicted = dataset.y_test, _test_predictions(run_dir, dataset).argmax(1)
    title = printable(f"{results.get('run', run_dir.name)}: {results.get('backbone')} at "
                      f"{results.get('image_size')} px"[:200])
    history = read_history(run_dir)
    if not {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(history):
        raise RunError(f"{run_dir / run_folder.HISTORY}: no epochs with loss, accuracy and learning rate: not a "
                       "finished run")
    figures: dict[str, Figure | str] = {
        "training_curves": training_curves(history, state.get("head_epochs_done"), title, synthetic),
        "class_confusion": class_confusion(labels, predicted, names, dataset.fine_to_coarse, synthetic),
        "per_class_accuracy": per_class_accuracy(labels, predicted, names, synthetic)}
    if dataset.fine_to_coarse is not None:
        figures["superclass_confusion"] = superclass_confusion(labels, predicted, dataset.fine_to_coarse,
                                                               dataset.coarse_names, synthetic)
    else:
        figures["superclass_confusion"] = (f"no superclass confusion: {data.display_name(dataset.kind)} has no "
                                           "superclasses (CIFAR-100 groups its classes in 20 of 5)")
    figures["confused_pairs"] = confused_pairs(_most_confused(results, names), synthetic)
    figures["misclassified"] = misclassified(dataset.x_test, labels, predicted, names, synthetic=synthetic)
    hardest = _hardest(run_dir, results.get("hardest_examples"), dataset)
    if hardest:
        indices, hard_labels, losses, hard_predicted = hardest
        figures["hardest_examples"] = hardest_examples(dataset.x_train[indices], hard_labels, losses, names,
                                                       synthetic, hard_predicted)
    else:
        figures["hardest_examples"] = ("no hardest examples: hard-example mining was off in this run (with "
                                       "HARD_EXAMPLE_MINING = True a run records the training examples its best "
                                       "model finds hardest)")
    for name, figure in figures.items():
        if isinstance(figure, Figure):
            save(figure, run_dir, name)
    return figures


def _test_predictions(run_dir: Path, dataset) -> np.ndarray:
    """The run's saved test probabilities, checked against the dataset's test set (each array's shape and dtype
    read from its header before numpy allocates it: a small file may declare any size)."""
    path = run_dir / "test_predictions.npz"
    stale = (f"{path}: does not hold this dataset's test predictions; run `python -m cifar100 evaluate "
             f"{run_dir}` to make them again")
    expected = {"probabilities": ((len(dataset.y_test), dataset.num_classes), "f"),
                "labels": ((len(dataset.y_test),), "iu")}
    try:
        raw = io.BytesIO(run_folder.read_bytes(path, "test predictions", 1 << 30))
        with zipfile.ZipFile(raw) as archive:
            for name, (shape, kinds) in expected.items():
                with archive.open(f"{name}.npy") as member:
                    version = np.lib.format.read_magic(member)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    found, _, dtype = read_header(member)
                if found != shape or dtype.kind not in kinds:
                    raise RunError(stale)
        raw.seek(0)
        with np.load(raw, allow_pickle=False) as saved:
            probabilities, labels = saved["probabilities"], saved["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise RunError(f"{stale} ({type(exc).__name__}: {str(exc)[:100]})") from None
    if not np.array_equal(labels, dataset.y_test):
        raise RunError(stale)
    return np.nan_to_num(probabilities.astype(np.float32))


def _most_confused(results: dict, names: list[str], top: int = 10) -> list[dict]:
    """results.json's most confused pairs (evaluate.detailed_metrics), those of the dataset's classes."""
    pairs = results.get("test", {}).get("most_confused") if isinstance(results.get("test"), dict) else None
    return [pair for pair in (pairs if isinstance(pairs, list) else [])[:top]
            if isinstance(pair, dict) and pair.get("true") in names and pair.get("predicted") in names
            and isinstance(pair.get("count"), int) and not isinstance(pair.get("count"), bool)
            and 0 < pair["count"] < 10**9]


def _hardest(run_dir: Path, hardest, dataset, keep: int = 24):
    """(train-set indices, labels, losses, predicted or None) of results.json's hardest examples, checked."""
    if not hardest:
        return None
    try:
        indices, labels, losses = (np.asarray(hardest[k][:keep]) for k in ("train_set_indices", "labels", "losses"))
        predicted = np.asarray(hardest["predicted"][:keep]) if "predicted" in hardest else None  # absent in older runs
        classes = [labels] + ([predicted] if predicted is not None else [])
        ok = (indices.dtype.kind in "iu" and losses.dtype.kind in "fiu" and indices.ndim == 1
              and all(c.dtype.kind in "iu" and c.shape == indices.shape for c in classes)
              and indices.shape == losses.shape and np.all((0 <= indices) & (indices < len(dataset.y_train)))
              and all(np.all((0 <= c) & (c < dataset.num_classes)) for c in classes))
    except (TypeError, KeyError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise RunError(f"{run_dir / 'results.json'}: damaged hardest_examples (expected train-set indices, labels "
                       "and losses, one each)")
    return indices, labels, losses.astype(np.float64), predicted
