"""cifar100.notebook: the settings from the parameters cell, the check that they are current, one-line errors."""

import copy

import pytest

from cifar100 import notebook
from cifar100.config import ConfigError, RunError, make_config

PARAMETERS = {"PRESET": "smoke", "BACKBONE": None, "IMAGE_SIZE": None, "HEAD_EPOCHS": None, "FINETUNE_EPOCHS": None,
              "HARD_EXAMPLE_MINING": True, "WEIGHTS": "preset", "DATA_DIR": "d", "DOWNLOAD": True, "RUN_NAME": "",
              "RUNS_DIR": "runs", "SETTINGS": {}, "VERBOSE": 1}


def config_with(**changes):
    return notebook.config_from({**PARAMETERS, **changes})


def test_the_parameters_fill_the_config():
    config = config_with(IMAGE_SIZE=64, HARD_EXAMPLE_MINING=True, SETTINGS={"seed": 3})
    assert (config.preset, config.image_size, config.hem, config.seed) == ("smoke", 64, True, 3)
    assert (config.data_dir, config.runs_dir, config.name) == ("d", "runs", "")
    assert config.run_name().startswith("smoke-image_size=64-seed=3-hem=True-")


def test_weights_none_and_none_as_text_both_mean_random_and_preset_keeps_the_presets():
    assert make_config("cpu-small").weights == "imagenet"
    assert config_with(PRESET="cpu-small").weights == "imagenet"  # WEIGHTS = "preset"
    for value in (None, "none", "None", "random"):
        assert config_with(PRESET="cpu-small", WEIGHTS=value).weights is None
    assert config_with(WEIGHTS="imagenet").weights == "imagenet"


def test_a_cell_run_after_the_parameters_changed_says_which_cell_to_run():
    namespace = copy.deepcopy(PARAMETERS)
    params = notebook.Parameters(namespace)
    assert params.check() is params.config
    namespace["HARD_EXAMPLE_MINING"] = False
    namespace["SETTINGS"]["batch_size"] = 8  # changed in place: noticed too
    with pytest.raises(notebook.ParametersChanged, match=r"HARD_EXAMPLE_MINING: True -> False; SETTINGS: \{\} -> "
                                                         r"\{'batch_size': 8\}\): run the settings cell"):
        params.check()
    with pytest.raises(notebook.ParametersChanged, match="figures are not made yet"):
        notebook.Parameters(namespace).figure("training_curves")


def test_the_settings_cell_before_the_parameters_cell_says_so():
    with pytest.raises(notebook.ParametersChanged, match="the parameters cell has not run"):
        notebook.Parameters({})


def test_a_named_run_folder_with_other_settings_is_refused_in_the_notebooks_words(tmp_path):
    saved = config_with(RUN_NAME="mine", RUNS_DIR=str(tmp_path))
    saved.run_dir().mkdir()
    saved.save(saved.run_dir() / "config.json")
    notebook.check_run_folder(saved)  # the same settings: fine
    notebook.check_run_folder(saved.replace(preset=None, runs_dir=str(tmp_path) + "/"))  # saved elsewhere: same
    new = config_with(RUN_NAME="mine", RUNS_DIR=str(tmp_path), HARD_EXAMPLE_MINING=False, SETTINGS={"seed": 2})
    with pytest.raises(RunError) as refused:
        notebook.check_run_folder(new)
    message = str(refused.value)
    assert "seed: 0 -> 2" not in message and "SETTINGS['seed']: 0 -> 2" in message
    assert "HARD_EXAMPLE_MINING: True -> False" in message and 'RUN_NAME = ""' in message
    assert "--set" not in message and "--run-dir" not in message


class FakeShell:
    def set_custom_exc(self, exceptions, handler):
        self.exceptions, self.handler = exceptions, handler

    def _showtraceback(self, etype, value, lines):
        self.shown = lines

    def showtraceback(self, exc_tuple, tb_offset=None):
        self.shown = ["the usual traceback"]


def test_a_user_error_shows_as_one_line_without_a_traceback():
    shell = FakeShell()
    notebook.show_user_errors(shell)
    assert issubclass(ConfigError, shell.exceptions[0]) and KeyboardInterrupt in shell.exceptions
    error = ConfigError("setting 'x': bad")
    assert shell.handler(shell, ConfigError, error, None) == shell.shown
    assert len(shell.shown) == 1 and "error: setting 'x': bad" in shell.shown[0]
    shell.handler(shell, KeyboardInterrupt, KeyboardInterrupt(), None)
    assert "run the training cell again to resume" in shell.shown[0]


def test_a_cell_run_before_the_one_that_defines_its_names_says_which_cell_to_run():
    shell = FakeShell()
    notebook.show_user_errors(shell)
    try:
        dataset  # noqa: F821, B018  (the figures cell run before the data cell)
    except NameError as exc:
        shell.handler(shell, NameError, exc, None)
    assert shell.shown == ["\x1b[31merror: name 'dataset' is not defined: run the data cell first (or Run All)\x1b[0m"]
    try:
        my_own_name  # noqa: F821, B018  (a name of the user's own edit: the usual traceback)
    except NameError as exc:
        shell.handler(shell, NameError, exc, None)
    assert shell.shown == ["the usual traceback"]


@pytest.mark.parametrize("settings,message", [
    ({"reduce_lr_factor": 1.5}, "setting 'reduce_lr_factor' must be > 0 and < 1"),
    ({"dropout": 1.5}, "setting 'dropout' must be >= 0 and < 1"),
    ({"head_learning_rate": float("nan")}, "must be a finite number"),
    ("seed=1", r"SETTINGS must be a dict of settings, e.g. \{\"seed\": 1\}, not 'seed=1'"),  # a TypeError before
])
def test_a_bad_setting_is_refused_at_the_settings_cell_before_data_or_model(settings, message):
    with pytest.raises(ConfigError, match=message):
        notebook.Parameters({**copy.deepcopy(PARAMETERS), "SETTINGS": settings})
    with pytest.raises(ConfigError, match="setting 'data_dir': d: dataset folder not found"):
        notebook.Parameters({**copy.deepcopy(PARAMETERS), "DOWNLOAD": False})


def test_every_cell_that_uses_the_settings_is_checked_without_a_line_of_its_own():
    """The guard the settings cell sets up, in a real IPython shell: a cell that uses the notebook's names
    stops when a parameter changed; the parameters and settings cells and one's own cells run as they are."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        shell.user_ns.update(copy.deepcopy(PARAMETERS), notebook=notebook)
        assert shell.run_cell("params = notebook.Parameters(globals()); config = params.config").success
        assert shell.run_cell("seen = config.preset").success and shell.user_ns["seen"] == "smoke"
        assert shell.run_cell("HARD_EXAMPLE_MINING = False").success  # the parameters cell, edited and run
        assert shell.run_cell("total = 1 + 1").success  # a cell of one's own: not the guard's business
        result = shell.run_cell("seen = config.hem")
        assert isinstance(result.error_in_exec, notebook.ParametersChanged)
        assert "(HARD_EXAMPLE_MINING: True -> False)" in str(result.error_in_exec)
        assert shell.user_ns["seen"] == "smoke"  # the cell's own code did not run
        assert shell.run_cell("params = notebook.Parameters(globals()); config = params.config").success
        assert shell.run_cell("seen = config.hem").success and shell.user_ns["seen"] is False
        shell.user_ns["dataset"] = type("Data", (), {"path": "elsewhere"})()  # the data of other settings
        result = shell.run_cell("seen = dataset.path")
        assert isinstance(result.error_in_exec, notebook.ParametersChanged) and "run the data cell" in \
            str(result.error_in_exec)
        assert shell.run_cell("dataset = None; seen = config.data_dir").success  # the data cell makes dataset
        shell.run_cell("%reset -f")  # every name gone, the guard's too: cells of one's own run as they are
        assert shell.run_cell("model = 3; seen = model").success and shell.user_ns["seen"] == 3
    finally:
        InteractiveShell.clear_instance()
