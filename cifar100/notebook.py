"""Helpers for main.ipynb: one-line errors, the run's settings from the parameters cell, and `guard_cells`: a
later cell stops with one line naming the parameter that changed since the settings were built."""

from __future__ import annotations

import ast
import copy
import sys
from pathlib import Path

from cifar100.config import Config, ConfigError, RunError, UserError, make_config, printable, shown, validate

# The parameters cell's names, and the Config setting each one fills.
PARAMETERS = {"PRESET": None, "BACKBONE": "backbone", "IMAGE_SIZE": "image_size", "HEAD_EPOCHS": "head_epochs",
              "FINETUNE_EPOCHS": "finetune_epochs", "HARD_EXAMPLE_MINING": "hem", "WEIGHTS": "weights",
              "DATA_DIR": "data_dir", "DOWNLOAD": None, "RUN_NAME": "name", "RUNS_DIR": "runs_dir",
              "SETTINGS": None, "VERBOSE": None}
SETTINGS_CELL = "the settings cell (the code cell below the parameters)"


class ParametersChanged(UserError):
    """A cell ran with parameters other than those its settings were built from."""


def setup() -> None:
    """The first code cell: Keras imported without TensorFlow's start-up lines; a UserError is one red line; what
    a cell's fit held back of stderr when it failed in its first step is written out as the cell ends."""
    from cifar100 import keras_internals  # it imports Keras

    show_user_errors()
    shell = _ipython()
    if shell is not None:
        shell.events.register("post_run_cell", keras_internals.release_held_stderr)  # once, however often called


def show_user_errors(shell=None) -> None:
    """Show a UserError as `error: <message>` and an interrupt as one line, both without a traceback."""
    shell = shell or _ipython()
    if shell is not None:
        shell.set_custom_exc((UserError, OSError, KeyboardInterrupt, NameError), _one_line_error)


def _ipython():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


# The notebook's names that a cell above defines: a cell run before it gets one line naming that cell.
DEFINED_BY = {"params": "the settings cell", "config": "the settings cell", "dataset": "the data cell",
              "splits": "the data cell", "SYNTHETIC": "the data cell", "model": "the model cell",
              "training_model": "the model cell",
              "training": "the phase-1 cell", "run_dir": "the phase-2 cell", "results": "the evaluation cell",
              "best": "the evaluation cell", "classes": "the evaluation cell"}


def _defined_by(value: BaseException) -> str | None:
    """The cell that defines the name a NameError is about, when it is one of the notebook's own."""
    name = getattr(value, "name", None)
    return "the parameters cell" if name in PARAMETERS else DEFINED_BY.get(name)


def error_line(value: BaseException) -> str:
    if isinstance(value, NameError):
        return f"error: {value}: run {_defined_by(value)} first (or Run All)"
    if isinstance(value, KeyboardInterrupt):
        return ("interrupted. A training run keeps every finished epoch in its run folder: run the training "
                "cell again to resume it.")
    return f"error: {printable(str(value))}"  # names from files: no terminal escapes


def _one_line_error(shell, etype, value, tb, tb_offset=None):
    if isinstance(value, NameError) and _defined_by(value) is None:  # a name of the user's own: the usual traceback
        shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
        return None
    line = ["\x1b[31m" + error_line(value) + "\x1b[0m"]
    show = getattr(shell, "_showtraceback", None)
    if show is not None:
        show(etype, value, line)  # an error output, one line; the cell still counts as failed
    else:
        print(line[0], file=sys.stderr)
    return line


def setting_label(key: str) -> str:
    """A Config setting in the notebook's words: hem -> HARD_EXAMPLE_MINING, batch_size -> SETTINGS['batch_size']."""
    names = {setting: name for name, setting in PARAMETERS.items() if setting} | {"preset": "PRESET"}
    return names.get(key, f"SETTINGS[{key!r}]")


def config_from(parameters: dict) -> Config:
    """The run's Config from the parameters cell's values (a dict of them by name)."""
    overrides = {setting: parameters[name] for name, setting in PARAMETERS.items()
                 if setting and name not in ("WEIGHTS", "RUN_NAME") and parameters[name] is not None}
    if parameters["WEIGHTS"] != "preset":  # Config reads None, "none" and "random" as random initialisation
        overrides["weights"] = parameters["WEIGHTS"]
    overrides["name"] = parameters["RUN_NAME"] or ""
    settings = parameters["SETTINGS"] or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"SETTINGS must be a dict of settings, e.g. {{\"seed\": 1}}, not {shown(settings)}")
    return make_config(parameters["PRESET"], {**overrides, **settings})


class Parameters:
    """The parameters cell's values when the settings cell ran, and the Config built from them."""

    def __init__(self, namespace: dict):
        missing = [name for name in PARAMETERS if name not in namespace]
        if missing:
            raise ParametersChanged(f"the parameters cell has not run ({', '.join(missing)} undefined): "
                                    "run it, then this cell")
        self.namespace = namespace  # the notebook's globals, read again by check()
        self.values = {name: copy.deepcopy(namespace[name]) for name in PARAMETERS}
        self.config = config_from(self.values)
        validate(self.config, check_data=not self.values["DOWNLOAD"])  # before anything is read or built
        self.figures: dict | None = None  # the run's figures, once the first figures cell made them
        guard_cells(namespace)

    def changed(self) -> list[str]:
        """'NAME: old -> new' for each parameter whose value differs from when the settings were built."""
        return [f"{name}: {self.values[name]!r} -> {self.namespace.get(name)!r}" for name in PARAMETERS
                if self.namespace.get(name) != self.values[name]]

    def check(self, dataset=None) -> Config:
        """The run's Config, once the parameters (and `dataset`, when given) are checked to be its own."""
        changed = self.changed()
        if changed:
            raise ParametersChanged(f"the parameters changed since the settings were built ({'; '.join(changed)}): "
                                    f"run {SETTINGS_CELL}, then this cell, or Run All")
        if dataset is not None and Path(dataset.path).resolve() != Path(self.config.data_dir).resolve():
            raise ParametersChanged(f"the data in memory come from {dataset.path}, but DATA_DIR is "
                                    f"{self.config.data_dir}: run the data cell (under 'The data'), then this cell")
        return self.config

    def figure(self, name: str):
        """One of the run's figures, after `check()`; for a figure that does not apply to this run, the line
        that says why is printed and None returned."""
        self.check()
        if self.figures is None:
            raise ParametersChanged("this run's figures are not made yet: run the first cell under 'Figures', "
                                    "then this cell")
        figure = self.figures.get(name)
        if isinstance(figure, str):
            print(figure)
            return None
        return figure


GUARD = "_cifar100_check_parameters"


def guard_cells(namespace: dict, shell=None) -> None:
    """Make every later cell that uses the notebook's names (DEFINED_BY) start with `params.check()`, via an
    IPython AST transformer; the parameters and settings cells, and cells of one's own, run as they are."""
    shell = shell or _ipython()
    if shell is None:
        return

    def check(dataset_too: bool) -> None:
        params = namespace.get("params")
        if isinstance(params, Parameters):
            params.check(namespace.get("dataset") if dataset_too else None)

    namespace[GUARD] = check
    if not any(isinstance(t, _Guard) for t in shell.ast_transformers):
        shell.ast_transformers.append(_Guard())


class _Guard(ast.NodeTransformer):
    def visit_Module(self, node: ast.Module) -> ast.Module:
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assigned = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        if "params" in assigned or not used & set(DEFINED_BY) or PARAMETERS.keys() & assigned:
            return node  # the settings cell, the parameters cell, a cell of one's own
        call = ast.parse(f"globals().get({GUARD!r}, lambda **_: None)(dataset_too={'dataset' not in assigned})").body
        node.body[:0] = call
        return ast.fix_missing_locations(node)


def check_run_folder(config: Config) -> None:
    """Refuse, in the notebook's words, a run folder holding a run of other settings (nothing there changes)."""
    saved = config.run_dir() / "config.json"
    if not saved.exists():
        return
    differences = config.training_differences(Config.load(saved), {key: setting_label(key) for key in config.to_dict()})
    if differences:
        raise RunError(f"run folder {config.run_dir()} holds a run with other settings (there -> now: "
                       f"{'; '.join(differences)}). Nothing was changed there: set RUN_NAME = \"\" to let the "
                       "settings name the run folder, choose another RUN_NAME, or delete that folder.")


def describe(config: Config) -> str:
    """One line: the run folder, what differs from the preset, and what the training cell will do."""
    from cifar100 import run_folder

    run_dir = config.run_dir()
    changed = config.changed_from_preset()
    what = (", ".join(f"{setting_label(k)}={v!r}" for k, v in changed.items()) or "nothing") + " changed"
    if run_folder.finished(run_dir):
        state = "finished: the training cell shows it without training"
    elif (run_dir / "config.json").exists():
        state = "started before: the training cell resumes it"
    else:
        state = "new: the training cell trains it"
    return f"run folder {run_dir} (preset {config.preset}; {what}): {state}"


def show_code(*functions) -> None:
    """The source code of `functions`, shown as a cell output (the one definition that the cells call)."""
    import inspect

    from IPython.display import Markdown, display

    display(Markdown("\n\n".join(f"```python\n{inspect.getsource(f).rstrip()}\n```" for f in functions)))


def load_results(run_dir: Path) -> dict:
    """results.json of the run, or a one-line error saying which cell to run."""
    from cifar100 import run_folder

    run_dir = Path(run_dir)
    if not run_folder.finished(run_dir):
        raise RunError(f"run folder {run_dir} has no results yet: run the training cell (under 'Training')")
    results = run_folder.read_json(run_dir / "results.json")
    test, validation = results.get("test"), results.get("validation")
    shown = [(test, "top1"), (test, "top5"), (validation, "top1")]
    if not all(isinstance(part, dict) and isinstance(part.get(key), int | float) for part, key in shown) or \
            not isinstance(results.get("data"), dict) or not isinstance(test.get("per_class"), dict):
        raise RunError(f"{run_dir / 'results.json'}: damaged results.json (no test and validation top-1, data and "
                       f"per-class accuracies); run `python -m cifar100 evaluate {run_dir}` to write them again")
    return results
