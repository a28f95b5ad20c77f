"""Datasets for the demo, tests and benchmarks, with no network needed.

Image folders (`root/<class>/<image>`, e.g. CIFAR-10 as JPEGs) are decoded
once and cached as `.npz`; scikit-learn's bundled digits give an 8x8
classification task that trains in seconds; `make_dataset` builds the
`tf.data` pipelines with the standard CIFAR augmentation.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def default_cache_dir() -> str:
    """`$KERAS_CSGD_CACHE_DIR`, else `~/.cache/keras_csgd`."""
    return os.environ.get(
        "KERAS_CSGD_CACHE_DIR",
        os.path.join(os.path.expanduser("~"), ".cache", "keras_csgd"),
    )


def _list_image_folder(path: str) -> tuple[list[str], list[int]]:
    """Image files (relative paths) and labels, in a fixed order."""
    if not os.path.isdir(path):
        raise ValueError(
            "`path` must be an existing folder of class subfolders. "
            f"Received: path={path!r}"
        )
    try:
        classes = sorted(
            entry.name for entry in os.scandir(path) if entry.is_dir()
        )
        files, labels = [], []
        for label, name in enumerate(classes):
            for file in sorted(os.listdir(os.path.join(path, name))):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(name, file))
                    labels.append(label)
    except OSError as error:
        raise ValueError(
            f"`path` could not be read ({error.strerror}). "
            f"Received: path={path!r}"
        ) from None
    if not files:
        raise ValueError(
            "`path` must contain class subfolders with images "
            f"({', '.join(IMAGE_EXTENSIONS)}); found none. "
            f"Received: path={path!r}"
        )
    return files, labels


def _cache_key(path, files, image_size) -> str:
    digest = hashlib.sha1(repr((path, tuple(image_size))).encode())
    for file in files:
        stat = os.stat(os.path.join(path, file))
        digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _decode(path, image_size):
    """One image file as `image_size + (3,)` uint8 RGB (bilinear resize)."""
    image = tf.io.decode_image(
        tf.io.read_file(path), channels=3, expand_animations=False
    )
    image = tf.image.resize(image, image_size)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _decode_all(path, files, image_size) -> np.ndarray:
    paths = [os.path.join(path, file) for file in files]
    dataset = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda file: _decode(file, image_size),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    try:
        return np.concatenate(list(dataset.batch(1024).as_numpy_iterator()))
    except tf.errors.OpError:
        for file in paths:
            try:
                _decode(file, image_size)
            except tf.errors.OpError:
                raise ValueError(
                    f"`path` holds an image that cannot be decoded: {file!r}. "
                    f"Received: path={path!r}"
                ) from None
        raise


def load_image_folder(path, image_size=(32, 32), cache_dir=None):
    """Decodes an image folder once and caches it as `.npz`.

    Labels follow the alphabetical order of the class subfolders (for the
    CIFAR-10 folder: the standard CIFAR-10 label order). The cache file is
    named by a hash of the folder path, `image_size` and every file's name,
    size and modification time, so a changed folder is decoded again.

    Args:
        path: folder of class subfolders `path/<class>/<image>` (JPEG, PNG,
            BMP or GIF).
        image_size: `(height, width)` every image is resized to (bilinear;
            images of that size stay as they are). Defaults to `(32, 32)`.
        cache_dir: where the `.npz` goes. Defaults to `None`
            (`default_cache_dir()`: `$KERAS_CSGD_CACHE_DIR`, else
            `~/.cache/keras_csgd`). An unwritable folder only skips caching.

    Returns:
        `(x, y)`: uint8 images `(N, height, width, 3)` and int64 labels.

    Raises:
        ValueError: if `path` is missing, unreadable, holds no images or an
            image that cannot be decoded (the message names the file).

    Example:

    ```python
    x, y = load_image_folder("../shared/data/cifar10/train")
    (x_train, y_train), (x_val, y_val) = train_val_split(x, y)
    ```
    """
    path = os.path.abspath(os.fspath(path))
    image_size = tuple(int(side) for side in image_size)
    files, labels = _list_image_folder(path)
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    cache = os.path.join(
        cache_dir, f"images-{_cache_key(path, files, image_size)}.npz"
    )
    if os.path.isfile(cache):
        try:
            with np.load(cache) as data:
                return data["x"], data["y"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass
    x = _decode_all(path, files, image_size)
    y = np.asarray(labels, np.int64)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".npz.tmp", dir=cache_dir)
    except OSError as error:
        warnings.warn(
            f"Not caching {path!r}: {cache_dir!r} is not writable "
            f"({error.strerror}).",
            stacklevel=2,
        )
        return x, y
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=x, y=y)
        os.replace(tmp, cache)
    except BaseException:
        os.unlink(tmp)
        raise
    return x, y


def train_val_split(x, y, val_size=5000, seed=0):
    """Holds out the last `val_size` samples of a fixed shuffle.

    Args:
        x: samples, first axis = sample.
        y: labels, same length.
        val_size: validation samples. Defaults to `5000`.
        seed: shuffle seed. Defaults to `0`.

    Returns:
        `((x_train, y_train), (x_val, y_val))`.

    Raises:
        ValueError: if the lengths differ or `val_size` is not in
            `[1, len(x) - 1]`.

    Example:

    ```python
    (x_train, y_train), (x_val, y_val) = train_val_split(x, y, 5000)
    ```
    """
    if len(x) != len(y):
        raise ValueError(
            "`x` and `y` must have the same length. "
            f"Received: len(x)={len(x)}, len(y)={len(y)}"
        )
    if not 1 <= val_size < len(x):
        raise ValueError(
            f"`val_size` must be in [1, {len(x) - 1}] (len(x) - 1). "
            f"Received: val_size={val_size}"
        )
    order = np.random.default_rng(seed).permutation(len(x))
    train, val = order[:-val_size], order[-val_size:]
    return (x[train], y[train]), (x[val], y[val])


def load_cifar10(data_dir=None, cache_dir=None):
    """The 50,000 CIFAR-10 training images (Krizhevsky, 2009).

    Args:
        data_dir: an image folder of the ten class subfolders, or a folder
            holding it as `train/`. Defaults to `None`
            (`tensorflow_datasets`, which downloads when the network allows).
        cache_dir: see `load_image_folder`. Defaults to `None`.

    Returns:
        `(x, y)`: uint8 images `(50000, 32, 32, 3)` and int64 labels.

    Raises:
        ValueError: if `data_dir` is not a readable image folder.
        RuntimeError: if `data_dir` is `None` and `tensorflow_datasets`
            cannot provide CIFAR-10 (e.g. no network).

    Example:

    ```python
    x, y = load_cifar10("../shared/data/cifar10")
    ```
    """
    if data_dir is not None:
        data_dir = os.fspath(data_dir)
        train = os.path.join(data_dir, "train")
        folder = train if os.path.isdir(train) else data_dir
        return load_image_folder(folder, (32, 32), cache_dir)
    try:
        import tensorflow_datasets as tfds

        x, y = tfds.as_numpy(
            tfds.load(
                "cifar10", split="train", as_supervised=True, batch_size=-1
            )
        )
    except Exception as error:  # tfds raises many kinds of network errors.
        raise RuntimeError(
            "CIFAR-10 is not available through tensorflow_datasets "
            f"({type(error).__name__}: {error}). Pass `data_dir`, a folder "
            "of class subfolders of images."
        ) from error
    return x, y.astype(np.int64)


def load_digits_images(test_size=0.25, seed=0):
    """scikit-learn's bundled 8x8 digits as images, with a fixed split.

    Args:
        test_size: fraction held out, stratified by class. Defaults to
            `0.25`.
        seed: split seed. Defaults to `0`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: float32 images
        `(N, 8, 8, 1)` in `[0, 1]` and int64 labels (1347 / 450 samples).

    Example:

    ```python
    (x_train, y_train), (x_test, y_test) = load_digits_images()
    ```
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return (x_train, y_train), (x_test, y_test)


def _unit_scale(x) -> float:
    """The factor that maps `x` to `[0, 1]`: 1/255 for uint8 images."""
    return 1.0 / 255.0 if np.asarray(x).dtype == np.uint8 else 1.0


def channel_stats(x):
    """Per-channel mean and standard deviation of images scaled to [0, 1].

    Args:
        x: images `(N, H, W, C)`, uint8 (divided by 255) or float.

    Returns:
        `(mean, std)`, float32 arrays of shape `(C,)`.
    """
    x = np.asarray(x, np.float64) * _unit_scale(x)
    mean = x.mean(axis=(0, 1, 2))
    std = x.std(axis=(0, 1, 2))
    return mean.astype(np.float32), std.astype(np.float32)


def _augment(image, label, pad, seed):
    """Zero-pads by `pad`, crops back at a random offset, random h-flip."""
    shape = tf.shape(image)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.random_crop(padded, shape, seed=seed)
    return tf.image.random_flip_left_right(image, seed=seed), label


def make_dataset(
    x,
    y,
    batch_size=128,
    shuffle=False,
    augment=False,
    mean=None,
    std=None,
    pad=4,
    seed=0,
):
    """A batched `tf.data` pipeline over in-memory images.

    Images are scaled to `[0, 1]` (uint8 / 255), normalised per channel
    when `mean`/`std` are given, then (with `augment`) padded by `pad`,
    randomly cropped back and randomly flipped left-right: the standard
    CIFAR augmentation (He et al. 2016).

    Args:
        x: images `(N, H, W, C)`, uint8 or float.
        y: labels `(N,)`.
        batch_size: batch size (the last batch may be smaller). Defaults to
            `128`.
        shuffle: reshuffle every epoch. Defaults to `False`.
        augment: pad, random crop and flip. Defaults to `False`.
        mean: per-channel mean to subtract (see `channel_stats`). Defaults
            to `None` (no normalisation).
        std: per-channel standard deviation to divide by. Defaults to
            `None`.
        pad: padding of the random crop. Defaults to `4`.
        seed: shuffle and augmentation seed. Defaults to `0`.

    Returns:
        A `tf.data.Dataset` of `(images, labels)` float32/int batches.

    Raises:
        ValueError: if `x` and `y` differ in length, or only one of
            `mean` and `std` is given.

    Example:

    ```python
    mean, std = channel_stats(x_train)
    train = make_dataset(x_train, y_train, 128, shuffle=True, augment=True,
                         mean=mean, std=std)
    ```
    """
    if len(x) != len(y):
        raise ValueError(
            "`x` and `y` must have the same length. "
            f"Received: len(x)={len(x)}, len(y)={len(y)}"
        )
    if (mean is None) != (std is None):
        raise ValueError(
            "`mean` and `std` must be given together. "
            f"Received: mean={mean}, std={std}"
        )
    scale = _unit_scale(x)
    offset = 0.0 if mean is None else np.asarray(mean, np.float32)
    divisor = 1.0 if std is None else np.asarray(std, np.float32)

    def prepare(image, label):
        image = tf.cast(image, tf.float32) * scale
        return (image - offset) / divisor, label

    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        dataset = dataset.shuffle(len(x), seed=seed)
    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if augment:
        dataset = dataset.map(
            lambda image, label: _augment(image, label, pad, seed),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)

