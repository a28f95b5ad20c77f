"""Test setup: quiet TensorFlow logs, two logical CPUs for MirroredStrategy."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)


def two_cpu_strategy():
    """MirroredStrategy over the two logical CPUs.

    `ReductionToOneDevice`: the CPU collectives of several strategies in one
    process clash on their instance keys.
    """
    return tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")[:2]],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )
