"""main.ipynb's parameters as the run's settings, the warning when a parameter changed since they were read, and
the notebook run in this process (the command line, tests and benchmarks), so the recipe has one definition."""

from __future__ import annotations

from pathlib import Path

from cifar100.config import Config, ConfigError, make_config, parse_sets, shown

NOTEBOOK = Path(__file__).resolve().parent.parent / "main.ipynb"
PARAMETERS = {"BACKBONE": "backbone", "IMAGE_SIZE": "image_size", "HEAD_EPOCHS": "head_epochs",
              "FINETUNE_EPOCHS": "finetune_epochs", "HARD_EXAMPLE_MINING": "hem", "DATA_DIR": "data_dir",
              "RUNS_DIR": "runs_dir"}
WATCHED = ("PRESET", "WEIGHTS", "SETTINGS", *PARAMETERS)


def settings(namespace: dict) -> Config:
    """The settings of the notebook's parameters (None keeps the preset's value; SETTINGS sets any other)."""
    extra = namespace.get("SETTINGS") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"SETTINGS must be a dict such as {{'seed': 1}}, got {shown(extra)}")
    overrides = {key: namespace[name] for name, key in PARAMETERS.items() if namespace.get(name) is not None}
    weights = namespace.get("WEIGHTS", "preset")
    if weights != "preset":
        overrides["weights"] = None if weights in (None, "none", "None") else weights
    config = make_config(namespace.get("PRESET"), {**overrides, **extra})
    _watch(namespace)
    return config


def _snapshot(namespace: dict) -> dict:
    return {name: repr(namespace.get(name)) for name in WATCHED}


def _watch(namespace: dict) -> None:
    """Before each later cell, one line if a parameter changed since the settings were read (IPython only)."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return
    seen = _snapshot(namespace)

    def check(*_):
        changed = [name for name, value in _snapshot(namespace).items() if seen[name] != value]
        if changed:
            print(f"Parameters changed since the settings cell ran: {', '.join(changed)}. Run that cell again (or "
                  "Run All) for them to count.")

    for old in [f for f in shell.events.callbacks["pre_run_cell"] if getattr(f, "__name__", "") == "check"
                and f.__module__ == __name__]:
        shell.events.unregister("pre_run_cell", old)
    shell.events.register("pre_run_cell", check)


def cli_parameters(preset: str | None, data: str | None, run_dir: str | None, sets: list[str],
                   verbose: int = 2) -> dict:
    """The notebook's parameters from `train --preset P --data DIR --run-dir DIR --set key=value ...`."""
    extra = parse_sets(sets)
    parameters = {"PRESET": preset, "SETTINGS": extra, "VERBOSE": verbose, "DOWNLOAD": False}
    if data:
        parameters["DATA_DIR"] = data
    if run_dir:
        parameters["RUN_DIR"] = run_dir
    return parameters


def run(parameters: dict, notebook: Path = NOTEBOOK) -> dict:
    """Execute the notebook's code cells here, its parameters cell followed by `parameters` (as papermill
    injects them). Returns the notebook's variables."""
    import nbformat

    namespace: dict = {"__name__": "__main__"}
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        exec(compile(cell.source, f"{notebook.name} cell", "exec"), namespace)
        if "parameters" in cell.metadata.get("tags", []):
            namespace.update(parameters)
    return namespace
