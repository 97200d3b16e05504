"""A run's figures, each saved as <run>/figures/<name>.png and returned (a notebook cell ending in one shows it),
and the comparison of finished runs: grouped by dataset, seeds averaged, chosen by validation, test only reported."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from sklearn.metrics import confusion_matrix

from cifar100.callbacks import cross_entropy
from cifar100.config import RunError, printable
from cifar100.runs import read_file, read_json, write_atomic

COLUMNS = ("epoch", "loss", "accuracy", "top5", "val_loss", "val_accuracy", "val_top5", "learning_rate", "seconds")
NOT_IN_LABELS = ("data_dir", "runs_dir", "seed", "preset")  # the data is the group's; seeds are averaged
TEST_REPORT = "test top-1, reported, not used to choose"


def _text(value, limit: int = 80) -> str:
    """A name from a file or a dataset, safe in a figure: printable, bounded, and no "$" read as mathtext."""
    return printable(str(value))[:limit].replace("$", r"\$")


def _number(value) -> float:
    """`value` as a float if it is a finite number (not a bool), else NaN."""
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300
    return float(value) if finite else math.nan


def _is_share(value) -> bool:
    return 0 <= _number(value) <= 1


def _figure(width: float, height: float) -> Figure:
    """A Figure that pyplot does not keep: a notebook shows it once, as the value of the cell that returns it."""
    figure = plt.figure(figsize=(width, height))
    plt.close(figure)
    return figure


def _save(figure: Figure, run_dir: Path | None, name: str) -> Figure:
    """`figure`, laid out tightly and (with a run_dir) written atomically as run_dir/figures/<name>.png."""
    figure.tight_layout()
    if run_dir is not None:
        write_atomic(Path(run_dir) / "figures" / f"{name}.png",
                     save=lambda temporary: figure.savefig(temporary, format="png", dpi=100))
    return figure


def _grid(images: np.ndarray, captions: list[str], title: str, columns: int = 8) -> Figure:
    """Images in rows of `columns`, each captioned; a figure that says so when there are none."""
    rows = max(1, math.ceil(len(images) / columns))
    figure = _figure(columns * 1.6, rows * 1.9 + 0.7)
    for index, ax in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        ax.set_axis_off()
        if index < len(images):
            ax.imshow(images[index], interpolation="nearest")
            ax.set_title(captions[index], fontsize=7)
    if not len(images):
        figure.text(0.5, 0.45, "none", ha="center", va="center", fontsize=14)
    figure.suptitle(title)
    return figure


def samples(dataset) -> Figure:
    """A few training images of each of the first 10 classes, a row per class."""
    classes, per_class = min(10, dataset.num_classes), 8
    figure = _figure(per_class * 1.1 + 1.6, classes * 1.1 + 0.7)
    for row, ax_row in enumerate(figure.subplots(classes, per_class, squeeze=False)):
        members = np.flatnonzero(dataset.y_train == row)[:per_class]
        for column, ax in enumerate(ax_row):
            ax.set(xticks=[], yticks=[])
            if column < len(members):
                ax.imshow(dataset.x_train[members[column]], interpolation="nearest")
        ax_row[0].set_ylabel(_text(dataset.class_names[row], 30), rotation=0, ha="right", va="center", fontsize=9)
    figure.suptitle(f"{_text(dataset.name)}: training images (32x32) of the first {classes} classes")
    return _save(figure, None, "samples")


def _history(run_dir: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """history.csv's numeric columns, one array each, and each epoch's phase."""
    path = Path(run_dir) / "history.csv"
    try:
        rows = list(csv.DictReader(io.StringIO(read_file(path).decode("utf-8"))))
        phases = [row["phase"] for row in rows]
        history = {key: np.array([float(row[key]) if row[key] != "" else np.nan for row in rows])
                   for key in COLUMNS if key in rows[0]}
        if "epoch" not in history or None in phases:
            raise ValueError("no epoch column, or a row shorter than the header")
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, csv.Error) as exc:
        raise RunError(f"{path}: not a history of epochs ({printable(exc)[:80]})") from None
    return history, phases


def training_curves(run_dir: Path) -> Figure:
    """Loss, accuracy and learning rate per epoch (history.csv), with a line where fine-tuning starts."""
    history, phases = _history(run_dir)
    epochs, missing = history["epoch"], np.full(len(phases), np.nan)
    figure = _figure(15, 4.2)
    loss_ax, accuracy_ax, rate_ax = figure.subplots(1, 3, sharex=True)
    for ax, key, style, label in ((loss_ax, "loss", "o-", "training"), (loss_ax, "val_loss", "s-", "validation"),
                                  (accuracy_ax, "accuracy", "o-", "training top-1"),
                                  (accuracy_ax, "val_accuracy", "s-", "validation top-1"),
                                  (accuracy_ax, "val_top5", "s--", "validation top-5")):
        if key in history:
            ax.plot(epochs, history[key], style, label=label)
    rates = history.get("learning_rate", missing)
    rate_ax.plot(epochs, rates, "o-", color="tab:green", label="learning rate")  # linear: a schedule ends at 0
    first = phases.index("finetune") if "finetune" in phases else None  # the boundary: after the last "head" epoch
    boundary = None if first is None else (epochs[first - 1] + epochs[first]) / 2 if first else epochs[0] - 0.5
    for ax, ylabel, title in ((loss_ax, "cross-entropy loss", "Loss"), (accuracy_ax, "accuracy", "Accuracy"),
                              (rate_ax, "learning rate", "Learning rate at each epoch's end")):
        if boundary is not None:
            ax.axvline(boundary, color="grey", linestyle=":", label="fine-tuning starts")
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    accuracy_ax.set_ylim(0, 1)
    accuracy_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    figure.suptitle(f"Training of run {_text(Path(run_dir).name, 100)}")
    return _save(figure, run_dir, "training_curves")


def _predictions(results: dict, dataset, run_dir: Path) -> np.ndarray:
    """results' test predictions, one class index per test image of `dataset`."""
    predicted = results.get("test_predictions")
    if not (isinstance(predicted, list) and len(predicted) == len(dataset.y_test)
            and all(type(p) is int and 0 <= p < dataset.num_classes for p in predicted)):
        raise RunError(f"{Path(run_dir) / 'results.json'}: test_predictions is not one class per test image")
    return np.array(predicted)


def confusion(results: dict, dataset, run_dir: Path) -> Figure:
    """The test confusion matrix, each row normalised, classes by superclass, on a square-root colour scale."""
    n, superclass = dataset.num_classes, dataset.superclass
    order = np.arange(n) if superclass is None else np.lexsort((np.arange(n), superclass))
    matrix = confusion_matrix(dataset.y_test, _predictions(results, dataset, run_dir), labels=order)
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    figure = _figure(6.8 + 0.1 * n, 5.2 + 0.09 * n)
    ax = figure.subplots()
    image = ax.imshow(shares, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    names = [_text(dataset.class_names[k], 20) for k in order]
    ax.set_xticks(range(n), names, rotation=90, fontsize=8 if n <= 20 else 5)
    ax.set_yticks(range(n), names, fontsize=8 if n <= 20 else 5)
    edges = [] if superclass is None else np.flatnonzero(np.diff(superclass[order])) + 0.5  # between superclasses
    ax.hlines(edges, -0.5, n - 0.5, color="grey", linewidth=0.4)
    ax.vlines(edges, -0.5, n - 0.5, color="grey", linewidth=0.4)
    ax.set(xlabel="predicted class", ylabel="true class")
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class's test images (square-root scale)")
    grouped = ", classes ordered by superclass" if superclass is not None else ""
    ax.set_title(f"{_text(dataset.name)}:\ntest confusion matrix, rows normalised{grouped}")
    return _save(figure, run_dir, "confusion")


def per_class_accuracy(results: dict, dataset, run_dir: Path) -> Figure:
    """Test top-1 of each class, worst first, with the mean over the classes."""
    accuracy = results.get("test", {}).get("per_class")
    if not (isinstance(accuracy, list) and len(accuracy) == dataset.num_classes and all(map(_is_share, accuracy))):
        raise RunError(f"{Path(run_dir) / 'results.json'}: test per_class is not one accuracy in [0, 1] per class")
    n, accuracy = dataset.num_classes, np.array(accuracy, dtype=float)
    order = np.argsort(accuracy, kind="stable")
    figure = _figure(max(7.0, 0.14 * n + 2), 4.5)
    ax = figure.subplots()
    ax.bar(range(n), accuracy[order], color="tab:blue")
    ax.axhline(accuracy.mean(), color="tab:red", linestyle="--", label=f"mean over the classes {accuracy.mean():.1%}")
    ax.set_xticks(range(n), [_text(dataset.class_names[k], 20) for k in order], rotation=90,
                  fontsize=8 if n <= 20 else 5)
    ax.set(xlim=(-0.6, n - 0.4), ylim=(0, 1), xlabel="class (worst first)", ylabel="test top-1 of the class")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{_text(dataset.name)}: test top-1 per class, worst first")
    return _save(figure, run_dir, "per_class_accuracy")


def misclassified(results: dict, dataset, run_dir: Path, count: int = 24) -> Figure:
    """The first `count` test images the model got wrong, captioned "true -> predicted"."""
    predicted, names = _predictions(results, dataset, run_dir), dataset.class_names
    wrong = np.flatnonzero(predicted != dataset.y_test)
    captions = [f"{_text(names[dataset.y_test[i]], 20)} ->\n{_text(names[predicted[i]], 20)}" for i in wrong[:count]]
    title = (f"{_text(dataset.name)}: the first {len(captions)} of {len(wrong)} misclassified test images "
             "(true -> predicted)" if len(wrong) else f"{_text(dataset.name)}: no misclassified test images")
    return _save(_grid(dataset.x_test[wrong[:count]], captions, title), run_dir, "misclassified")


def hardest_examples(model, x_train: np.ndarray, y_train: np.ndarray, dataset, run_dir: Path, count: int = 24,
                     limit: int = 2000) -> Figure:
    """The `count` training images (of the first `limit`) on which `model`'s cross-entropy is highest."""
    x, y = x_train[:limit], np.asarray(y_train[:limit])
    probabilities = np.asarray(model.predict(x, batch_size=128, verbose=0))
    losses, names = cross_entropy(probabilities, y), dataset.class_names
    hardest = np.argsort(-losses, kind="stable")[:count]
    captions = [f"{_text(names[y[i]], 20)}, loss {losses[i]:.2f}\npredicted {_text(names[p], 20)}"
                for i, p in zip(hardest, probabilities[hardest].argmax(1), strict=True)]
    title = f"{_text(dataset.name)}: the {len(hardest)} hardest of the first {len(x)} training images (highest loss)"
    return _save(_grid(x[hardest], captions, title), run_dir, "hardest_examples")


def _load(folder: Path) -> dict | None:
    """A finished run's files; None for an unfinished run, and for a damaged one after a line saying why."""
    paths = [folder / f"{name}.json" for name in ("results", "config", "recipe")]
    if not all(path.exists() for path in paths):
        return None
    try:
        results, config, recipe = (read_json(path) for path in paths)
        data, splits = results.get("data"), [results.get(split) for split in ("validation", "test")]
        if not (isinstance(data, dict) and isinstance(data.get("name"), str)
                and all(isinstance(split, dict) and _is_share(split.get("top1")) for split in splits)):
            raise RunError(f"{paths[0]}: expected a data name, and validation and test top1 in [0, 1]")
        if not (isinstance(recipe.get("head"), dict) and isinstance(recipe.get("finetune"), (dict, type(None)))
                and isinstance(recipe.get("model"), list)):
            raise RunError(f"{paths[2]}: expected a model list, a head object and a finetune object or null")
    except RunError as exc:
        print(f"skipped {printable(folder.name)}: {printable(exc)}")
        return None
    return {"name": folder.name, "config": config, "recipe": recipe, "results": results}


def find_runs(runs_dir: Path) -> list[dict]:
    """Every finished run in runs_dir's folders, by name; a damaged one is skipped with a printed line."""
    folders = sorted(path for path in Path(runs_dir).iterdir() if path.is_dir()) if Path(runs_dir).is_dir() else []
    return [run for run in map(_load, folders) if run]


def _features(run: dict) -> dict:
    """What may tell a run apart: its settings (but the data, seed and names) and its recipe's fields."""
    features = {key: value for key, value in run["config"].items() if key not in NOT_IN_LABELS}
    for phase in ("head", "finetune"):
        for field in ("optimizer", "loss", "trains"):
            features[f"{phase}.{field}"] = (run["recipe"].get(phase) or {}).get(field)
    return {**features, "model": run["recipe"]["model"]}


def _item(key: str, value, common: set) -> str:
    """`key=value` in at most 40 characters; a model by its layers that not every run has."""
    if key == "model":
        value = "+".join(str(layer) for layer in value if str(layer) not in common) or f"{len(value)} layers"
    text = printable(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return text if len(text) <= 40 else text[:39] + "…"


def _rows(runs: list[dict]) -> list[dict]:
    """One row per distinct features (seeds averaged), labelled by what differs, best validation top-1 first."""
    features = [_features(run) for run in runs]
    keys = [json.dumps(f, sort_keys=True, default=str) for f in features]
    differing = [key for key in dict.fromkeys(k for f in features for k in f)
                 if len({json.dumps(f.get(key), sort_keys=True, default=str) for f in features}) > 1]
    common = set.intersection(*({str(layer) for layer in f["model"]} for f in features))
    rows = []
    for same, settings in dict(zip(keys, features, strict=True)).items():
        members = [run for run, key in zip(runs, keys, strict=True) if key == same]
        val = np.array([run["results"]["validation"]["top1"] for run in members], dtype=float)
        items = [_item(key, settings.get(key), common) for key in differing] or ["one setting"]
        rows.append({"label": ", ".join(items), "items": items, "names": [run["name"] for run in members],
                     "val": val.mean(), "std": val.std(ddof=1) if len(val) > 1 else 0.0,
                     "test": np.mean([run["results"]["test"]["top1"] for run in members]),
                     "seconds": np.mean([_number(run["results"].get("seconds")) for run in members])})
    return sorted(rows, key=lambda row: (-row["val"], row["label"]))


def _table(name: str, rows: list[dict], current: str | None) -> str:
    """One dataset's rows as text: label, runs, val top-1 mean ± std, test top-1, time; `current`'s marked *."""
    lines = [("  settings (what differs)", "runs", "val top-1", "test top-1 (report)", "time")]
    for row in rows:
        count = len(row["names"])
        lines.append((("* " if current in row["names"] else "  ") + row["label"],
                      f"{count} seeds" if count > 1 else "1 run",
                      f"{row['val']:.2%}" + (f" ± {row['std']:.2%}" if count > 1 else ""), f"{row['test']:.2%}",
                      "?" if np.isnan(row["seconds"]) else f"{row['seconds'] / 60:.1f} min"))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    body = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines]
    runs = sum(len(row["names"]) for row in rows)
    return "\n".join([f"{printable(name)}: {runs} finished run(s), best validation top-1 first", *body])


def _compare_panel(ax, name: str, rows: list[dict], current: str | None) -> None:
    """Validation top-1 bars (std error bars), test top-1 as hollow markers, best at the top."""
    positions = np.arange(len(rows))
    ax.barh(positions, [row["val"] for row in rows], xerr=[row["std"] or np.nan for row in rows], capsize=4,
            color="tab:blue", label="validation top-1 (± std over seeds)")
    ax.plot([row["test"] for row in rows], positions, "D", markerfacecolor="none", markeredgecolor="black",
            linestyle="none", label=TEST_REPORT)
    labels = ["\n".join(map(_text, row["items"])) + (f"\n({len(row['names'])} seeds)" if len(row["names"]) > 1 else "")
              for row in rows]
    ax.set_yticks(positions, labels, fontsize=8)
    for tick, row in zip(ax.get_yticklabels(), rows, strict=True):
        tick.set_fontweight("bold" if current in row["names"] else "normal")
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="top-1 accuracy", ylabel="run (what differs)")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"{_text(name)}: validation top-1 of {sum(len(r['names']) for r in rows)} finished run(s), best first")


def compare(runs_dir: Path, current: Path | None = None) -> Figure | None:
    """Print the finished runs side by side, a table per dataset (only the current run's with `current`), and
    return their figure (saved in current/figures/comparison.png with `current`); None without runs."""
    runs = find_runs(runs_dir)
    if current is not None and Path(current).resolve().parent != Path(runs_dir).resolve():
        runs += [run for run in [_load(Path(current))] if run]  # a run folder outside runs_dir
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["results"]["data"]["name"], []).append(run)
    name = Path(current).name if current is not None else None
    groups = {data: group for data, group in groups.items() if name is None or name in [r["name"] for r in group]}
    if not groups:
        print(f"no finished runs to compare in {printable(runs_dir)}" + (f" with {printable(name)}" if name else ""))
        return None
    tables = {data: _rows(members) for data, members in groups.items()}
    print("\n\n".join(_table(data, rows, name) for data, rows in tables.items()))
    print("(±: std over the seeds of a row; the test top-1 reports a choice made by validation)")
    heights = [sum(0.16 + 0.16 * len(row["items"]) for row in rows) + 1.4 for rows in tables.values()]
    figure = _figure(11, sum(heights))
    axes = figure.subplots(len(tables), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (data, rows) in zip(axes, tables.items(), strict=True):
        _compare_panel(ax, data, rows, name)
    return _save(figure, current, "comparison")
