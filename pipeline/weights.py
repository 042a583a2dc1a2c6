"""Where the ImageNet weights files live, and fetching them once. No framework is imported
unless a download is needed, so that a batch can check its weights before any run starts
(a sweep without the file fails once, up front, not once per run)."""

from __future__ import annotations

import os

# Keras's own notop files for each network, and the md5 sums keras.applications checks.
IMAGENET_FILES = {
    "vgg19": ("vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
              "253f8cb515780f3b799900260a226db6"),
    "vgg16": ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
              "6d6bbae143d832006294945121d1f1fc"),
}


def weights_url(network: str) -> str:
    return ("https://storage.googleapis.com/tensorflow/keras-applications/"
            f"{network}/{IMAGENET_FILES[network][0]}")


WEIGHTS_FILE, WEIGHTS_MD5 = IMAGENET_FILES["vgg19"]
WEIGHTS_URL = weights_url("vgg19")


class WeightsError(RuntimeError):
    """The weights cannot be had; the message says what to do."""


def cached_path(network: str = "vgg19") -> str:
    """Where keras.utils.get_file caches the file (Keras reads KERAS_HOME, else ~/.keras)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models", IMAGENET_FILES[network][0])


def imagenet_file(network: str = "vgg19") -> str:
    """The path of the network's ImageNet file, downloaded into Keras's cache if missing and
    allowed (PIPELINE_OFFLINE unset); WeightsError says where to put it otherwise."""
    cached = cached_path(network)
    if os.path.isfile(cached):
        return cached
    filename, md5 = IMAGENET_FILES[network]
    url = weights_url(network)
    help_text = (
        f"ImageNet {network.upper()} weights are not in Keras's cache ({cached}). On a machine "
        f"with network, download {url} and copy it there (or set model.weights to its path); "
        "`model.weights: random` runs offline, for tests only"
    )
    if os.environ.get("PIPELINE_OFFLINE"):
        raise WeightsError(help_text + " [PIPELINE_OFFLINE is set: no download tried]")
    import keras  # only now: downloading is the one thing here that needs it

    try:
        return keras.utils.get_file(filename, url, cache_subdir="models", file_hash=md5)
    except Exception as e:  # no network, proxy, disk full, bad hash...
        raise WeightsError(f"{help_text} [download failed: {str(e).splitlines()[0]}]") from None
