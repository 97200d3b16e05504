"""A run is identified by its settings: its folder is named by what differs from the preset, plus a hash."""

import json
import re

import pytest

from cifar100 import train
from cifar100.config import Config, make_config


def name_of(**overrides) -> str:
    return make_config("smoke", overrides).run_name()


def test_the_preset_as_it_is_is_named_by_the_preset():
    assert name_of() == "smoke" and make_config("cpu-small").run_name() == "cpu-small"
    assert make_config("smoke").preset == "smoke"


def test_a_changed_setting_is_named_and_hashed():
    name = name_of(hem=True, head_learning_rate=0.001)
    assert re.fullmatch(r"smoke-head_learning_rate=0\.001-hem=True-[0-9a-f]{6}", name), name
    assert name_of(hem=True) != name and name_of(hem=True).startswith("smoke-hem=True-")


def test_the_same_settings_give_the_same_folder_and_other_settings_another():
    assert name_of(hem=True, seed=3) == name_of(seed=3, hem=True)
    assert name_of(image_size=64) == name_of(image_size=64.0)  # 64 and 64.0 are the same setting
    assert name_of(head_learning_rate=3e-3) == "smoke"  # the preset's own value changes nothing
    names = {name_of(seed=s) for s in range(20)} | {name_of(hem=True), name_of(batch_size=16)}
    assert len(names) == 22


def test_where_a_run_is_saved_is_not_part_of_its_identity_but_its_data_is():
    assert name_of(runs_dir="/elsewhere", distribution_timeout=10.0) == "smoke"
    other_data = name_of(data_dir="/data/other")
    assert re.fullmatch(r"smoke-[0-9a-f]{6}", other_data)  # the path is in the hash, not in the readable part
    assert other_data != name_of(data_dir="/data/third")
    assert make_config("smoke", {"runs_dir": "/x"}).run_dir().as_posix() == "/x/smoke"


def test_names_are_short_and_safe_on_any_filesystem():
    name = name_of(weights="../shared/weights/a very long name: with * odd ? chars.weights.h5", augment="x" * 300,
                   label_smoothing=0.1, dropout=0.25, finetune_fraction=0.5, hem_strength=2.0, hem_floor=0.1)
    assert re.fullmatch(r"[A-Za-z0-9._+=-]+", name), name
    assert len(name) <= 110 and "weights=a_very_long_name__w" in name and "/" not in name


def test_an_explicit_name_wins():
    assert make_config("smoke", {"name": "mine", "hem": True}).run_name() == "mine"


def test_a_new_setting_with_its_default_does_not_change_old_hashes():
    # Only settings that differ from the Config defaults enter the hash: pinned here so that a change of
    # the hashing (which would orphan every finished run) is deliberate. Changed twice, deliberately: when
    # presets stopped setting reference_batch_size, and when mining's default became off.
    assert name_of(hem=True) == "smoke-hem=True-3ddd43"
    assert name_of(hem=True, warmup_epochs=0, optimizer="adam", head_features="live", hem_mode="reweight",
                   hem_window=1024) == "smoke-hem=True-3ddd43"


def test_differences_list_old_and_new_values_in_the_callers_words():
    saved, new = make_config("smoke"), make_config("smoke", {"hem": True, "head_learning_rate": 0.01})
    assert new.differences(saved) == ["head_learning_rate: 0.003 -> 0.01", "hem: False -> True"]
    assert new.differences(saved, {"hem": "HARD_EXAMPLE_MINING"})[1] == "HARD_EXAMPLE_MINING: False -> True"
    assert saved.replace(image_size=32.0).differences(saved) == []


def test_a_config_saved_before_the_preset_was_recorded_still_loads(tmp_path):
    fields = make_config("smoke").to_dict()
    del fields["preset"]
    (tmp_path / "config.json").write_text(json.dumps(fields))
    loaded = Config.load(tmp_path / "config.json")
    assert loaded.preset is None and re.fullmatch(r"custom-backbone=tinycnn-.*-[0-9a-f]{6}", loaded.run_name())


def test_the_same_settings_find_their_finished_run_without_training(synthetic_cifar100, tmp_path, capsys):
    config = make_config("smoke", {"data_dir": str(synthetic_cifar100), "runs_dir": str(tmp_path), "hem": True})
    run_dir = config.run_dir()
    run_dir.mkdir()
    config.save(run_dir / "config.json")
    (run_dir / "results.json").write_text("{}")
    (run_dir / "state.json").write_text(json.dumps({"finished": True}))
    assert train.run(config, verbose=0) == run_dir
    assert "finished run found" in capsys.readouterr().out
    # the same settings, the folder named explicitly (as `make run` does): the same run
    assert train.run(config.replace(name=run_dir.name), verbose=0) == run_dir
    assert "finished run found" in capsys.readouterr().out
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "results.json", "state.json"]


@pytest.mark.parametrize("preset", ["seed-resnet50", "cpu-small", "smoke"])
def test_every_preset_with_a_change_keeps_its_name_first(preset):
    assert make_config(preset, {"seed": 7}).run_name().startswith(f"{preset}-seed=7-")


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_a_model_edited_in_the_notebook_trains_into_a_folder_of_its_own(synthetic_cifar100, tmp_path, capsys):
    import keras
    import numpy as np

    from cifar100 import evaluate, models, run_folder
    from cifar100.config import RunError
    from cifar100.data import prepare_data

    config = make_config("smoke", {"data_dir": str(synthetic_cifar100), "runs_dir": str(tmp_path),
                                   "finetune_epochs": 1})
    splits = prepare_data(config)
    classes = splits.dataset.num_classes
    library = train.run(config, verbose=0, splits=splits, model=models.new_model(config, classes))
    assert library == config.run_dir()
    model = models.new_model(config, classes)  # another head: a hidden layer before the softmax
    hidden = keras.layers.Dense(32, activation="relu")(model.get_layer("dropout").output)
    edited = keras.Model(model.inputs, keras.layers.Dense(classes, activation="softmax")(hidden))
    run_dir = train.run(config, verbose=0, splits=splits, model=edited)
    fingerprint = json.loads((run_dir / "config.json").read_text())["model"]
    assert run_dir != library and f"-model={fingerprint}-" in run_dir.name and len(fingerprint) == 8
    assert "finished run found" not in capsys.readouterr().out
    images = splits.dataset.x_test[:8]
    plain = keras.saving.load_model(run_dir / "best.keras")  # plain Keras reads the edited model, hidden layer too
    assert len(plain.layers) == len(edited.layers)
    np.testing.assert_allclose(plain.predict(images, verbose=0), edited.predict(images, verbose=0), atol=1e-6)
    with pytest.raises(RunError, match=r"holds a model edited in a notebook \(setting model="):
        evaluate.load_run(run_dir)  # the library builds runs from models.py: a folder naming another model is not
    _, loaded, _ = evaluate.load_run(run_dir, model=edited)  # in the notebook that made it: its weights, checked
    np.testing.assert_allclose(loaded.predict(images, verbose=0), plain.predict(images, verbose=0), atol=1e-6)
    # the recipe again: its own finished run
    assert train.run(config, verbose=0, splits=splits, model=models.new_model(config, classes)) == library
    assert "finished run found" in capsys.readouterr().out
    # cifar100/models.py changed since that run trained: its folder is refused, and left as it is
    run_folder.write_state(library, model_fingerprint="0123abcd")
    before = sorted(p.name for p in library.iterdir())
    with pytest.raises(RunError, match=r"trained with another model \(fingerprint '0123abcd'; the model built now"):
        train.run(config, verbose=0)
    assert sorted(p.name for p in library.iterdir()) == before
    # a folder that the version before the graph's connections counted fingerprinted is this model's
    run_folder.write_state(library, model_fingerprint=models.recipe_fingerprint(config, classes, connections=False))
    assert train.run(config, verbose=0) == library and "finished run found" in capsys.readouterr().out


def test_an_edited_model_that_best_keras_cannot_hold_is_refused_before_it_trains(synthetic_cifar100, tmp_path):
    import keras

    from cifar100 import models
    from cifar100.config import ConfigError

    config = make_config("smoke", {"data_dir": str(synthetic_cifar100), "runs_dir": str(tmp_path)})
    model = models.new_model(config, 100)
    doubled = keras.layers.Lambda(lambda x: x * 2)(model.get_layer("dropout").output)
    edited = keras.Model(model.inputs, keras.layers.Dense(100, activation="softmax")(doubled))
    with pytest.raises(ConfigError, match=r"cannot be saved as best.keras and read back .* a Lambda layer"):
        train.Training(config, model=edited)
    with pytest.raises(ConfigError, match=r"setting 'model': 0123abcd is the fingerprint of a model edited"):
        train.Training(config.replace(model="0123abcd"))  # set by hand: there is no such model to train
    assert not any(tmp_path.iterdir())


def test_a_skipped_phase_1_starts_from_the_initial_weights_whatever_the_model_went_through(synthetic_cifar100,
                                                                                          tmp_path):
    import numpy as np

    from cifar100 import models

    config = make_config("smoke", {"data_dir": str(synthetic_cifar100), "runs_dir": str(tmp_path)})
    model = models.new_model(config, 100)
    model.set_weights([w + 1 for w in model.get_weights()])  # e.g. trained by a run whose folder is gone
    training = train.Training(config, model=model)
    training.set_phase("head")
    assert not training.needs("head")  # random weights: phase 1 is skipped, its weights saved
    fresh = models.build_model(config, 100)
    fresh.load_weights(config.run_dir() / train.PHASE1_WEIGHTS)
    for saved, initial in zip(fresh.get_weights(), model.initial_weights, strict=True):
        np.testing.assert_array_equal(saved, initial)
    training.close()
