"""Weights from files as users supply them: Keras's legacy ImageNet HDF5 layout, a Keras 3
`.weights.h5`, and the offline message when ImageNet weights are missing."""

import os

import h5py
import keras
import numpy as np
import pytest
from conftest import saved_from_keras_applications

from pipeline import config, model, weights


def _probe(net):
    x = np.random.default_rng(0).uniform(0, 255, (1, 16, 16, 3)).astype("float32")
    return keras.ops.convert_to_numpy(net(x))


def _random_reference(seed=11):
    ref = model.vgg19("avg")
    model.load_weights(ref, "random", seed)
    return ref


def test_legacy_h5_in_the_layout_keras_downloads(tmp_path):
    """Written with h5py in the layout of vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5:
    `layer_names` and per-layer `weight_names` attributes, datasets named `<layer>_W_1:0`."""
    ref = _random_reference()
    path = tmp_path / "vgg19_notop.h5"
    with h5py.File(path, "w") as f:
        names = ["input_1", *[layer.name for layer in ref.layers[1:]]]
        f.attrs["layer_names"] = [n.encode() for n in names]
        for name in names:
            group = f.create_group(name)
            weights = ref.get_layer(name).get_weights() if name != "input_1" else []
            labels = [f"{name}_W_1:0", f"{name}_b_1:0"][: len(weights)]
            group.attrs["weight_names"] = [n.encode() for n in labels]
            for label, value in zip(labels, weights):
                group.create_dataset(label, data=value)
    loaded = model.vgg19("avg")
    assert model.load_weights(loaded, str(path), seed=0) == str(path)
    np.testing.assert_allclose(_probe(loaded), _probe(ref), rtol=1e-6)


def test_keras3_weights_file_saved_from_keras_applications(tmp_path):
    """A user's own copy saved from keras.applications.VGG19 loads by the same layer names."""
    ref = _random_reference(seed=12)
    path = saved_from_keras_applications(ref, keras.applications.VGG19,
                                         tmp_path / "vgg19.weights.h5")
    loaded = model.vgg19("avg")
    model.load_weights(loaded, str(path), seed=0)
    np.testing.assert_allclose(_probe(loaded), _probe(ref), rtol=1e-6)


def test_a_file_that_is_not_vgg19_weights_is_named_in_the_error(tmp_path):
    path = tmp_path / "other.weights.h5"
    small = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    small.save_weights(path)
    with pytest.raises(model.WeightsError, match="other.weights.h5"):
        model.load_weights(model.vgg19("avg"), str(path), seed=0)


def test_missing_imagenet_weights_say_where_to_put_them(monkeypatch):
    # conftest points KERAS_HOME at an empty folder before Keras is imported.
    monkeypatch.setenv("PIPELINE_OFFLINE", "1")  # never reach for the network in a test
    cache = os.path.join(os.environ["KERAS_HOME"], "models", weights.WEIGHTS_FILE)
    assert not os.path.exists(cache)
    with pytest.raises(model.WeightsError) as info:
        model.feature_extractor(config.ModelConfig(weights="imagenet"), seed=0)
    message = str(info.value)
    assert cache in message
    assert weights.WEIGHTS_URL in message
    assert "model.weights: random" in message
    assert "\n" not in message
