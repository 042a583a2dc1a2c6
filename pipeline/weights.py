"""Where the ImageNet weights file lives, and fetching it once. No framework is imported
unless a download is needed, so that a batch can check its weights before any run starts
(a sweep without the file fails once, up front, not once per run)."""

from __future__ import annotations

import os

WEIGHTS_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/" + WEIGHTS_FILE
WEIGHTS_MD5 = "253f8cb515780f3b799900260a226db6"  # as keras.applications.VGG19 checks it


class WeightsError(RuntimeError):
    """The weights cannot be had; the message says what to do."""


def cached_path() -> str:
    """Where keras.utils.get_file caches the file (Keras reads KERAS_HOME, else ~/.keras)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models", WEIGHTS_FILE)


def imagenet_file() -> str:
    """The path of the ImageNet VGG19 file, downloaded into Keras's cache if missing and
    allowed (PIPELINE_OFFLINE unset); WeightsError says where to put it otherwise."""
    cached = cached_path()
    if os.path.isfile(cached):
        return cached
    help_text = (
        f"ImageNet VGG19 weights are not in Keras's cache ({cached}). On a machine with "
        f"network, download {WEIGHTS_URL} and copy it there (or set model.weights to its path); "
        "`model.weights: random` runs offline, for tests only"
    )
    if os.environ.get("PIPELINE_OFFLINE"):
        raise WeightsError(help_text + " [PIPELINE_OFFLINE is set: no download tried]")
    import keras  # only now: downloading is the one thing here that needs it

    try:
        return keras.utils.get_file(
            WEIGHTS_FILE, WEIGHTS_URL, cache_subdir="models", file_hash=WEIGHTS_MD5
        )
    except Exception as e:  # no network, proxy, disk full, bad hash...
        raise WeightsError(f"{help_text} [download failed: {str(e).splitlines()[0]}]") from None
