"""model.network: vgg16 against Keras's own VGG16; style_scale's shapes; the new keys'
validation (one line naming the key) and their place in sweeps and run ids."""

import dataclasses
import os

import keras
import numpy as np
import pytest
import yaml
from conftest import saved_from_keras_applications, write_image

from pipeline import config, model, stylize
from pipeline.config import ConfigError

VGG16_CONVS = ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2",
               "block3_conv1", "block3_conv2", "block3_conv3", "block4_conv1", "block4_conv2",
               "block4_conv3", "block5_conv1", "block5_conv2", "block5_conv3"]


def test_vgg16_matches_keras_applications_vgg16():
    """Same layer names as Keras's VGG16, and with max pooling the same outputs for the same
    weights: Keras's model is an independent implementation to check against."""
    ours = model.vgg("vgg16", "max")
    model.load_weights(ours, "random", seed=3)
    theirs = keras.applications.VGG16(include_top=False, weights=None, input_shape=(None, None, 3))
    their_convs = [layer for layer in theirs.layers if layer.get_weights()]
    assert [layer.name for layer in their_convs] == VGG16_CONVS == list(config.conv_layers("vgg16"))
    for layer in their_convs:
        layer.set_weights(ours.get_layer(layer.name).get_weights())
    x = np.random.default_rng(0).uniform(-100, 100, (1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x)),
                               keras.ops.convert_to_numpy(theirs(x)), rtol=1e-4, atol=1e-4)


def test_vgg16_weights_file_from_keras_applications_loads(tmp_path):
    ref = model.vgg("vgg16", "avg")
    model.load_weights(ref, "random", seed=8)
    path = saved_from_keras_applications(ref, keras.applications.VGG16,
                                         tmp_path / "vgg16.weights.h5")
    loaded = model.vgg("vgg16", "avg")
    model.load_weights(loaded, str(path), seed=0)
    probe = np.random.default_rng(1).uniform(0, 255, (1, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(probe)),
                               keras.ops.convert_to_numpy(ref(probe)), rtol=1e-6)
    # The same file is no VGG19: refused, not half-loaded.
    with pytest.raises(model.WeightsError, match="cannot load VGG19 weights"):
        model.load_weights(model.vgg("vgg19", "avg"), str(path), seed=0)


def test_missing_vgg16_imagenet_weights_say_where_to_put_them(monkeypatch):
    monkeypatch.setenv("PIPELINE_OFFLINE", "1")
    filename = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"  # keras.applications' name
    cache = os.path.join(os.environ["KERAS_HOME"], "models", filename)
    with pytest.raises(model.WeightsError) as info:
        model.feature_extractor(config.ModelConfig(network="vgg16", weights="imagenet"), seed=0)
    message = str(info.value)
    assert cache in message and "\n" not in message
    assert ("https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + filename
            in message)
    assert "VGG16" in message and "model.weights: random" in message


# --------------------------------------------------------------------------- style_scale


@pytest.mark.parametrize("scale, square, wide", [
    (1.0, (32, 32), (11, 32)),  # the content's long side (20x60 -> 10.67 rows -> 11)
    (0.5, (16, 16), (5, 16)),
    (0.7, (23, 23), (8, 23)),  # ceil(0.7 * 32) = ceil(22.4) = 23, as neural-style
    (1.5, (48, 48), (16, 48)),
])
def test_style_scale_sets_the_styles_long_side(scale, square, wide):
    cfg = config.Config(content="c.png", style=["a.png", "b.png"], size=32, style_scale=scale)
    content = np.zeros((40, 48, 3), np.float32)
    styles = [np.zeros((32, 32, 3), np.float32), np.zeros((20, 60, 3), np.float32)]
    out_content, out_styles = stylize.prepare(cfg, content, styles)
    assert out_content.shape == (27, 32, 3)  # the content ignores style_scale
    assert [s.shape[:2] for s in out_styles] == [square, wide]


# --------------------------------------------------------------------------- the keys


@pytest.fixture
def exp(tmp_path):
    write_image(tmp_path / "content.png", (20, 24))
    write_image(tmp_path / "style.png", (20, 20))
    return tmp_path


def load(exp, **keys):
    path = exp / "run.yaml"
    path.write_text(yaml.safe_dump({"content": "content.png", "style": "style.png", **keys}))
    return config.load(path)


@pytest.mark.parametrize("keys, words", [
    ({"model": {"network": "vgg11"}}, ["model.network", "vgg19, vgg16"]),
    ({"model": {"network": "vgg16", "style_layers": ["block5_conv4"]}},
     ["model.style_layers", "not a VGG16 conv layer", "block5_conv3"]),
    ({"preserve_colors": "yes"}, ["preserve_colors", "none, luminance, histogram"]),
    ({"preserve_colors": True}, ["preserve_colors", "string"]),
    ({"style_scale": 0}, ["style_scale", "positive"]),
    ({"style_scale": 0.1, "size": 64}, ["style_scale", "7 px", "between 16"]),
    ({"style_scale": 4, "size": 4096}, ["style_scale", "16384 px"]),
    ({"style_scale": 0.25, "size": 128, "scales": [32, 128]},  # its first, smallest stage
     ["style_scale", "8 px", "style_scale * 32"]),
])
def test_bad_values_name_the_key(exp, keys, words):
    with pytest.raises(ConfigError) as info:
        load(exp, **keys)
    message = str(info.value)
    assert "\n" not in message and "run.yaml" in message
    for word in words:
        assert word in message, message


def test_vgg16_layers_validate_and_vgg19_names_are_refused_there(exp):
    cfg = load(exp, model={"network": "vgg16", "style_layers": ["block3_conv3"]})
    assert cfg.model.network == "vgg16"
    with pytest.raises(ConfigError, match="block3_conv4"):
        load(exp, model={"network": "vgg16", "content_layers": ["block3_conv4"]})


def test_new_keys_sweep_and_change_the_run_id(exp):
    cfg = load(exp, sweep={"preserve_colors": ["none", "luminance", "histogram"],
                           "style_scale": [1, 0.5], "model.network": ["vgg19", "vgg16"]})
    runs = config.expand(cfg)
    assert len(runs) == 12
    # The hash, not the id: an id holds the swept values whether or not the hash does.
    assert len({config.config_hash(one) for _, one in runs}) == 12
    assert {one.preserve_colors for _, one in runs} == {"none", "luminance", "histogram"}
    base = config.config_hash(runs[0][1])
    for change in ({"style_scale": 2.0}, {"preserve_colors": "histogram"}):
        assert config.config_hash(dataclasses.replace(runs[0][1], **change)) != base


def test_default_style_layer_weights_are_one_over_channels_squared():
    """The None rule, for the default layers and for any other choice."""
    np.testing.assert_allclose(config.style_weights(config.ModelConfig()),
                               [1 / 64**2, 1 / 128**2, 1 / 256**2, 1 / 512**2, 1 / 512**2])
    chosen = config.ModelConfig(style_layers=["block3_conv2", "block1_conv2"])
    np.testing.assert_allclose(config.style_weights(chosen), [1 / 256**2, 1 / 64**2])
    explicit = config.ModelConfig(style_layer_weights=[1, 1, 1, 1, 1])
    assert config.style_weights(explicit) == [1, 1, 1, 1, 1]


def test_run_id_hashes_what_default_style_layer_weights_mean(exp):
    """None means 1/C_l^2: the same run as those weights spelled out, not as equal ones."""
    default = load(exp)
    spelled = load(exp, model={"style_layer_weights": [1 / c**2 for c in (64, 128, 256, 512,
                                                                         512)]})
    equal = load(exp, model={"style_layer_weights": [1, 1, 1, 1, 1]})
    assert config.config_hash(default) == config.config_hash(spelled)
    assert config.config_hash(default) != config.config_hash(equal)


def test_an_image_too_narrow_for_the_deepest_layer_fails_with_its_size():
    """13x16 px halves to 0 rows before block5: said in one line, not a pooling crash."""
    cfg = config.Config(content="c.png", style=["s.png"], size=16)
    content, styles = stylize.prepare(cfg, np.zeros((40, 48, 3), np.float32),
                                      [np.zeros((32, 32, 3), np.float32)])
    with pytest.raises(ValueError, match="content image is 16x13 px.*at least 16 px"):
        stylize.check_fits(cfg, content, styles)
    shallow = dataclasses.replace(cfg, model=config.ModelConfig(
        content_layers=["block4_conv2"], style_layers=["block1_conv1", "block4_conv1"]))
    stylize.check_fits(shallow, content, styles)  # block 4 needs 8 rows: 13 will do
