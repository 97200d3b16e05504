"""The training levers of issue 11: what the optimiser is given, the splits, the XLA-friendly shift, the
cached-feature head phase, and what a run records."""

import json
import warnings

import keras
import numpy as np
import pytest

from cifar100 import data, keras_internals, models, train, write_data
from cifar100.batches import TrainBatches, image_views
from cifar100.config import Config, make_config


def rate_given(config: Config, phase_rate: float = 1e-3, epochs: int = 4, steps: int = 10):
    """The learning rate the compiled optimiser holds at each step of the phase."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    config = config.replace(finetune_learning_rate=phase_rate, finetune_epochs=epochs)
    train.compile_model(model, train.learning_rate(config, "finetune", steps), config)
    rates = []
    for step in range(epochs * steps + 1):  # the optimiser's own rate, at each of its iterations
        model.optimizer.iterations.assign(step)
        rates.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
    return rates if config.lr_schedule == "cosine" else rates[:1]


def test_the_optimizer_gets_the_configured_rate_whatever_the_batch_size():
    config = make_config("seed-resnet50", {"batch_size": 16})
    assert rate_given(config) == [pytest.approx(1e-3)]  # not quartered: no scaling unless asked
    asked = config.replace(reference_batch_size=64)
    assert rate_given(asked) == [pytest.approx(2.5e-4)]


def test_cosine_schedule_warms_up_then_decays_to_zero():
    rates = rate_given(Config(lr_schedule="cosine", warmup_epochs=1), epochs=4, steps=10)
    assert rates[0] == pytest.approx(0.0) and rates[5] == pytest.approx(5e-4, rel=1e-3)
    assert rates[10] == pytest.approx(1e-3, rel=1e-3) and max(rates) == pytest.approx(1e-3, rel=1e-3)
    assert np.all(np.diff(rates[10:]) <= 1e-9) and rates[-1] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("name,kind,decay", [("adam", keras.optimizers.Adam, None),
                                             ("adamw", keras.optimizers.AdamW, 0.05),
                                             ("sgd", keras.optimizers.SGD, 0.05)])
def test_optimizer_choice(name, kind, decay):
    optimizer = train.optimizer(Config(optimizer=name, weight_decay=0.05, clipnorm=1.0), 1e-3)
    assert type(optimizer) is kind and optimizer.clipnorm == 1.0
    assert optimizer.weight_decay == decay
    if name == "sgd":
        assert optimizer.nesterov and optimizer.momentum == 0.9


def test_a_compile_is_compared_with_the_settings_whatever_its_spelling():
    """What train.Training refuses before fit: the same optimiser and loss however written pass; another
    is named by what differs."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="softmax")])
    sgd = make_config("smoke", {"optimizer": "sgd"})
    for loss in ("categorical_crossentropy", "CategoricalCrossentropy", keras.losses.categorical_crossentropy,
                 keras.losses.CategoricalCrossentropy()):
        model.compile(keras.optimizers.SGD(3e-3, momentum=0.9, nesterov=True, weight_decay=0.0), loss)
        assert train.compile_differences(sgd, "finetune", 10, model) == []
    cosine = sgd.replace(lr_schedule="cosine", label_smoothing=0.1)
    model.compile(keras.optimizers.SGD(3e-3, momentum=0.9, nesterov=True), "sparse_categorical_crossentropy")
    assert train.compile_differences(cosine, "finetune", 10, model) == [
        "optimizer.learning_rate: 0.003 (settings: CosineDecay)",
        "loss: sparse_categorical_crossentropy (settings: CategoricalCrossentropy)"]
    train.compile_model(model, train.learning_rate(cosine, "finetune", 12), cosine)  # 12 steps an epoch, not 10
    assert train.compile_differences(cosine, "finetune", 10, model) == [
        "optimizer.learning_rate.decay_steps: 60 (settings: 50)"]


def test_the_cap_shrinks_training_not_validation(tmp_path):

    folder = write_data.write_synthetic(tmp_path / "c10", kind="cifar10", n_train=1000, n_test=100)
    dataset = data.load(folder)
    full = data.prepare_data(Config(data_dir=str(folder)), dataset)
    capped = data.prepare_data(Config(data_dir=str(folder), max_train_images=200), dataset)
    assert len(full.val_indices) == 100  # 10%, stratified: 10 a class
    assert len(capped.train_indices) == 200 and np.array_equal(capped.val_indices, full.val_indices)
    assert not set(capped.train_indices) & set(capped.val_indices)
    counts = np.bincount(dataset.y_train[capped.train_indices], minlength=dataset.num_classes)
    assert counts.max() - counts.min() <= 1  # stratified


def test_random_shift_moves_each_image_by_whole_pixels_and_compiles_with_xla():
    layer = keras_internals.RandomShift(3, seed=1)
    images = np.arange(8 * 10 * 10 * 3, dtype="float32").reshape(8, 10, 10, 3)
    shifted = keras.ops.convert_to_numpy(layer(images, training=True))
    padded = np.pad(images, [(0, 0), (3, 3), (3, 3), (0, 0)], mode="reflect")
    offsets = []
    for index in range(8):
        found = [(r, c) for r in range(7) for c in range(7) if np.array_equal(padded[index, r:r + 10, c:c + 10],
                                                                                 shifted[index])]
        assert found, f"image {index} is not a shifted copy"
        offsets.append(found[0])
    assert len(set(offsets)) > 1  # each image its own shift
    assert np.array_equal(keras.ops.convert_to_numpy(layer(images)), images)  # inference: unchanged
    config = Config(backbone="tinycnn", weights=None, image_size=32)
    model = models.training_model(models.build_model(config, 10), config)  # RandomFlip, RandomShift, the model
    assert any(isinstance(layer, keras_internals.RandomShift) for layer in model.layers)
    model.compile(optimizer="adam", loss="categorical_crossentropy", jit_compile=True)
    assert model.jit_compile is True  # every layer supports XLA, so Keras keeps it on
    x, y = np.zeros((4, 32, 32, 3), np.uint8), np.eye(10, dtype="float32")[:4]
    assert np.isfinite(model.train_on_batch(x, y))  # a training step compiled with XLA: the shift included
    # why the workaround: with RandomTranslation Keras turns XLA off (when this fails, Keras no longer needs it)
    inputs = keras.Input((32, 32, 3))
    shifted = keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect")(inputs)
    translating = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(shifted)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Model doesn't support `jit_compile=True`")
        translating.compile(optimizer="adam", loss="categorical_crossentropy", jit_compile=True)
    assert translating.jit_compile is False


def test_each_random_layer_draws_a_stream_of_its_own_each_epoch():
    """EpochOrder sets every seed generator of the training model (augmentation, dropout) at each epoch; Keras
    then draws with [key, counter + step]. No two layers, and no layer in two epochs, may share a position."""
    from cifar100.batches import EpochOrder, TrainBatches

    config = Config(backbone="tinycnn", weights=None, image_size=32, augment="randaugment", dropout=0.3, seed=3)
    fit_model = models.training_model(models.build_model(config, 10), config)
    images = np.zeros((8, 32, 32, 3), np.uint8)
    order = EpochOrder(TrainBatches(images, np.arange(8) % 10, 10, 4, seed=3))
    order.set_model(fit_model)
    states = [v for v in fit_model.variables if v.path.endswith("seed_generator_state")]
    assert len(states) >= 3  # flip, shift, RandAugment, dropout ...
    positions = {}
    for epoch in (0, 1, 2):
        order.on_epoch_begin(epoch)
        for layer, state in enumerate(states):
            key, counter = (int(v) for v in keras.ops.convert_to_numpy(state.value))
            for step in range(200):  # the first 200 draws of this layer in this epoch
                assert (key, counter + step) not in positions, (
                    f"layer {layer} in epoch {epoch} draws at step {step} what {positions[(key, counter + step)]} "
                    "drew")
                positions[(key, counter + step)] = (layer, epoch, step)
    order.on_epoch_begin(1)  # a resumed run: the same streams for the same epoch
    again = [tuple(keras.ops.convert_to_numpy(s.value)) for s in states]
    order.on_epoch_begin(1)
    assert again == [tuple(keras.ops.convert_to_numpy(s.value)) for s in states]


def test_head_model_shares_the_classifier_and_the_features_are_the_backbones():
    config = Config(backbone="tinycnn", weights=None, image_size=32)
    model = models.build_model(config, 10)
    small = models.head_model(model)
    assert small.get_layer("classifier") is model.get_layer("classifier")
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    features = models.feature_extractor(model).predict(images, verbose=0)
    np.testing.assert_allclose(small.predict(features, verbose=0), model.predict(images, verbose=0), rtol=1e-5,
                               atol=1e-6)
    hidden = keras.layers.Dense(8, activation="relu")(model.get_layer("dropout").output)  # an edited head
    edited = keras.Model(model.inputs, keras.layers.Dense(10, activation="softmax")(hidden))
    np.testing.assert_allclose(models.head_model(edited).predict(features, verbose=0),
                               edited.predict(images, verbose=0), rtol=1e-5, atol=1e-6)
    batches = TrainBatches(features, np.arange(6) % 10, 10, 4, seed=0)
    batches.set_epoch(1)
    first = batches.order.copy()
    batches.set_epoch(2)
    assert sorted(first) == list(range(6)) and not np.array_equal(first, batches.order)
    batches.set_epoch(1)
    assert np.array_equal(first, batches.order)


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_cached_head_run_records_what_it_did(synthetic_cifar100, tmp_path):
    weights = tmp_path / "tinycnn.weights.h5"  # given weights count as pretrained: phase 1 runs
    models.tiny_cnn().save_weights(weights)
    config = make_config("smoke", {"data_dir": str(synthetic_cifar100), "runs_dir": str(tmp_path), "head_epochs": 3,
                                   "weights": str(weights),
                                   "finetune_epochs": 1, "head_features": "cached", "lr_schedule": "cosine",
                                   "warmup_epochs": 1, "optimizer": "adamw", "weight_decay": 0.01})
    run_dir = train.run(config, verbose=0)
    results = json.loads((run_dir / "results.json").read_text())
    rows = train.run_folder.history_rows(run_dir)
    state = train.run_folder.read_state(run_dir)
    assert len(rows) == state["head_epochs_done"] + 1 and 1 <= state["head_epochs_done"] <= 3
    assert results["optimization"]["finetune"] == {"optimizer": "adamw", "learning_rate": pytest.approx(3e-3),
                                                   "schedule": "cosine",
                                                   "jit_compile": bool(models.gpu_names())}  # auto: XLA with a GPU
    assert results["head_feature_seconds"] > 0
    assert {"train_seconds", "val_seconds", "other_seconds"} <= set(rows[0]) and set(rows[0]) == set(rows[-1])
    for row in rows:
        parts = float(row["train_seconds"]) + float(row["val_seconds"]) + float(row["other_seconds"])
        assert parts == pytest.approx(float(row["epoch_seconds"]), rel=1e-3)
    # best.keras is the best validation epoch's model
    best = keras.saving.load_model(run_dir / "best.keras")
    from cifar100 import evaluate

    splits = data.prepare_data(config, data.load(synthetic_cifar100))
    val = evaluate.basic_metrics(best, splits.x_val, splits.y_val, 100)
    assert val["top1"] == pytest.approx(max(float(r["val_accuracy"]) for r in rows), abs=1e-6)
    tta = results["test"]["flip_tta"]
    assert 0 <= tta["top1"] <= 1 and tta["images"] == results["data"]["test_images"]


class ShapeProbe(keras.layers.Layer):
    """Records the image size and the mode of each traced call (a trace runs the Python code once)."""

    def __init__(self, record, **kwargs):
        super().__init__(**kwargs)
        self.record = record  # a function: Keras would track a list attribute as a copy

    def call(self, x, training=None):
        if not isinstance(x, keras.KerasTensor):  # not Keras' symbolic build of the model
            self.record(("train" if training else "infer", x.shape[1]))
        return x


def test_progressive_resizing_trains_small_first_and_validates_at_full_size():
    from cifar100.callbacks import ProgressiveResizing

    seen = []
    inputs = keras.Input((32, 32, 3))
    x = keras_internals.Upsample(48, 48, name="upsample")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(ShapeProbe(seen.append)(x))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    model.compile("adam", "categorical_crossentropy")
    rng = np.random.default_rng(0)
    images, labels = rng.uniform(size=(16, 32, 32, 3)), np.eye(2)[rng.integers(0, 2, 16)]
    model.fit(images, labels, validation_data=(images, labels), epochs=4, batch_size=8, verbose=0,
              callbacks=[ProgressiveResizing(24, first_full_epoch=2)])
    trained = [size for mode, size in seen if mode == "train"]  # each trace once (TensorFlow may trace twice)
    assert trained[0] == 24 and trained[-1] == 48 and trained == sorted(trained)  # 24 px first, 48 px after
    assert {size for mode, size in seen if mode == "infer"} == {48}  # validation at the full size throughout



def test_the_saved_model_of_a_progressive_run_resizes_with_keras_own_layer_at_full_size(tmp_path):
    config = make_config("smoke", {"image_size": 48, "progressive_size": 24, "lr_schedule": "cosine"})
    model = models.build_model(config, num_classes=10)
    training_model = models.training_model(model, config)
    training_model.get_layer("upsample").training_size = 24  # as when a checkpoint is saved in a small epoch
    assert type(model.get_layer("upsample")) is keras.layers.Resizing
    model.save(tmp_path / "small-epoch.keras")
    loaded = keras.saving.load_model(tmp_path / "small-epoch.keras")
    assert tuple(loaded.get_layer("upsample").output.shape) == (None, 48, 48, 3)


def test_each_phase_starts_at_full_size_and_32_px_runs_get_the_layer_too():
    """A fit stopped in a small epoch leaves the layer small; the next phase (the notebook reruns a cell in
    the same kernel) must not inherit it. At image_size 32 the progressive layer is built all the same."""
    config = make_config("smoke", {"image_size": 32, "progressive_size": 16, "progressive_epochs": 2,
                                   "lr_schedule": "cosine"})
    from cifar100.config import validate

    validate(config, check_data=False)
    model = models.training_model(models.build_model(config, num_classes=10), config)
    upsample = model.get_layer("upsample")
    assert isinstance(upsample, keras_internals.Upsample)
    upsample.training_size = 16
    models.set_phase(model, "head", pretrained=False)
    assert upsample.training_size is None


@pytest.mark.parametrize("settings,message", [
    ({"progressive_size": 96}, "must be below image_size"),
    ({"progressive_size": 48, "progressive_epochs": 5}, "below finetune_epochs"),
    ({"progressive_size": 48, "progressive_epochs": 0}, "at least 1"),
    ({"progressive_epochs": 2}, "needs 'progressive_size'"),
    ({"progressive_size": 48, "progressive_epochs": 2, "lr_schedule": "plateau"}, "needs lr_schedule=cosine"),
])
def test_progressive_resizing_settings_are_checked(settings, message):
    from cifar100.config import ConfigError, validate

    config = make_config("smoke", {"image_size": 96, "finetune_epochs": 5, **settings})
    with pytest.raises(ConfigError, match=message):
        validate(config, check_data=False)


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_a_run_with_progressive_resizing_trains_and_saves_the_full_size_model(synthetic_cifar100, tmp_path, capsys):
    config = make_config("smoke", {"data_dir": str(synthetic_cifar100), "runs_dir": str(tmp_path), "image_size": 48,
                                   "finetune_epochs": 3, "progressive_size": 32, "progressive_epochs": 2,
                                   "lr_schedule": "cosine", "max_train_images": 300})
    run_dir = train.run(config, verbose=0)
    out = capsys.readouterr().out
    assert "epoch 1 trains at 32 px" in out and "epoch 3 trains at 48 px" in out and "epoch 2 trains" not in out
    best = keras.saving.load_model(run_dir / "best.keras")
    assert best.get_layer("upsample").get_config()["height"] == 48 and best.input_shape == (None, 32, 32, 3)
    assert json.loads((run_dir / "results.json").read_text())["test"]["top1"] >= 0


def test_with_progressive_resizing_early_stopping_watches_only_the_full_size_epochs(tmp_path):
    """The small epochs are validated at full size and score low while the model learns the small size:
    counted, they would stop the phase before its full-size epochs (measured: docs/benchmarks.md)."""
    from cifar100.batches import TrainBatches
    from cifar100.callbacks import ProgressiveResizing, callback_set

    config = make_config("smoke", {"image_size": 64, "finetune_epochs": 6, "progressive_size": 32,
                                   "progressive_epochs": 4, "lr_schedule": "cosine"})
    sampler = TrainBatches(np.zeros((8, 32, 32, 3), np.uint8), np.zeros(8, int), 2, 4)

    def made(phase):
        callbacks = callback_set(config, tmp_path, phase, sampler, None, None, None, start_epoch=10)
        stop = next(c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping))
        resize = [(c.size, c.first_full_epoch) for c in callbacks if isinstance(c, ProgressiveResizing)]
        return stop.start_from_epoch, resize

    assert made("finetune") == (14, [(32, 14)])
    assert made("head") == (0, [])


# --- fine-tuning the top of the backbone on cached activations ------------------------------------------

def test_the_split_backbone_computes_the_model_and_cuts_where_one_tensor_crosses():
    config = Config(backbone="mobilenetv2", weights=None, image_size=64)
    model = models.build_model(config, 10)
    bottom, top, cut = models.split_backbone(model, 0.65)
    assert cut == "block_5_add"  # block 6 (stride 2, no residual) is the first block above the cut
    assert top.get_layer("head").get_layer("classifier") is model.get_layer("classifier")
    names = {layer.name for layer in models.backbone_of(model).layers}
    inside = {layer.name for layer in top.layers[1].layers[1:]}  # after its Input
    assert "block_6_expand" in inside and "block_5_project" not in inside and inside <= names
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(top.predict(bottom.predict(images, verbose=0), verbose=0),
                               model.predict(images, verbose=0), rtol=1e-4, atol=1e-6)
    # a residual block is never split: within block 5 (which adds its input) the cut moves down to that input
    assert models.split_backbone(model, 0.677)[2] == "block_4_add"


def test_batches_of_cached_views_draw_one_view_of_each_example_per_epoch():
    views = np.arange(6 * 3, dtype=np.float16).reshape(6, 3, 1)  # example i, view v: 3 i + v
    batches = TrainBatches(views, np.arange(6), 6, 6, seed=0, views=True)
    drawn = []
    for epoch in (1, 2, 1):
        batches.set_epoch(epoch)
        x, y = batches[0]
        assert x.dtype == np.float32 and np.array_equal(x[:, 0] // 3, y.argmax(1))  # each label its example's
        drawn.append(x[:, 0] % 3)
    assert not np.array_equal(drawn[0], drawn[1]) and np.array_equal(drawn[0], drawn[2])


def test_the_views_are_the_image_its_mirror_then_shifted_copies():
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(image_views(images, 0, 0), images)
    assert np.array_equal(image_views(images, 1, 0), images[:, :, ::-1])
    for view in (2, 3, 5):
        shifted = image_views(images, view, 0)
        source = images[:, :, ::-1] if view % 2 else images
        found = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                 if np.array_equal(shifted[:, 8:24, 8:24], source[:, 8 + dy:24 + dy, 8 + dx:24 + dx])]
        assert len(found) == 1 and found[0] != (0, 0), (view, found)


@pytest.mark.parametrize("settings,message", [
    ({}, "finetune_fraction below 1"),
    ({"finetune_fraction": 0.5, "augment": "mixup"}, "augment none or basic"),
    ({"finetune_fraction": 0.5, "augment": "none", "finetune_views": 2}, "finetune_views=1 with augment=none"),
    ({"finetune_fraction": 0.5, "hem": True}, "hem off"),
])
def test_cached_finetuning_settings_are_checked(settings, message):
    from cifar100.config import ConfigError, validate

    assert make_config("smoke", {"finetune_features": "cached", "finetune_fraction": 0.5}).views() == 1  # augment none
    assert make_config("cpu-small", {"finetune_features": "cached"}).views() == 2  # the image and its mirror
    config = make_config("smoke", {"finetune_features": "cached", "augment": "basic", **settings})
    with pytest.raises(ConfigError, match=message):
        validate(config, check_data=False)


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_cached_finetuning_trains_the_top_on_activations_computed_once(synthetic_cifar100, tmp_path, capsys):
    weights = tmp_path / "tinycnn.weights.h5"  # given weights count as pretrained: phase 1 runs
    models.tiny_cnn().save_weights(weights)
    config = make_config("smoke", {"data_dir": str(synthetic_cifar100), "runs_dir": str(tmp_path), "head_epochs": 1,
                                   "weights": str(weights), "augment": "basic", "finetune_epochs": 2,
                                   "finetune_features": "cached", "finetune_fraction": 0.5, "finetune_views": 3})
    training = train.Training(config)  # the loop of train.run, to look at the model it trained
    for phase in train.PHASES:
        training.set_phase(phase)
        if training.needs(phase):
            trainee, batches, validation = training.data(phase)
            train.compile_model(trainee, train.learning_rate(config, phase, len(batches)), config)
            first, last = training.epochs(phase)
            trainee.fit(batches, validation_data=validation, initial_epoch=first, epochs=last, verbose=0,
                        shuffle=False, callbacks=training.callbacks(phase))
            training.end(phase)
    run_dir = training.finish()
    printed = capsys.readouterr().out
    assert "phase 2 on cached activations: the backbone up to " in printed and "3 view(s) of 900 training" in printed
    initial = keras.Model.from_config(models.tiny_cnn().get_config())
    initial.load_weights(weights)
    changed = [not all(np.array_equal(a, b) for a, b in zip(before.get_weights(), after.get_weights(), strict=True))
               for before, after in zip(initial.layers, models.backbone_of(training.model).layers, strict=True)
               if before.get_weights()]
    assert changed == [False] * (len(changed) - 1) + [True]  # only the conv above the cut (BatchNorm frozen)
    best = keras.saving.load_model(run_dir / "best.keras")  # the whole model, raw images in
    from cifar100 import evaluate

    splits = data.prepare_data(config, data.load(synthetic_cifar100))
    rows = train.run_folder.history_rows(run_dir)
    val = evaluate.basic_metrics(best, splits.x_val, splits.y_val, 100)  # through the whole model, on images
    assert val["top1"] == pytest.approx(max(float(r["val_accuracy"]) for r in rows), abs=1e-6)
