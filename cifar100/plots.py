"""Figures of a run and of several runs. Each function returns a matplotlib Figure (never calls plt.show);
`save` writes one as PNG into the run folder's figures/."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

SYNTHETIC_NOTE = " (SYNTHETIC data, not CIFAR-100)"


def save(figure: Figure, run_dir: str | Path, name: str) -> Path:
    folder = Path(run_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _note(synthetic: bool) -> str:
    return SYNTHETIC_NOTE if synthetic else ""


def read_history(run_dir: str | Path) -> dict[str, np.ndarray]:
    with open(Path(run_dir) / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {key: np.array([float(r[key]) if r[key] else np.nan for r in rows]) for key in rows[0]} if rows else {}


def training_curves(history: dict[str, np.ndarray], phase_boundary: int | None = None, title: str = "",
                    synthetic: bool = False) -> Figure:
    """Loss and accuracy per epoch (training and validation), the learning rate, and the phase boundary."""
    epochs = history["epoch"] + 1
    figure, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4))
    panels = ((loss_ax, "loss", "cross-entropy loss"), (acc_ax, "accuracy", "top-1 accuracy"))
    for ax, key, label in panels:
        ax.plot(epochs, history[key], "o-", label="training")
        ax.plot(epochs, history[f"val_{key}"], "s-", label="validation (from the training set)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label.capitalize() + " per epoch")
    acc_ax.set_ylim(0, 1)
    lr_ax.plot(epochs, history["learning_rate"], "o-", color="tab:green")
    lr_ax.set_yscale("log")
    lr_ax.set_xlabel("epoch")
    lr_ax.set_ylabel("learning rate (log scale)")
    lr_ax.set_title("Learning rate")
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if phase_boundary:
            ax.axvline(phase_boundary + 0.5, color="grey", linestyle="--", label="frozen | fine-tuning")
    loss_ax.legend(fontsize=8)
    figure.suptitle((title or "Training") + _note(synthetic))
    figure.tight_layout()
    return figure


def run_label(results: dict) -> str:
    label = f"{results.get('backbone', '?')} @ {results.get('image_size', '?')} px"
    if results.get("data", {}).get("synthetic"):
        label += "\n(synthetic)"
    return f"{results.get('run', '')}\n{label}"


def compare_runs(all_results: list[dict], title: str = "Test accuracy by run") -> Figure:
    """Test top-1 and top-5 of several runs side by side, labelled with backbone and image size."""
    figure, ax = plt.subplots(figsize=(max(6, 1.8 * len(all_results) + 2), 4.5))
    if not all_results:
        ax.text(0.5, 0.5, "no finished runs found", ha="center", va="center")
        ax.set_axis_off()
        return figure
    positions = np.arange(len(all_results))
    top1 = [r["test"]["top1"] for r in all_results]
    top5 = [r["test"]["top5"] for r in all_results]
    bars = ax.bar(positions - 0.2, top1, width=0.4, label="top-1")
    ax.bar(positions + 0.2, top5, width=0.4, label="top-5", alpha=0.6)
    ax.bar_label(bars, labels=[f"{v:.1%}" for v in top1], fontsize=8)
    ax.set_xticks(positions, [run_label(r) for r in all_results], fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-0.5 - 0.5 * (len(all_results) < 3), len(all_results) - 0.5 + 0.5 * (len(all_results) < 3))
    ax.legend(loc="lower right")
    synthetic = any(r.get("data", {}).get("synthetic") for r in all_results)
    ax.set_title(title + (" (runs marked synthetic are NOT CIFAR-100)" if synthetic else ""))
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def find_results(runs_dir: str | Path = "models") -> list[dict]:
    """results.json of every finished run under runs_dir that has test metrics, sorted by run name."""
    found = []
    for path in sorted(Path(runs_dir).glob("*/results.json")):
        results = json.loads(path.read_text())
        if "test" in results:
            found.append(results)
    return found


def superclass_confusion(labels: np.ndarray, predicted: np.ndarray, fine_to_coarse: np.ndarray,
                         coarse_names: list[str], synthetic: bool = False) -> Figure:
    """The 20x20 confusion matrix of superclasses, each row normalised to the share of its test images."""
    from sklearn.metrics import confusion_matrix

    n = len(coarse_names)
    matrix = confusion_matrix(fine_to_coarse[labels], fine_to_coarse[predicted], labels=np.arange(n))
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    figure, ax = plt.subplots(figsize=(11, 9.5))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    names = [name.replace("_", " ") for name in coarse_names]
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted superclass")
    ax.set_ylabel("true superclass")
    for i in range(n):
        ax.text(i, i, f"{shares[i, i]:.0%}", ha="center", va="center", fontsize=6,
                color="white" if shares[i, i] > 0.5 else "black")
    figure.colorbar(image, ax=ax, label="share of the true superclass's test images")
    ax.set_title("Superclass confusion on the test set" + _note(synthetic))
    figure.tight_layout()
    return figure


def confused_pairs(most_confused: list[dict], synthetic: bool = False) -> Figure:
    """The most frequent (true -> predicted) mistakes between fine classes."""
    figure, ax = plt.subplots(figsize=(8, 0.4 * max(len(most_confused), 3) + 1.2))
    if not most_confused:
        ax.text(0.5, 0.5, "no confusions: every test image was classified correctly", ha="center", va="center")
        ax.set_axis_off()
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


def image_grid(images: np.ndarray, captions: list[str], title: str, columns: int = 8) -> Figure:
    rows = max(1, int(np.ceil(len(images) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.95), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, image, caption in zip(axes.flat, images, captions, strict=False):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def misclassified(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, class_names: list[str],
                  count: int = 24, synthetic: bool = False) -> Figure:
    """Test images the model got wrong, with true and predicted class names."""
    wrong = np.flatnonzero(labels != predicted)[:count]
    captions = [f"true: {class_names[labels[i]]}\npred: {class_names[predicted[i]]}" for i in wrong]
    title = "Misclassified test images" if len(wrong) else "Misclassified test images: none"
    return image_grid(images[wrong], captions, title + _note(synthetic))


def hardest_examples(images: np.ndarray, labels: np.ndarray, losses: np.ndarray, class_names: list[str],
                     synthetic: bool = False) -> Figure:
    """The training examples that hard-example mining found hardest, with their cross-entropy."""
    captions = [f"{class_names[y]}\nloss {loss:.2f}" for y, loss in zip(labels, losses, strict=True)]
    return image_grid(images, captions, "Hardest training examples found by hard-example mining"
                      + _note(synthetic))


def samples_per_class(images: np.ndarray, labels: np.ndarray, class_names: list[str], classes: int = 10,
                      per_class: int = 8, synthetic: bool = False) -> Figure:
    """A grid of training images: one row per class (the first `classes` classes)."""
    figure, axes = plt.subplots(classes, per_class, figsize=(per_class * 1.2, classes * 1.25), squeeze=False)
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
    figure.suptitle("Sample training images per class (32x32)" + _note(synthetic))
    figure.tight_layout()
    return figure


def class_balance(labels: np.ndarray, class_names: list[str], synthetic: bool = False) -> Figure:
    """Training images per class."""
    counts = np.bincount(labels, minlength=len(class_names))
    figure, ax = plt.subplots(figsize=(14, 3.5))
    ax.bar(range(len(counts)), counts)
    step = max(1, len(class_names) // 50)
    ax.set_xticks(range(0, len(counts), step), class_names[::step], rotation=90, fontsize=7)
    ax.set_ylabel("training images")
    ax.set_title(f"Class balance: {counts.min()} to {counts.max()} images per class" + _note(synthetic))
    figure.tight_layout()
    return figure


def run_figures(run_dir: str | Path, dataset) -> dict[str, Figure]:
    """Every figure of one finished run (after evaluation), saved as PNG into run_dir/figures/."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    state = json.loads((run_dir / "state.json").read_text())
    synthetic = bool(results.get("data", {}).get("synthetic"))
    names = dataset.class_names
    predictions = np.load(run_dir / "test_predictions.npz")
    labels, predicted = predictions["labels"], predictions["probabilities"].argmax(1)
    title = f"{results['run']}: {results['backbone']} at {results['image_size']} px"
    figures = {"training_curves": training_curves(read_history(run_dir), state.get("head_epochs_done"), title,
                                                  synthetic)}
    if dataset.fine_to_coarse is not None:
        figures["superclass_confusion"] = superclass_confusion(labels, predicted, dataset.fine_to_coarse,
                                                               dataset.coarse_names, synthetic)
    figures["confused_pairs"] = confused_pairs(results["test"]["most_confused"], synthetic)
    figures["misclassified"] = misclassified(dataset.x_test, labels, predicted, names, synthetic=synthetic)
    hardest = results.get("hardest_examples")
    if hardest:
        keep = slice(0, 24)
        figures["hardest_examples"] = hardest_examples(
            dataset.x_train[hardest["train_set_indices"][keep]], np.array(hardest["labels"][keep]),
            np.array(hardest["losses"][keep]), names, synthetic)
    for name, figure in figures.items():
        save(figure, run_dir, name)
    return figures
