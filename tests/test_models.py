import h5py
import keras
import numpy as np
import pytest

from cifar100 import keras_internals, models
from cifar100.config import Config, ConfigError

from .conftest import WEIGHTS_DIR

BATCH = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
@pytest.mark.parametrize("name", sorted(models.BACKBONES))
def test_every_backbone_builds_and_classifies_raw_uint8_images(name):
    size = max(models.BACKBONES[name].min_size, 32)
    model = models.build_model(Config(backbone=name, image_size=size, weights=None), num_classes=10)
    assert model.input.dtype == "uint8" and tuple(model.input.shape) == (None, 32, 32, 3)
    probabilities = model.predict(BATCH, verbose=0)
    assert probabilities.shape == (2, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_images_are_upsampled_inside_the_model_to_image_size():
    model = models.build_model(Config(backbone="tinycnn", image_size=72, weights=None), num_classes=10)
    assert tuple(model.get_layer("upsample").output.shape) == (None, 72, 72, 3)
    assert tuple(models.backbone_of(model).input.shape) == (None, 72, 72, 3)


def test_augmentation_is_active_in_training_only_and_never_in_the_inference_model():
    config = Config(backbone="tinycnn", image_size=32, weights=None, dropout=0.0)
    model = models.build_model(config, 10)
    training_model = models.training_model(model, config)
    assert not [layer for layer in model.layers if layer.name.startswith("random")]
    assert [layer.name for layer in training_model.layers if layer.name.startswith("random")]
    inference = [training_model(BATCH, training=False).numpy() for _ in range(2)] + [model(BATCH).numpy()]
    np.testing.assert_allclose(inference[0], inference[1])
    np.testing.assert_allclose(inference[0], inference[2], atol=1e-6)
    training = training_model(BATCH, training=True).numpy()
    assert not np.allclose(training, inference[0])


def test_keras_resizing_turns_on_training_mode_for_the_layers_after_it():
    """Keras' behaviour that keras_internals.call_in_inference_mode_by_default works around: a model
    called without `training` runs a BatchNormalization after a Resizing in training mode (batch
    statistics, and its moving statistics updated); built with the workaround, it does not."""
    images = BATCH.astype("float32")
    for workaround in (False, True):
        inputs = keras.Input((32, 32, 3))
        resizing = keras.layers.Resizing(40, 40)
        x = keras_internals.call_in_inference_mode_by_default(resizing, inputs) if workaround else resizing(inputs)
        model = keras.Model(inputs, keras.layers.BatchNormalization()(x))
        expected = model.predict(images, verbose=0)
        assert np.allclose(model(images).numpy(), expected, atol=1e-4) == workaround


@pytest.mark.parametrize("settings", [
    dict(backbone="tinycnn", image_size=48, augment="randaugment", dropout=0.5),
    dict(backbone="mobilenetv3small", image_size=40, augment="basic", dropout=0.3),
    dict(backbone="tinycnn", image_size=64, augment="basic", dropout=0.5, progressive_size=32),
])
def test_the_inference_model_gives_predicts_probabilities_however_it_is_called(settings):
    """model(x), model(x, training=False) and predict agree, and calling the model changes nothing in it (a
    BatchNorm that trains keeps its statistics), while fit's training=True still trains with dropout."""
    config = Config(weights=None, **settings)
    model = models.build_model(config, 10)
    models.training_model(model, config)  # built beside it, as training does: it must not change the model
    before = [w.copy() for w in model.get_weights()]
    expected = model.predict(BATCH, verbose=0)
    for call in (lambda: model(BATCH), lambda: model(BATCH, training=False)):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(call()), expected, atol=1e-6)
    for weight, kept in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(weight, kept)
    assert not np.allclose(keras.ops.convert_to_numpy(model(BATCH, training=True)), expected, atol=1e-3)


@pytest.mark.parametrize("mode,expected", [
    ("tf", lambda x: x / 127.5 - 1),
    ("caffe", lambda x: x[..., ::-1] - np.array([103.939, 116.779, 123.68])),
    ("none", lambda x: x),
])
def test_preprocessing_matches_the_backbone_convention(mode, expected):
    x = BATCH.astype(np.float32)
    np.testing.assert_allclose(preprocess(mode, x), expected(x), rtol=1e-5, atol=1e-4)


def preprocess(mode: str, x: np.ndarray) -> np.ndarray:
    for layer in models.preprocessing_layers(mode):
        x = keras.ops.convert_to_numpy(layer(x))
    return x


@pytest.mark.parametrize("backbone,keras_module", [("resnet50", "resnet50"), ("xception", "xception"),
                                                    ("mobilenetv2", "mobilenet_v2")])
def test_preprocessing_equals_keras_own(backbone, keras_module):
    x = BATCH.astype(np.float32)
    ours = preprocess(models.BACKBONES[backbone].preprocessing, x)
    theirs = getattr(keras.applications, keras_module).preprocess_input(x.copy())
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def first_conv_kernel(backbone):
    return next(layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)).kernel.numpy()


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
@pytest.mark.parametrize("backbone,file", [
    ("mobilenetv2", "mobilenet_v2_1.0_imagenet_notop.weights.h5"),
    ("mobilenetv3small", "mobilenet_v3_small_1.0_imagenet_notop.weights.h5"),
])
def test_shared_imagenet_weights_load_by_path(backbone, file):
    path = WEIGHTS_DIR / file
    if not path.exists():
        pytest.skip(f"{path} is not on this machine")
    with h5py.File(path) as f:
        expected = f["layers/conv2d/vars/0"][()]
    loaded = models.build_model(Config(backbone=backbone, image_size=64, weights=str(path)), 10)
    np.testing.assert_array_equal(first_conv_kernel(models.backbone_of(loaded)), expected)
    random = models.build_model(Config(backbone=backbone, image_size=64, weights=None), 10)
    assert not np.array_equal(first_conv_kernel(models.backbone_of(random)), expected)


def test_weights_of_another_architecture_are_refused():
    path = WEIGHTS_DIR / "mobilenet_v2_1.0_imagenet_notop.weights.h5"
    if not path.exists():
        pytest.skip(f"{path} is not on this machine")
    with pytest.raises(ConfigError, match=r"setting 'weights'.*does not fit backbone 'mobilenetv3small'"):
        models.build_model(Config(backbone="mobilenetv3small", image_size=64, weights=str(path)), 10)


def test_phases_freeze_and_unfreeze_the_backbone():
    model = models.build_model(Config(backbone="mobilenetv3small", image_size=32, weights=None), 10)
    models.set_phase(model, "head")
    head_only = models.count_parameters(model)["trainable"]
    assert head_only == 576 * 10 + 10  # only the classifier trains
    models.set_phase(model, "finetune", 1.0)
    everything = models.count_parameters(model)["trainable"]
    models.set_phase(model, "finetune", 0.3)
    top_part = models.count_parameters(model)["trainable"]
    assert head_only < top_part < everything


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_batchnorm_stays_in_inference_mode_while_fine_tuning_pretrained_weights():
    """Pretrained weights hold BatchNorm statistics: training-mode BN would destroy them (tinycnn's BatchNorm
    layers go through the same set_phase as MobileNet's, in a fraction of the time)."""
    config = Config(backbone="tinycnn", image_size=32, weights=None, dropout=0.0, augment="none")
    model = models.build_model(config, 10)
    models.set_phase(model, "finetune", 1.0)
    batch_norms = [layer for layer in models.backbone_of(model).layers
                   if isinstance(layer, keras.layers.BatchNormalization)]
    assert batch_norms and not any(layer.trainable for layer in batch_norms)
    np.testing.assert_allclose(model(BATCH, training=True).numpy(), model(BATCH, training=False).numpy(),
                               rtol=1e-4, atol=1e-6)
    moving_mean = batch_norms[1].moving_mean.numpy().copy()
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.fit(BATCH, np.eye(10, dtype="float32")[[1, 2]], epochs=1, verbose=0)
    np.testing.assert_array_equal(batch_norms[1].moving_mean.numpy(), moving_mean)


def test_imagenet_weights_that_cannot_be_downloaded_are_one_clear_error(monkeypatch):
    from keras.src.utils import file_utils

    from cifar100.config import make_config

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/w.h5: None -- [Errno -2] Name not known")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(ConfigError, match=r"setting 'weights': could not download mobilenetv3small's ImageNet "
                                          r"weights \(no network\?\): URL fetch failure .* weights=None"):
        models.build_backbone(make_config("cpu-small", {"image_size": 32}))


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_without_pretrained_weights_batchnorm_trains_and_updates_its_statistics():
    config = Config(backbone="tinycnn", image_size=32, weights=None, dropout=0.0, augment="none")
    model = models.build_model(config, 10)
    models.set_phase(model, "finetune", 1.0, pretrained=False)
    batch_norms = [layer for layer in models.backbone_of(model).layers
                   if isinstance(layer, keras.layers.BatchNormalization)]
    assert batch_norms and all(layer.trainable for layer in batch_norms)
    moving_variance = batch_norms[1].moving_variance.numpy().copy()
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.fit(BATCH, np.eye(10, dtype="float32")[[1, 2]], epochs=1, verbose=0)
    assert np.abs(batch_norms[1].moving_variance.numpy() - moving_variance).min() > 1e-5  # frozen: exactly equal


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_a_short_fit_under_mixed_bfloat16(backbone="tinycnn"):
    """mixed_precision=bfloat16: the layers compute in bfloat16, the probabilities come out float32, the loss
    stays finite and the weights (kept in float32) move."""
    import numpy as np

    from cifar100 import train

    config = Config(backbone=backbone, image_size=32, weights=None, mixed_precision="bfloat16", augment="basic")
    try:
        model = models.new_model(config, 4)
        models.set_phase(model, "finetune", pretrained=False)
        train.compile_model(model, 1e-3, config)
        before = [w.copy() for w in model.get_weights()]
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
        y = keras.utils.to_categorical(np.arange(64) % 4, 4)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("classifier").compute_dtype == "float32" and model.output.dtype == "float32"
    assert models.backbone_of(model).compute_dtype == "bfloat16"
    assert all(w.dtype == "float32" for w in model.trainable_weights)
    assert all(np.isfinite(history["loss"]))
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_the_fingerprint_follows_what_the_model_computes_not_its_names():
    config = Config(backbone="tinycnn", weights=None, image_size=32)
    model = models.build_model(config, 10)
    again = models.build_model(config, 10)  # the same recipe, built again: Keras names its layers anew
    names = [[layer.name for layer in models.backbone_of(m).layers] for m in (model, again)]
    assert names[0] != names[1]
    assert models.fingerprint(again) == models.fingerprint(model)
    models.set_phase(again, "head")  # what trains changes with the phase, not what the model is
    assert models.fingerprint(again) == models.fingerprint(model)
    keras.mixed_precision.set_global_policy("mixed_float16")  # the machine's precision ("auto"), not the model
    try:
        assert models.fingerprint(models.build_model(config, 10)) == models.fingerprint(model)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert models.fingerprint(models.build_model(config.replace(dropout=0.5), 10)) != models.fingerprint(model)
    assert models.fingerprint(models.build_model(config, 20)) != models.fingerprint(model)
    training = models.training_model(model, config)
    assert models.fingerprint(training) != models.fingerprint(model)  # the augmentation counts
    assert models.fingerprint(models.training_model(model, config.replace(augment="randaugment"))) != \
        models.fingerprint(training)
    # the same layers connected otherwise: the shortcut from the first layer's output, or from the input
    inputs = keras.Input((4,))
    first = keras.layers.Dense(4)(inputs)
    second = keras.layers.Dense(4)(first)
    wired = [keras.Model(inputs, keras.layers.Add()([second, shortcut])) for shortcut in (first, inputs)]
    assert models.fingerprint(wired[0]) != models.fingerprint(wired[1])
    assert models.fingerprint(wired[0], connections=False) == models.fingerprint(wired[1], connections=False)
