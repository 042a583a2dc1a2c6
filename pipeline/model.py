"""VGG19 or VGG16 as a feature extractor: Keras's architectures and layer names, the pooling
of choice, and weights from ImageNet, a local file, or a seeded random draw."""

from __future__ import annotations

import os
import warnings

import keras
import numpy as np

from pipeline.config import BLOCK_CHANNELS, BLOCK_CONVS, ModelConfig, conv_layers
from pipeline.weights import IMAGENET_FILES, WeightsError, imagenet_file

# Caffe-style input, as the ImageNet weights were trained: BGR, minus the ImageNet mean.
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocess(x):
    """RGB pixels in 0..255, shape (..., 3), to VGG19's Caffe-style input."""
    return keras.ops.flip(x, axis=-1) - keras.ops.convert_to_tensor(IMAGENET_MEAN_BGR, x.dtype)


def dtype_policy(precision: str) -> str:
    """Keras's policy for model.precision: a low precision computes in it while the weights
    stay float32 (Keras's mixed precision), so loading and saving weights is unchanged."""
    return "float32" if precision == "float32" else f"mixed_{precision}"


def vgg(network: str, pooling: str, precision: str = "float32") -> keras.Model:
    """The convolutions of VGG19 or VGG16 under Keras's layer names: the two differ only in
    how many convolutions each block has. The paper swaps max pooling for average pooling
    ("improves the gradient flow"); the weights fit either. Outputs are in `precision`: the
    losses cast them to float32."""
    pool = keras.layers.AveragePooling2D if pooling == "avg" else keras.layers.MaxPooling2D
    policy = dtype_policy(precision)
    x = inputs = keras.Input((None, None, 3), name="input")
    for block, (convs, width) in enumerate(zip(BLOCK_CONVS[network], BLOCK_CHANNELS), start=1):
        for i in range(1, convs + 1):
            # Zeros: load_weights replaces every weight, and Keras's default random draw
            # costs seconds per run on JAX (one compiled draw per kernel shape).
            conv = keras.layers.Conv2D(
                width, 3, padding="same", activation="relu", name=f"block{block}_conv{i}",
                dtype=policy, kernel_initializer="zeros",
            )
            x = conv(x)
        x = pool(2, strides=2, name=f"block{block}_pool", dtype=policy)(x)
    return keras.Model(inputs, x, name=network)


def vgg19(pooling: str) -> keras.Model:
    """The default network."""
    return vgg("vgg19", pooling)


def load_weights(model: keras.Model, weights: str, seed: int) -> str:
    """Fill the model's weights; returns what was loaded, for the run's records."""
    if weights == "random":
        # Drawn with numpy, not Keras's initialisers, so every backend gets the same network.
        # He-normal keeps activations from fading through 16 ReLU layers.
        rng = np.random.default_rng(seed)
        for layer in model.layers:
            if isinstance(layer, keras.layers.Conv2D):
                kernel, bias = layer.get_weights()
                fan_in = np.prod(kernel.shape[:3])
                layer.set_weights([
                    rng.normal(0, np.sqrt(2 / fan_in), kernel.shape).astype("float32"),
                    np.zeros_like(bias),
                ])
        return f"random (seed {seed})"
    network = model.name  # vgg() names the model after its network
    path = imagenet_file(network) if weights == "imagenet" else weights
    try:
        # Keras only warns when a .weights.h5 lacks some layers, and leaves those layers as
        # they were: a half-random network that would quietly ruin a night of runs.
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            model.load_weights(path)
    except Exception as e:  # h5py and Keras raise many kinds; all mean "not this file"
        raise WeightsError(
            f"{path}: cannot load {network.upper()} weights ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}); expected Keras's {IMAGENET_FILES[network][0]} or a "
            f".weights.h5 saved from this {network.upper()}"
        ) from None
    return weights if weights == "imagenet" else os.path.abspath(path)


def feature_extractor(cfg: ModelConfig, seed: int) -> tuple[keras.Model, list[str], str]:
    """A model from Caffe-style input to the outputs of the layers the losses use.

    The full network holds the weights (so whole weight files load as saved); the extractor
    takes only the graph up to the deepest layer asked for, so nothing deeper is computed.
    Returns the extractor, its output layer names in order, and what weights were loaded.
    """
    full = vgg(cfg.network, cfg.pooling, cfg.precision)
    loaded = load_weights(full, cfg.weights, seed)
    names = [n for n in conv_layers(cfg.network) if n in {*cfg.content_layers, *cfg.style_layers}]
    extractor = keras.Model(full.input, [full.get_layer(n).output for n in names])
    return extractor, names, loaded
