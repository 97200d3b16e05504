import json

import pytest

from cifar100.config import PRESETS, Config, ConfigError, make_config
from cifar100.models import precision_policy, resolve_flag
from cifar100.train import jit_compile


def test_presets_fill_the_config_and_leave_the_learning_rates_unscaled():
    config = make_config("seed-resnet50")
    assert (config.backbone, config.image_size, config.weights) == ("resnet50", 224, "imagenet")
    assert config.reference_batch_size is None  # the linear scaling rule applies on request only
    assert make_config("seed-xception").image_size == 299 and make_config("no-upsampling").image_size == 32
    assert make_config("cpu-small").max_train_images == 10000
    assert set(PRESETS) == {"seed-resnet50", "seed-xception", "no-upsampling", "cpu-small", "smoke"}


def test_set_strings_are_read_as_the_settings_types():
    config = make_config("smoke", ["image_size=128", "weights=None", "hem=false", "val_fraction=0.2",
                                   "max_train_images=none", "backbone=mobilenetv2", "batch_size=256"])
    assert config.image_size == 128 and config.weights is None and config.hem is False
    assert config.val_fraction == 0.2 and config.max_train_images is None and config.backbone == "mobilenetv2"
    assert config.batch_size == 256 and config.reference_batch_size is None


@pytest.mark.parametrize("args,message", [
    (("nope", []), "preset 'nope' is unknown"),
    (("smoke", ["image_size=big"]), "setting 'image_size': cannot read 'big'"),
    (("smoke", ["hem=maybe"]), "setting 'hem': cannot read 'maybe'"),
    (("smoke", ["image_size"]), "expected key=value"),
])
def test_bad_settings_are_named(args, message):
    with pytest.raises(ConfigError, match=message):
        make_config(*args)


def test_config_round_trips_through_json(tmp_path):
    config = make_config("cpu-small", {"name": "x"})
    config.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == config
    assert json.loads((tmp_path / "config.json").read_text())["backbone"] == "mobilenetv3small"
    # names and paths of any script read back, a non-breaking space and an emoji's joiner too; control characters
    # (a NUL, a terminal escape) are not a name
    for name in ("run\u00a0two", "caf\u00e9-\U0001f468\u200d\U0001f52c", "\u202eevil"):
        config.replace(name=name).save(tmp_path / "config.json")
        assert Config.load(tmp_path / "config.json").name == name
    for name in ("run\x00", "run\x1b[31m", "run\n"):
        config.replace(name=name).save(tmp_path / "config.json")
        with pytest.raises(ConfigError, match=r"config.json: setting 'name': .* holds control characters"):
            Config.load(tmp_path / "config.json")


@pytest.mark.parametrize("gpus", [[], ["NVIDIA H200"]])
def test_precision_and_xla_follow_the_gpu_unless_asked(gpus, monkeypatch):
    """'auto' is on with a GPU and off without, whatever machine the suite runs on."""
    from cifar100 import models

    monkeypatch.setattr(models, "gpu_names", lambda: gpus)
    assert resolve_flag("auto") is bool(gpus) and resolve_flag("true") is True and resolve_flag("false") is False
    assert precision_policy("auto") == ("mixed_float16" if gpus else "float32")
    assert precision_policy("false") == "float32"
    assert precision_policy("true") == "mixed_float16" and precision_policy("bfloat16") == "mixed_bfloat16"


def test_xla_auto_is_left_to_keras():
    setting = {value: jit_compile(Config(jit_compile=value)) for value in ("auto", "true", "false")}
    assert setting == {"auto": "auto", "true": True, "false": False}
