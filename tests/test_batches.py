import numpy as np
import pytest

from cifar100.batches import TrainBatches
from cifar100.run_folder import trim_history


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


def test_weighted_batches_carry_the_weights_and_still_show_every_example_once():
    sampler = make_sampler(weighted=True)
    images, labels, weights = sampler[0]
    np.testing.assert_array_equal(weights, np.ones(16, np.float32))  # all 1 until mining sets them
    sampler.set_weights(np.arange(100, dtype=np.float32) / 50)
    sampler.set_epoch(3)
    np.testing.assert_array_equal(np.sort(epoch_indices(sampler)), np.arange(100))
    _, _, weights = sampler[2]
    np.testing.assert_allclose(weights, sampler.order[32:48] / 50)
    with pytest.raises(ValueError, match="one per training example"):
        sampler.set_weights(np.ones(99))


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixing_gives_each_label_the_share_of_the_image_it_has(mix):
    """Image k is flat grey of value 10 * k and of class k: what a mixed image holds of each source image
    is readable from its pixels, and must be the weight of that source's class in the mixed label."""
    n = 16
    images = np.repeat((10 * np.arange(n, dtype=np.uint8))[:, None, None, None], 32 * 32 * 3).reshape(n, 32, 32, 3)
    sampler = TrainBatches(images, np.arange(n), n, n, seed=3, mix=mix)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        mixed, labels = sampler[0]
        own = sampler.order[:n]
        np.testing.assert_allclose(labels.sum(1), 1.0, rtol=1e-5)
        for row, k in enumerate(own):
            partner = int(np.argmax(np.where(np.arange(n) == k, -1, labels[row])))
            if labels[row, k] == 1.0:  # paired with itself, or nothing pasted
                assert np.all(mixed[row] == 10 * k)
                continue
            if mix == "cutmix":  # the share of pixels pasted from the partner
                share, tolerance = np.mean(mixed[row] == 10 * partner), 1e-6
            else:  # pixel = round(lam * own + (1 - lam) * partner): lam is known to within the rounding
                share = (float(mixed[row, 0, 0, 0]) - 10 * k) / (10 * partner - 10 * k)
                tolerance = 0.5 / abs(10 * partner - 10 * k) + 1e-6
            assert labels[row, partner] == pytest.approx(share, abs=tolerance)
            assert labels[row, k] == pytest.approx(1 - share, abs=tolerance)


def test_trim_history_keeps_the_committed_epochs(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss\n1,1.0\n2,0.9\n3,0.8\n")
    trim_history(path, 2)
    assert path.read_text() == "epoch,loss\n1,1.0\n2,0.9\n"
    trim_history(path, 0)
    assert path.read_text() == ""  # CSVLogger writes the header again


def test_history_counts_epochs_from_1_and_an_earlier_folder_is_renumbered_once(tmp_path):
    import keras

    from cifar100 import plots, run_folder
    from cifar100.callbacks import HistoryLog

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    x, y = np.zeros((4, 2), np.float32), np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]
    model.fit(x, y, epochs=3, verbose=0, validation_data=(x, y),
              callbacks=[HistoryLog(tmp_path / "history.csv", append=True)])
    assert [row["epoch"] for row in run_folder.history_rows(tmp_path)] == ["1", "2", "3"]  # as the progress bar

    old = tmp_path / "old"
    old.mkdir()
    (old / "history.csv").write_text("epoch,loss\n0,1.0\n1,0.9\n")  # an earlier version's, from 0
    run_folder.count_epochs_from_1(old)
    run_folder.count_epochs_from_1(old)  # once only
    assert (old / "history.csv").read_text() == "epoch,loss\n1,1.0\n2,0.9\n"
    assert run_folder.read_state(old)["history_epochs_from"] == 1
    assert list(plots.read_history(old)["epoch"]) == [1, 2]
    (old / "state.json").unlink()  # a state.json without the mark (lost, or edited): rows from 1 stay as they are
    run_folder.count_epochs_from_1(old)
    assert (old / "history.csv").read_text() == "epoch,loss\n1,1.0\n2,0.9\n"
    assert list(plots.read_history(old)["epoch"]) == [1, 2]
    (old / "history.csv").write_text("epoch,loss\n0,1.0\n1,0.9\n")  # a finished run of an earlier version
    assert list(plots.read_history(old)["epoch"]) == [1, 2]


def test_fit_input_reads_each_epochs_batches_as_the_sampler_then_makes_them_without_tf_data_autotuning():
    """What fit() is given on TensorFlow: the sampler's batches, read lazily per epoch (so an order or loss
    weights set at an epoch's start reach that epoch's batches), and no autotuning, whose model thread made
    each epoch wait for the previous epoch's iterator to be destroyed (keras_internals.fit_input)."""
    from cifar100.keras_internals import fit_input

    sampler = make_sampler(weighted=True)
    dataset = fit_input(sampler)
    assert dataset.options().autotune.enabled is False
    assert int(dataset.cardinality()) == len(sampler) == 7
    for epoch, weights in ((0, None), (1, np.arange(100, dtype=np.float32) / 50)):
        sampler.set_epoch(epoch)
        sampler.set_weights(weights)
        got = list(dataset.as_numpy_iterator())
        assert len(got) == len(sampler)
        for index, batch in enumerate(got):
            for part, expected in zip(batch, sampler[index], strict=True):
                np.testing.assert_array_equal(part, expected)
    np.testing.assert_allclose(got[0][2], sampler.order[:16] / 50)  # epoch 1's weights, in epoch 1's order
