import keras
import numpy as np
import pytest

from cifar100.callbacks import HardExampleMining, mining_probabilities, per_example_cross_entropy
from cifar100.run_folder import trim_history
from cifar100.sampling import TrainBatches


def make_sampler(n=100, classes=5, batch=16, **kwargs):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return TrainBatches(images, np.arange(n) % classes, classes, batch, seed=1, **kwargs)


def epoch_indices(sampler):
    return np.concatenate([sampler.order[i * sampler.batch_size:(i + 1) * sampler.batch_size]
                           for i in range(len(sampler))])


def test_uniform_epochs_show_every_example_once_in_a_new_order():
    sampler = make_sampler()
    sampler.set_epoch(0)
    first = epoch_indices(sampler)
    np.testing.assert_array_equal(np.sort(first), np.arange(100))
    sampler.set_epoch(1)
    second = epoch_indices(sampler)
    np.testing.assert_array_equal(np.sort(second), np.arange(100))
    assert not np.array_equal(first, second)


def test_an_epochs_batches_depend_only_on_the_epoch_not_on_what_was_read_before():
    """Keras peeks at batches and reads ahead; a resumed run starts at its epoch with the same batches."""
    uninterrupted = make_sampler(mix="mixup")
    batches = []
    for epoch in range(3):
        uninterrupted.set_epoch(epoch)
        uninterrupted[0], uninterrupted[5]  # read ahead, as tf.data's prefetch does
        batches.append(uninterrupted[1])
    resumed = make_sampler(mix="mixup")
    resumed[0]  # Keras' peek at the first batches
    resumed.set_epoch(2)
    for got, expected in zip(resumed[1], batches[2], strict=True):
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(batches[1][0], batches[2][0])


def test_batches_are_raw_uint8_images_with_one_hot_labels():
    sampler = make_sampler()
    images, labels = sampler[0]
    assert images.dtype == np.uint8 and images.shape == (16, 32, 32, 3)
    assert labels.shape == (16, 5)
    np.testing.assert_array_equal(labels.argmax(1), sampler.labels[sampler.order[:16]])
    assert len(sampler) == 7 and len(sampler[6][0]) == 4


def test_draws_follow_the_probabilities():
    sampler = make_sampler(n=10)
    probabilities = np.array([0.5] + [0.5 / 9] * 9)
    sampler.set_probabilities(probabilities)
    counts = np.zeros(10)
    for epoch in range(400):
        sampler.set_epoch(epoch)
        counts += np.bincount(sampler.order, minlength=10)
    np.testing.assert_allclose(counts / counts.sum(), probabilities, atol=0.02)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixing_blends_images_and_labels(mix):
    sampler = make_sampler(mix=mix)
    images, labels = sampler[0]
    assert images.dtype == np.uint8
    np.testing.assert_allclose(labels.sum(1), 1.0, rtol=1e-5)
    assert (labels > 0).sum(1).max() <= 2


def test_mining_probabilities_favour_high_loss_and_keep_the_floor():
    losses = np.array([0.1, 0.5, 1.0, 4.0])
    p = mining_probabilities(losses, strength=1.0, floor=0.5)
    assert np.isclose(p.sum(), 1.0) and np.all(np.diff(p) > 0)
    assert p.min() >= 0.5 / 4 - 1e-12
    flat = mining_probabilities(losses, strength=0.0, floor=0.5)
    np.testing.assert_allclose(flat, 0.25)


def test_hard_example_mining_raises_the_hardest_examples_draw_probability():
    keras.utils.set_random_seed(0)
    sampler = make_sampler(n=200, classes=5)
    model = keras.Sequential([keras.Input((32, 32, 3), dtype="uint8"), keras.layers.Rescaling(1 / 255),
                              keras.layers.Flatten(), keras.layers.Dense(5, activation="softmax")])
    mining = HardExampleMining(sampler, fraction=1.0, strength=2.0, floor=0.3, keep=10)
    mining.set_model(model)
    logs = {}
    mining.on_epoch_end(0, logs)
    losses = per_example_cross_entropy(model, sampler.images, sampler.labels)
    p = sampler.draw_probabilities()
    hardest, easiest = np.argsort(-losses)[:10], np.argsort(losses)[:10]
    assert np.all(p[hardest] > 1 / 200) and np.all(p[hardest] > p[easiest].max())
    assert p.min() >= 0.3 / 200 - 1e-12 and np.isclose(p.sum(), 1.0)
    np.testing.assert_array_equal(mining.hardest_indices, hardest)
    np.testing.assert_allclose(mining.hardest_losses, losses[hardest], rtol=1e-5)
    assert logs["hem_seconds"] > 0


def test_mining_scores_only_a_fraction_and_only_every_k_epochs():
    sampler = make_sampler(n=200)
    model = keras.Sequential([keras.Input((32, 32, 3), dtype="uint8"), keras.layers.Rescaling(1 / 255),
                              keras.layers.Flatten(), keras.layers.Dense(5, activation="softmax")])
    mining = HardExampleMining(sampler, every=2, fraction=0.25)
    mining.set_model(model)
    logs = {}
    mining.on_epoch_end(0, logs)
    assert logs["hem_seconds"] == 0 and sampler.probabilities is None
    mining.on_epoch_end(1, logs)
    assert np.sum(~np.isnan(mining.losses)) == 50 and sampler.probabilities is not None


def test_trim_history_drops_rows_from_the_restart_epoch(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss\n0,1.0\n1,0.9\n2,0.8\n")
    trim_history(path, 2)
    assert path.read_text() == "epoch,loss\n0,1.0\n1,0.9\n"
    trim_history(path, 0)
    assert path.read_text() == ""  # CSVLogger writes the header again
