"""preserve_colors (Gatys et al. 2016): the colour statistics each mode promises, checked on
synthetic images with numpy's own mean, std and covariance, and once through a real run."""

import dataclasses

import numpy as np
import pytest
from keras import ops

from pipeline import color, config, images, model, stylize
from pipeline.losses import Objective


def smooth(rng, shape, mean, mix):
    """A smooth synthetic picture: correlated colour channels around `mean`, kept well inside
    0..255 so that nothing is clipped and the statistics can be compared exactly."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(5 * xx + 1), np.cos(3 * yy), np.sin(4 * (xx + yy))], axis=-1)
    noise = rng.normal(0, 0.3, (h, w, 3))
    return np.asarray(mean) + (base + noise) @ np.asarray(mix).T


def stats(img):
    """Mean and covariance of an image's colours, as a distribution (divided by N, not N-1:
    images of different pixel counts compare only so)."""
    flat = np.asarray(img, np.float64).reshape(-1, 3)
    return flat.mean(axis=0), np.cov(flat, rowvar=False, bias=True)


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    content = smooth(rng, (40, 48), [120, 110, 90], [[20, 5, 0], [8, 18, 3], [0, 6, 15]])
    style = smooth(rng, (32, 36), [90, 140, 170], [[12, -4, 6], [0, 25, 2], [5, 5, 9]])
    assert content.min() > 0 and content.max() < 255 and style.min() > 0 and style.max() < 255
    return content, style


def test_yiq_is_the_ntsc_transform():
    """White has no chroma; pure red, green, blue give the NTSC matrix's columns * 255; the
    inverse is exact, and a change of Y alone is a change of grey."""
    np.testing.assert_allclose(color.rgb_to_yiq(np.array([255.0, 255, 255])), [255, 0, 0],
                               atol=1e-9)
    np.testing.assert_allclose(color.rgb_to_yiq(np.array([255.0, 0, 0])),
                               [0.299 * 255, 0.596 * 255, 0.211 * 255])
    np.testing.assert_allclose(color.rgb_to_yiq(np.array([0.0, 0, 255])),
                               [0.114 * 255, -0.322 * 255, 0.312 * 255])
    x = np.random.default_rng(1).uniform(0, 255, (4, 5, 3))
    np.testing.assert_allclose(color.yiq_to_rgb(color.rgb_to_yiq(x)), x, atol=1e-9)
    np.testing.assert_allclose(color.yiq_to_rgb(np.array([10.0, 0, 0])), [10, 10, 10])


def test_histogram_matching_gives_the_contents_mean_and_covariance(pair):
    content, style = pair
    matched = color.match_colors(style, content)
    assert matched.shape == style.shape
    mean_m, cov_m = stats(matched)
    mean_c, cov_c = stats(content)
    np.testing.assert_allclose(mean_m, mean_c, atol=1e-3)
    np.testing.assert_allclose(cov_m, cov_c, atol=1e-3)
    # The statistics differed before, and a picture already matched is left alone.
    assert np.abs(stats(style)[0] - mean_c).max() > 10
    np.testing.assert_allclose(color.match_colors(content, content), content, atol=1e-6)


def test_histogram_matching_uses_the_symmetric_square_roots(pair):
    """A = Sigma_c^1/2 Sigma_s^-1/2 (Image Analogies), not Cholesky: for a style whose
    covariance is a multiple of the identity, A is then itself symmetric."""
    content, _ = pair
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 1, (64 * 64, 3))
    noise -= noise.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(noise, rowvar=False, bias=True))
    white = noise @ vectors / np.sqrt(values) @ vectors.T  # covariance exactly the identity
    style = (128 + 10 * white).reshape(64, 64, 3)
    matched = color.match_colors(style, content)
    src = style.reshape(-1, 3) - style.reshape(-1, 3).mean(axis=0)
    a, *_ = np.linalg.lstsq(src, matched.reshape(-1, 3) - matched.reshape(-1, 3).mean(0),
                            rcond=None)
    np.testing.assert_allclose(a, a.T, atol=1e-6)  # lstsq gives A^T; symmetric either way


def test_luminance_inputs_match_mean_and_std(pair):
    content, style = pair
    grey_content, (grey_style,) = color.luminance_inputs(content, [style])
    y_content = content @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(grey_content, np.repeat(y_content[..., None], 3, -1), atol=1e-9)
    y_style = grey_style[..., 0]
    np.testing.assert_allclose(grey_style, np.repeat(y_style[..., None], 3, -1))
    assert y_style.mean() == pytest.approx(y_content.mean(), abs=1e-6)
    assert y_style.std() == pytest.approx(y_content.std(), rel=1e-6)
    # The texture is the style's: a positive affine map of its own luminance.
    y_orig = style @ np.array([0.299, 0.587, 0.114])
    assert np.corrcoef(y_style.ravel(), y_orig.ravel())[0, 1] == pytest.approx(1.0)


def test_restore_colors_keeps_the_contents_i_and_q(pair):
    content, _ = pair
    result = np.random.default_rng(4).uniform(60, 200, content.shape)
    out = color.restore_colors(result, content)
    yiq_out, yiq_c, yiq_r = (color.rgb_to_yiq(i) for i in (out, content, result))
    np.testing.assert_allclose(yiq_out[..., 1:], yiq_c[..., 1:], atol=1e-9)
    np.testing.assert_allclose(yiq_out[..., 0], yiq_r[..., 0], atol=1e-9)


def test_color_inputs_per_mode(pair):
    content, style = pair
    cfg = config.Config(content="c.png", style=["s.png"])
    same = stylize.color_inputs(cfg, content, [style])
    assert same[0] is content and same[1][0] is style
    cfg = dataclasses.replace(cfg, preserve_colors="histogram")
    c, (s,) = stylize.color_inputs(cfg, content, [style])
    assert c is content
    np.testing.assert_allclose(stats(s)[1], stats(content)[1], rtol=1e-4, atol=1e-2)
    cfg = dataclasses.replace(cfg, preserve_colors="luminance")
    c, (s,) = stylize.color_inputs(cfg, content, [style])
    assert np.ptp(c, axis=-1).max() < 1e-3 and np.ptp(s, axis=-1).max() < 1e-3  # grey


@pytest.mark.parametrize("scales", [[], [24, 32]], ids=["one-size", "coarse-to-fine"])
def test_a_luminance_run_has_the_contents_colours(pair, scales):
    """Through stylize (random weights, 32 px): the result's I and Q are the content's, its
    luminance is the optimiser's, not the content's; with stages, the last stage's content."""
    content, style = pair
    cfg = config.Config(content="c.png", style=["s.png"], size=32, preserve_colors="luminance",
                        scales=scales)
    cfg.model = dataclasses.replace(cfg.model, weights="random")
    cfg.optimizer = dataclasses.replace(cfg.optimizer, iterations=5)
    result, _ = stylize.stylize(cfg, content.astype("float32"), [style.astype("float32")])
    prepared, _ = stylize.prepare(cfg, content.astype("float32"), [])
    inside = np.all((result.image > 0.5) & (result.image < 254.5), axis=-1)
    assert inside.mean() > 0.5
    yiq_r, yiq_c = color.rgb_to_yiq(result.image), color.rgb_to_yiq(prepared)
    np.testing.assert_allclose(yiq_r[inside][:, 1:], yiq_c[inside][:, 1:], atol=1e-2)
    assert np.abs(yiq_r[..., 0] - yiq_c[..., 0]).max() > 1.0


def test_noise_init_is_seeded_and_luminance_takes_its_luminance(pair):
    content, _ = pair
    cfg = config.Config(content="c.png", style=["s.png"], init="noise", seed=3)
    first, again = (stylize.initial_image(cfg, content, []) for _ in range(2))
    other = stylize.initial_image(dataclasses.replace(cfg, seed=4), content, [])
    assert first.shape == content.shape and 0 <= first.min() and first.max() <= 255
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 50  # two seeds, two unrelated images
    grey = stylize.iterate(dataclasses.replace(cfg, preserve_colors="luminance"), first)
    np.testing.assert_allclose(grey[..., 0], first @ np.array([0.299, 0.587, 0.114]), atol=1e-3)
    assert grey.shape == (*content.shape[:2], 1)


@pytest.mark.parametrize("method", ["scipy", "lbfgs", "adam"])
def test_luminance_optimises_the_grey_image_it_keeps(pair, method):
    """The paper's luminance-only transfer: the optimiser varies luminance alone, so every
    iterate is grey, the start is the init image's luminance (a colour init image too), and
    the loss recorded for the result is the loss of the result's own luminance, computed
    here from the parts: grey targets, the same random network, the pixels seen as grey."""
    content, style = (img.astype("float32") for img in pair)
    cfg = config.Config(content="c.png", style=["s.png"], size=32, init="init.png",
                        preserve_colors="luminance", checkpoint_every=1)
    cfg.model = dataclasses.replace(cfg.model, weights="random",
                                    content_layers=["block2_conv2"],
                                    style_layers=["block1_conv1", "block2_conv1"])
    cfg.optimizer = dataclasses.replace(cfg.optimizer, iterations=6, method=method)
    init = style[::-1].copy()  # a colour image, flipped so that it is not the style
    steps = []
    result, _ = stylize.stylize(cfg, content, [style], init, on_step=steps.append)

    content_s, (style_s,) = stylize.prepare(cfg, content, [style])
    grey_content, (grey_style,) = color.luminance_inputs(content_s, [style_s])
    extractor, names, _ = model.feature_extractor(cfg.model, cfg.seed)
    objective = Objective(extractor, names, cfg, np.clip(grey_content, 0, 255).astype("float32"),
                          [np.clip(grey_style, 0, 255).astype("float32")])

    def loss_of_luminance(rgb):
        y = np.asarray(rgb, np.float64) @ np.array([0.299, 0.587, 0.114])
        grey = np.repeat(y[..., None], 3, axis=-1).astype("float32")
        return float(objective(ops.convert_to_tensor(grey))[0])

    assert len(steps) == 6 and all(s.image is not None for s in steps)
    assert max(np.ptp(s.image, axis=-1).max() for s in steps) == 0  # R = G = B exactly
    start = images.resize_to(init, content_s.shape[:2])
    assert result.initial["total"] == pytest.approx(loss_of_luminance(start), rel=1e-4)
    assert result.final["total"] == pytest.approx(loss_of_luminance(result.image), rel=1e-3)
    assert result.final["total"] < 0.9 * result.initial["total"]
