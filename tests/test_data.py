"""Tests for keras_csgd.data: image folders, splits, digits, pipelines."""

import os

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

from keras_csgd import data


def _write(path, image, fmt="png"):
    encode = tf.io.encode_png if fmt == "png" else tf.io.encode_jpeg
    tf.io.write_file(str(path), encode(image))


@pytest.fixture
def folder(tmp_path):
    """Three classes, named so that alphabetical != creation order."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    images = {}
    for name in ("zebra", "ant", "moth"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            _write(root / name / f"{i}.png", image)
            images[(name, i)] = image
    (root / "ant" / "notes.txt").write_text("not an image")
    return root, images


def test_image_folder_labels_pixels_and_cache(folder, tmp_path, monkeypatch):
    root, images = folder
    cache = tmp_path / "cache"
    x, y = data.load_image_folder(root, cache_dir=cache)
    assert x.dtype == np.uint8 and x.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(y, [0, 0, 1, 1, 2, 2])  # ant, moth, zebra
    names = ("ant", "moth", "zebra")
    expected = [images[(n, i)] for n in names for i in (0, 1)]
    np.testing.assert_array_equal(x, np.stack(expected))  # PNG is lossless
    assert len(list(cache.glob("*.npz"))) == 1

    def fail(*args):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data, "_decode_all", fail)
    x2, y2 = data.load_image_folder(root, cache_dir=cache)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)
    monkeypatch.undo()

    _write(root / "moth" / "2.png", np.zeros((32, 32, 3), np.uint8))
    x3, y3 = data.load_image_folder(root, cache_dir=cache)
    assert len(x3) == 7 and list(y3).count(1) == 3
    assert len(list(cache.glob("*.npz"))) == 2


def test_image_folder_resizes_and_converts_to_rgb(tmp_path):
    root = tmp_path / "f"
    (root / "a").mkdir(parents=True)
    _write(root / "a" / "gray.png", np.full((10, 14, 1), 77, np.uint8))
    _write(root / "a" / "rgb.jpg", np.full((40, 40, 3), 200, np.uint8), "jpeg")
    x, _ = data.load_image_folder(root, (16, 16), cache_dir=tmp_path / "c")
    assert x.shape == (2, 16, 16, 3)
    # Constant images stay constant under bilinear resizing; gray -> RGB
    # repeats the channel; JPEG of a flat image is within 2 levels.
    np.testing.assert_array_equal(x[0], 77)
    assert np.abs(x[1].astype(int) - 200).max() <= 2


def test_unwritable_cache_only_warns(folder, tmp_path):
    root, _ = folder
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="Not caching"):
        x, _ = data.load_image_folder(root, cache_dir=blocker / "sub")
    assert len(x) == 6


def test_image_folder_errors(tmp_path, monkeypatch):
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match="existing folder.*missing"):
        data.load_image_folder(missing)
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    with pytest.raises(ValueError, match="existing folder"):
        data.load_image_folder(a_file)
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="found none.*empty"):
        data.load_image_folder(empty)
    bad = tmp_path / "bad"
    (bad / "cls").mkdir(parents=True)
    _write(bad / "cls" / "ok.png", np.zeros((4, 4, 3), np.uint8))
    (bad / "cls" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="cannot be decoded.*broken.png"):
        data.load_image_folder(bad, cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.npz"))

    def denied(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "listdir", denied)
    with pytest.raises(ValueError, match="could not be read.*bad"):
        data.load_image_folder(bad)


def test_train_val_split():
    x = np.arange(100)[:, None]
    y = np.arange(100)
    (xt, yt), (xv, yv) = data.train_val_split(x, y, val_size=20, seed=3)
    assert len(xt) == 80 and len(xv) == 20
    np.testing.assert_array_equal(np.sort(np.concatenate([yt, yv])), y)
    np.testing.assert_array_equal(xt[:, 0], yt)
    expected = np.random.default_rng(3).permutation(100)[-20:]
    np.testing.assert_array_equal(yv, expected)
    (_, _), (_, yv2) = data.train_val_split(x, y, val_size=20, seed=3)
    np.testing.assert_array_equal(yv2, yv)
    with pytest.raises(ValueError, match="`val_size`.*val_size=100"):
        data.train_val_split(x, y, val_size=100)
    with pytest.raises(ValueError, match="same length"):
        data.train_val_split(x, y[:5])


def test_load_cifar10_from_folder_with_train_subfolder(folder, tmp_path):
    root, _ = folder
    parent = tmp_path / "cifar"
    parent.mkdir()
    os.symlink(root, parent / "train")
    x, y = data.load_cifar10(parent, cache_dir=tmp_path / "c")
    assert x.shape == (6, 32, 32, 3) and list(y) == [0, 0, 1, 1, 2, 2]


def test_load_cifar10_without_network_says_what_to_do(monkeypatch):
    import tensorflow_datasets as tfds

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(RuntimeError, match="no network.*Pass `data_dir`"):
        data.load_cifar10()


def _sorted_rows(x, y):
    """`(flattened image, label)` rows in lexicographic order."""
    rows = np.concatenate([x.reshape(len(x), -1), y[:, None]], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def test_load_digits_images():
    (xt, yt), (xv, yv) = data.load_digits_images()
    assert xt.shape == (1347, 8, 8, 1) and xv.shape == (450, 8, 8, 1)
    assert xt.dtype == np.float32
    # Together the splits hold scikit-learn's images / 16 with their labels.
    digits = load_digits()
    np.testing.assert_array_equal(
        _sorted_rows(np.concatenate([xt, xv]), np.concatenate([yt, yv])),
        _sorted_rows(digits.images / 16, digits.target),
    )
    counts = np.bincount(np.concatenate([yt, yv]))
    assert np.abs(np.bincount(yv) - 0.25 * counts).max() <= 1  # stratified
    (xt2, _), _ = data.load_digits_images()
    np.testing.assert_array_equal(xt, xt2)


def test_channel_stats_and_normalised_pipeline():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    y = np.arange(10)
    mean, std = data.channel_stats(x)
    ref = x.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, ref.std(0), rtol=1e-6)
    batches = list(data.make_dataset(x, y, 4, mean=mean, std=std))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    images = np.concatenate([b[0].numpy() for b in batches])
    np.testing.assert_allclose(images, (x / 255.0 - mean) / std, atol=1e-5)
    with pytest.raises(ValueError, match="`mean` and `std`"):
        data.make_dataset(x, y, mean=mean)


def test_augmentation_is_a_shifted_and_maybe_flipped_crop():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 1.0, (16, 6, 6, 1)).astype(np.float32)
    y = np.arange(16)
    out = data.make_dataset(x, y, 16, shuffle=True, augment=True, pad=2)
    images, labels = next(iter(out))
    assert sorted(labels.numpy()) == list(range(16))  # shuffle keeps all
    for image, label in zip(images.numpy(), labels.numpy()):
        padded = np.pad(x[label], [(2, 2), (2, 2), (0, 0)])
        crops = [
            c
            for dy in range(5)
            for dx in range(5)
            for c in (padded[dy : dy + 6, dx : dx + 6],)
            for c in (c, c[:, ::-1])
        ]
        assert any(np.array_equal(image, c) for c in crops)
