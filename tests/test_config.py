"""cifar100.config: presets, `key=value` parsing, the checks that refuse what cannot work, saved settings."""

import math

import pytest

from cifar100.config import PRESETS, Config, ConfigError, make_config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_makes_a_valid_config(preset):
    config = make_config(preset)
    assert config.preset == preset
    assert {key: getattr(config, key) for key in PRESETS[preset]} == PRESETS[preset]
    assert Config.from_dict(config.to_dict()) == config


def test_set_strings_are_read_as_the_settings_types():
    config = make_config("smoke", ["image_size=128", "head_learning_rate=3e-4", "hem=true", "seed= 5",
                                   "max_train_images=none", "weights=None", "backbone=resnet50", "val_fraction=0.25"])
    assert type(config.image_size) is int and config.image_size == 128 and config.seed == 5
    assert type(config.head_learning_rate) is float and config.head_learning_rate == 3e-4
    assert config.hem is True and make_config(None, ["hem=0"]).hem is False
    assert config.max_train_images is None and config.weights is None
    assert config.backbone == "resnet50" and config.val_fraction == 0.25


def test_an_unknown_setting_suggests_the_close_name():
    with pytest.raises(ConfigError) as err:
        make_config("smoke", ["image_sise=64"])
    assert str(err.value) == "unknown setting 'image_sise': did you mean image_size?"


@pytest.mark.parametrize("overrides,setting,fragment", [
    ({"head_epochs": -1}, "head_epochs", "must be an integer from 0 to 100000, got -1"),
    ({"backbone": "xception", "image_size": 64}, "image_size", "64 px is below xception's minimum of 71 px"),
    ({"head_learning_rate": math.nan}, "head_learning_rate", "must be a number above 0 to 10, got nan"),
    (["finetune_learning_rate=nan"], "finetune_learning_rate", "got nan"),
    ({"backbone": "vgg16"}, "backbone", "'vgg16' is not one of"),
    ({"batch_size": True}, "batch_size", "must be an integer from 1 to 65536, got True"),
    ({"seed": 1.0}, "seed", "must be an integer"),
    (["seed=1.5"], "seed", "cannot read '1.5' as int"),
    ({"val_fraction": 1.0}, "val_fraction", "must be a number above 0 to 0.9, got 1.0"),
    ({"lr_schedule": "step"}, "lr_schedule", "'step' is not one of ['plateau', 'cosine']"),
    ({"hem": "yes"}, "hem", "must be true or false"),
    (["hem=maybe"], "hem", "cannot read 'maybe'"),
    ({"data_dir": "a\nb\x1b[2J"}, "data_dir", "must be a folder path, got 'a\\nb\\x1b[2J'"),
    ({"head_epochs": 0, "finetune_epochs": 0}, "head_epochs", "nothing would train"),
])
def test_a_setting_that_cannot_work_is_refused_in_one_line(overrides, setting, fragment):
    with pytest.raises(ConfigError) as err:
        make_config("smoke", overrides)
    message = str(err.value)
    assert f"'{setting}'" in message and fragment in message, message
    assert "\n" not in message and message.isprintable() and isinstance(err.value, ValueError)


def test_from_dict_ignores_unknown_settings():
    config = Config.from_dict({"backbone": "resnet50", "image_size": 64, "setting_of_a_later_version": 1})
    assert config == Config(backbone="resnet50", image_size=64)


def test_from_dict_validates_and_names_the_source():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"image_size": 0}, where="models/run-1/config.json")
    assert str(err.value).startswith("models/run-1/config.json: setting 'image_size' must be an integer from 1")
    with pytest.raises(ConfigError, match=r"^config.json: expected a JSON object of settings, found \[1, 2\]$"):
        Config.from_dict([1, 2], where="config.json")


def test_changed_lists_only_what_differs_from_the_preset():
    assert make_config("smoke").changed() == {}
    config = make_config("smoke", {"seed": 3, "image_size": 96, "batch_size": 32, "data_dir": "elsewhere"})
    assert config.changed() == {"seed": 3, "image_size": 96}  # 96 is the default, not smoke's 32
    assert make_config(None, {"backbone": "resnet50"}).changed() == {"backbone": "resnet50"}
