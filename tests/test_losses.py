"""The objective against independent computations: hand-written loops over small arrays,
Keras's own VGG19 as a second implementation of the network, and finite differences."""

import dataclasses

import keras
import numpy as np
import pytest
from keras import ops

from pipeline import autodiff, config, model
from pipeline.losses import Objective, content_loss, gram, style_loss, total_variation


def test_gram_matches_a_loop_over_positions():
    f = np.arange(12, dtype=np.float32).reshape(1, 2, 3, 2) - 5  # H=2, W=3, C=2
    expected = np.zeros((2, 2))
    for c in range(2):
        for d in range(2):
            expected[c, d] = sum(f[0, i, j, c] * f[0, i, j, d]
                                 for i in range(2) for j in range(3)) / 6
    np.testing.assert_allclose(ops.convert_to_numpy(gram(f))[0], expected, rtol=1e-6)


def test_content_and_style_losses_are_means_of_squares():
    a = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    b = np.array([[0.0, 2.0], [5.0, 1.0]], dtype=np.float32)
    # (1 + 0 + 4 + 9) / 4
    assert float(content_loss(a, b)) == pytest.approx(3.5)
    assert float(style_loss(a, b)) == pytest.approx(3.5)


def test_total_variation_by_hand():
    x = np.zeros((2, 3, 3), dtype=np.float32)
    x[:, :, 0] = [[0, 1, 3], [2, 2, 2]]  # only channel 0 varies
    # vertical neighbours: (2-0)^2 + (2-1)^2 + (2-3)^2 = 6 over 1*3*3 = 9 entries
    # horizontal: (1-0)^2 + (3-1)^2 + 0 + 0 = 5 over 2*2*3 = 12 entries
    assert float(total_variation(x)) == pytest.approx(6 / 9 + 5 / 12)


def test_preprocess_is_caffe_bgr_minus_mean():
    x = np.array([[[10.0, 20.0, 30.0]]], dtype=np.float32)
    out = ops.convert_to_numpy(model.preprocess(ops.convert_to_tensor(x)))
    np.testing.assert_allclose(out[0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-6)


def test_architecture_matches_keras_applications_vgg19():
    """Same layer names and shapes as Keras's VGG19, and with max pooling the same outputs
    for the same weights: Keras's model is an independent implementation to check against."""
    ours = model.vgg19("max")
    model.load_weights(ours, "random", seed=3)
    theirs = keras.applications.VGG19(include_top=False, weights=None, input_shape=(None, None, 3))
    their_convs = [layer for layer in theirs.layers if layer.get_weights()]
    assert [layer.name for layer in their_convs] == list(config.VGG19_CONV_LAYERS)
    for layer in their_convs:
        layer.set_weights(ours.get_layer(layer.name).get_weights())
    x = np.random.default_rng(0).uniform(-100, 100, (1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(ops.convert_to_numpy(ours(x)), ops.convert_to_numpy(theirs(x)),
                               rtol=1e-4, atol=1e-4)


def _cfg(**loss):
    cfg = config.Config(content="c.png", style=["s.png"])
    # Average pooling: smooth, so finite differences agree (max pooling has kinks).
    cfg.model = dataclasses.replace(cfg.model, weights="random", pooling="avg",
                                    content_layers=["block2_conv2", "block3_conv1"],
                                    content_layer_weights=[1.0, 3.0],
                                    style_layers=["block1_conv1", "block3_conv1"],
                                    style_layer_weights=[2.0, 2.0])
    cfg.loss = config.LossConfig(**loss)
    return cfg


@pytest.fixture(scope="module")
def net():
    cfg = _cfg()
    return model.feature_extractor(cfg.model, seed=0)


def test_objective_assembles_the_pinned_formula(net):
    """Terms recomputed in numpy from the network's features, with the weights normalised
    by hand (content 1:3 -> 0.25/0.75; style 2:2 -> 0.5/0.5; blend 1:3 -> 0.25/0.75)."""
    extractor, names, _ = net
    rng = np.random.default_rng(1)
    content = rng.uniform(0, 255, (16, 24, 3)).astype("float32")
    styles = [rng.uniform(0, 255, (16, 16, 3)).astype("float32") for _ in range(2)]
    x = rng.uniform(0, 255, (16, 24, 3)).astype("float32")
    cfg = _cfg(content_weight=2.0, style_weight=0.5, tv_weight=0.1)
    cfg.style = ["a.png", "b.png"]
    cfg.style_blend = [1.0, 3.0]
    objective = Objective(extractor, names, cfg, content, styles)
    total, terms = objective(ops.convert_to_tensor(x))

    def feats(img):
        out = extractor(model.preprocess(ops.convert_to_tensor(img[None])))
        return {n: ops.convert_to_numpy(f)[0].astype(np.float64) for n, f in zip(names, out)}

    def np_gram(f):
        flat = f.reshape(-1, f.shape[-1])
        return flat.T @ flat / flat.shape[0]

    fx, fc = feats(x), feats(content)
    fs = [feats(s) for s in styles]
    c = 0.25 * np.mean((fx["block2_conv2"] - fc["block2_conv2"]) ** 2) + 0.75 * np.mean(
        (fx["block3_conv1"] - fc["block3_conv1"]) ** 2)
    s = sum(0.5 * np.mean((np_gram(fx[n]) - 0.25 * np_gram(fs[0][n]) - 0.75 * np_gram(fs[1][n]))
                          ** 2) for n in ("block1_conv1", "block3_conv1"))
    xd = x.astype(np.float64)
    tv = np.mean((xd[1:] - xd[:-1]) ** 2) + np.mean((xd[:, 1:] - xd[:, :-1]) ** 2)
    assert float(terms["content"]) == pytest.approx(c, rel=1e-4)
    assert float(terms["style"]) == pytest.approx(s, rel=1e-4)
    assert float(terms["tv"]) == pytest.approx(tv, rel=1e-5)
    assert float(total) == pytest.approx(2.0 * c + 0.5 * s + 0.1 * tv, rel=1e-4)


def test_targets_are_batched_yet_equal_to_single_passes(net):
    """Content and a style of the same shape share one VGG pass; the results must equal
    separate passes (catches mixing up which image's features went where)."""
    extractor, names, _ = net
    rng = np.random.default_rng(2)
    content = rng.uniform(0, 255, (16, 16, 3)).astype("float32")
    style = rng.uniform(0, 255, (16, 16, 3)).astype("float32")
    objective = Objective(extractor, names, _cfg(), content, [style])
    single = extractor(model.preprocess(ops.convert_to_tensor(style[None])))
    expected = gram(single[names.index("block1_conv1")])
    np.testing.assert_allclose(ops.convert_to_numpy(objective.style_targets["block1_conv1"]),
                               ops.convert_to_numpy(expected), rtol=1e-5)
    # The content image's own loss is zero at x = content.
    _, terms = objective(ops.convert_to_tensor(content))
    assert float(terms["content"]) == pytest.approx(0.0, abs=1e-6)


def test_gradient_matches_finite_differences(net):
    """Directional derivatives along random directions, by central differences."""
    extractor, names, _ = net
    rng = np.random.default_rng(3)
    content = rng.uniform(0, 255, (16, 16, 3)).astype("float32")
    style = rng.uniform(0, 255, (16, 16, 3)).astype("float32")
    objective = Objective(extractor, names, _cfg(content_weight=1.0, style_weight=1e-3,
                                                 tv_weight=1.0), content, [style])
    vg = autodiff.value_and_grad(objective, extractor.variables)
    x = rng.uniform(50, 200, (16, 16, 3)).astype("float32")
    total, _, grad = vg(x)
    assert np.isfinite(total) and grad.shape == x.shape
    for _ in range(3):
        d = rng.normal(size=x.shape).astype("float32")
        d /= np.linalg.norm(d)
        h = 0.5
        numeric = (vg(x + h * d)[0] - vg(x - h * d)[0]) / (2 * h)
        analytic = float(np.sum(grad.astype(np.float64) * d))
        assert numeric == pytest.approx(analytic, rel=2e-2)


def test_random_weights_are_seeded():
    a, b, c = model.vgg19("avg"), model.vgg19("avg"), model.vgg19("avg")
    model.load_weights(a, "random", seed=5)
    model.load_weights(b, "random", seed=5)
    model.load_weights(c, "random", seed=6)
    wa, wb, wc = (m.get_layer("block3_conv2").get_weights()[0] for m in (a, b, c))
    np.testing.assert_array_equal(wa, wb)
    assert not np.allclose(wa, wc)
