"""Every finished run of a runs folder side by side, grouped by dataset, seeds averaged into one row.

Rows are ordered by VALIDATION top-1: choosing settings by the test top-1 would bias it upwards, so the test
top-1 is shown apart, as the report of a choice already made.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifar100 import data, run_folder
from cifar100.config import NOT_IDENTITY, Config, RunError, canonical, printable
from cifar100.run_folder import is_number

NOT_IN_LABELS = NOT_IDENTITY + ("data_dir", "seed")  # the data is the group's; seeds are averaged


@dataclass
class Run:
    """A finished run: its folder, its settings (config.json; {} for a folder without one), its results."""

    folder: Path
    config: dict
    results: dict

    @property
    def name(self) -> str:
        return printable(self.folder.name)

    def settings(self) -> dict:
        """The settings that tell this run's row apart (all but the seed, the data and the name)."""
        settings = self.config or {"backbone": self.results.get("backbone"),
                                   "image_size": self.results.get("image_size")}
        return {key: value for key, value in settings.items() if key not in NOT_IN_LABELS}

    def dataset(self) -> tuple:
        data = self.results.get("data", {})
        return (data.get("kind", "?"), os.path.normpath(str(data.get("path", "?"))), bool(data.get("synthetic")))


@dataclass
class Row:
    """Runs of the same settings (one per seed), shown as one bar."""

    label: str
    runs: list[Run]

    def values(self, key: str) -> np.ndarray:
        """One value per run: "validation.top1", "test.top1" (a split's metric) or a results.json number."""
        split, _, metric = key.partition(".")
        if metric:
            return np.array([run.results[split][metric] for run in self.runs], dtype=float)
        return np.array([run.results.get(key) or np.nan for run in self.runs], dtype=float)

    def mean(self, key: str) -> float:
        return float(np.mean(self.values(key)))

    def std(self, key: str) -> float:
        """The sample standard deviation over the row's runs (0 for one run)."""
        values = self.values(key)
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    def runs_text(self) -> str:
        """What the row's numbers are (table and figure): "1 run", "mean of 3 seeds", "mean of 2 runs, 1 seed"."""
        count = len(self.runs)
        if count == 1:
            return "1 run"
        seeds = [run.config.get("seed") for run in self.runs]
        if None in seeds:
            return f"mean of {count} runs, seeds not all recorded"
        distinct = len(set(seeds))
        if distinct == count:
            return f"mean of {count} seeds"
        return f"mean of {count} runs, {distinct} seed" + ("s" if distinct > 1 else "")


@dataclass
class Group:
    """The runs on one dataset."""

    kind: str
    path: str
    synthetic: bool
    rows: list[Row] = field(default_factory=list)

    @property
    def classes(self) -> int | None:
        """The number of classes of the group's data (None when no run recorded it)."""
        counts = [run.results["data"].get("classes") for row in self.rows for run in row.runs]
        return max((count for count in counts if count), default=None)

    @property
    def shows_top5(self) -> bool:
        """Top-5 says little of 10 classes or fewer (half of them); it is shown for more (or an unknown count)."""
        return self.classes is None or self.classes > 10

    @property
    def title(self) -> str:
        name = data.display_name(self.kind)
        if self.synthetic:
            return f"SYNTHETIC {name}-format data (not {name}) in {self.path}"
        if any(run.results.get("data", {}).get("official") is False for row in self.rows for run in row.runs):
            return f"{name}-format data in {self.path} (not verified as the official {name} files)"
        return f"{name} in {self.path}"


MAX_RUNS = 10_000
KNOWN_CLASSES = {"cifar100": 100, "cifar10": 10}


def find_runs(runs_dir: str | Path = "models") -> list[Run]:
    """Every finished run in runs_dir's folders, by name; a damaged or hostile folder is skipped with a note."""
    runs = []
    folders = sorted(path for path in Path(runs_dir).iterdir() if path.is_dir())[:MAX_RUNS]
    for folder in folders:
        if not (folder / "results.json").exists() and not (folder / "results.json").is_symlink():
            continue
        try:
            if not run_folder.finished(folder):
                continue
            results = _checked_results(folder / "results.json", run_folder.read_json(folder / "results.json"))
            config_path = folder / "config.json"
            config = run_folder.read_json(config_path) if config_path.exists() or config_path.is_symlink() else {}
        except (RunError, OSError) as exc:  # OSError: a file that cannot be read, named
            print(f"skipped: {printable(str(exc))}", file=sys.stderr)  # one bad folder does not hide the others
            continue
        runs.append(Run(folder, _plain_settings(config), results))
    return runs


def _checked_results(path: Path, results: dict) -> dict:
    """What the comparison reads of a results.json, each value of the type and range a run writes."""
    info = results.get("data", {})
    for split in ("test", "validation"):
        metrics = results.get(split)
        if not (isinstance(metrics, dict) and all(is_number(metrics.get(k), 0, 1) for k in ("top1", "top5"))):
            raise RunError(f"{path}: damaged results.json: no {split} top1 and top5 between 0 and 1")
    if not isinstance(info, dict):
        raise RunError(f"{path}: damaged results.json: 'data' is not an object")
    kind = printable(str(info.get("kind", "?"))[:40])
    classes = info.get("classes")  # a results.json written before the count was recorded: the format's count
    classes = classes if isinstance(classes, int) and is_number(classes, 2, 1e6) else KNOWN_CLASSES.get(kind)
    checked = {"validation": {k: results["validation"][k] for k in ("top1", "top5")},
               "test": {k: results["test"][k] for k in ("top1", "top5")},
               "data": {"kind": kind, "classes": classes,
                        "path": printable(str(info.get("path", "?"))[:300]),
                        "synthetic": info.get("synthetic") is not False,
                        "official": info.get("official") if isinstance(info.get("official"), bool) else None},
               "backbone": printable(str(results.get("backbone", "?"))[:60]),
               "image_size": results.get("image_size") if is_number(results.get("image_size"), 1, 1e6) else None}
    for key in ("train_seconds_total", "train_images_per_second"):
        checked[key] = results[key] if is_number(results.get(key), 0, 1e12) else None
    return checked


def _plain_settings(config: dict) -> dict:
    """A config.json's settings that a label can show: known names with short plain values."""
    known = set(Config.__dataclass_fields__)
    plain = {}
    for key, value in config.items():
        if key not in known or (key == "model" and not value):  # "" (models.py's model), or older runs' none
            continue
        if isinstance(value, str):
            plain[key] = printable(value[:80])
        elif value is None or isinstance(value, bool) or is_number(value, -1e12, 1e12):
            plain[key] = value
    return plain


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped by dataset (real data first), one row per distinct settings, labelled by what differs (a
    lone row by its folder name), best validation top-1 first."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        kind, path, synthetic = run.dataset()
        groups.setdefault((kind, path, synthetic), Group(kind, path, synthetic))
    for key, group in groups.items():
        members = [run for run in runs if run.dataset() == key]
        by_settings: dict[str, list[Run]] = {}
        for run in members:
            key = json.dumps({k: canonical(v) for k, v in run.settings().items()}, sort_keys=True)
            by_settings.setdefault(key, []).append(run)
        distinct = [json.loads(k) for k in by_settings]
        varying = [k for k in _ordered_keys(distinct) if len({json.dumps(d.get(k)) for d in distinct}) > 1]
        for settings, same in zip(distinct, by_settings.values(), strict=True):
            label = ", ".join(f"{k}={_value(settings.get(k))}" for k in varying) or same[0].name
            group.rows.append(Row(label, same))
        group.rows.sort(key=lambda row: (-row.mean("validation.top1"), row.label))  # best on validation first
    return sorted(groups.values(), key=lambda g: (g.synthetic, g.kind, g.path))  # real data first


def _ordered_keys(settings: list[dict]) -> list[str]:
    """The keys of the settings, in the order of Config's fields (unknown keys last)."""
    order = [name for name in Config.__dataclass_fields__]
    keys = {k for d in settings for k in d}
    return [k for k in order if k in keys] + sorted(keys - set(order))


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _mean_std(row: Row, key: str) -> str:
    text = f"{row.mean(key):.2%}"
    return text + (f" ± {row.std(key):.2%}" if len(row.runs) > 1 else "")


def format_table(groups: list[Group], current: str | None = None) -> str:
    """The comparison as text, a block per dataset, best validation top-1 first; `current` is marked with *."""
    if not groups:
        return "no finished runs found"
    blocks = []
    for group in groups:
        top5 = group.shows_top5
        header = ("settings (what differs)", "runs", "val top-1", *(("val top-5",) if top5 else ()), "train time",
                  "images/s", "run folders", "| test top-1 (report)")
        lines = [header]
        for row in group.rows:
            mark = "* " if current and current in [run.name for run in row.runs] else ""
            lines.append((mark + row.label, row.runs_text(), _mean_std(row, "validation.top1"),
                          *((_mean_std(row, "validation.top5"),) if top5 else ()),
                          _duration(row.mean("train_seconds_total")), f"{row.mean('train_images_per_second'):.0f}",
                          ", ".join(run.name for run in row.runs), "| " + _mean_std(row, "test.top1")))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                for line in lines]
        classes = f", {group.classes} classes" if group.classes else ""
        blocks.append(f"{group.title}: {sum(len(r.runs) for r in group.rows)} run(s){classes}\n" + "\n".join(text))
    notes = ["rows by validation top-1, best first: choose settings by it; the test top-1 reports a choice already "
             "made (choosing by it would bias it)", *(["* this run"] if current else []),
             "train time is the sum of the epochs' wall time; ± is the std over a row's runs",
             *(["no top-5 for 10 classes or fewer"] if not all(g.shows_top5 for g in groups) else [])]
    return "\n\n".join(blocks) + "\n(" + ";\n ".join(notes) + ")"
