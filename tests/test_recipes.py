"""The defaults and configs/recipes/ against the formulas of the code they come from, written
again here in numpy as that code writes them (neural_style.lua, the keras.io example, the
TensorFlow tutorial, the fast.ai notebook), on real VGG feature maps (random weights).

Each test loads a recipe as a user would (`base:` plus their own content and style) and
checks that this tool's Objective, under the recipe's converted weights, gives the same
content, style and TV terms and the same total as the original formulas.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, write_image
from keras import ops

from pipeline import autodiff, batch, config, images, model
from pipeline.losses import Objective, temporal_loss, total_variation

RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
PAPER_STYLE = [f"block{b}_conv1" for b in range(1, 6)]
MEAN_BGR = np.array(model.IMAGENET_MEAN_BGR)


def recipe(tmp_path, name, **extra):
    """A user's config: the recipe as its base, plus content and style (and `extra`); the
    content is a clip of two frames for a recipe with a `video:` section."""
    write_image(tmp_path / "content.png", (40, 48), seed=1)
    write_image(tmp_path / "style.png", (32, 32), seed=2)
    base = ROOT / "configs" / "recipes" / f"{name}.yaml"
    content = "content.png"
    if "video" in yaml.safe_load(base.read_text()):
        (tmp_path / "clip").mkdir(exist_ok=True)
        for n in (1, 2):
            write_image(tmp_path / "clip" / f"{n}.png", (40, 48), seed=n)
        content = "clip/*.png"
    data = {"base": str(base), "content": content, "style": "style.png", **extra}
    path = tmp_path / f"{name}-user.yaml"
    path.write_text(yaml.safe_dump(data))
    return config.load(path)


@pytest.fixture(scope="module")
def vgg19_max():
    cfg = config.ModelConfig(weights="random", pooling="max",
                             content_layers=["block4_conv2", "block5_conv2"],
                             style_layers=PAPER_STYLE)
    extractor, names, _ = model.feature_extractor(cfg, seed=4)
    return extractor, names


@pytest.fixture(scope="module")
def images32():
    rng = np.random.default_rng(7)
    return [rng.uniform(0, 255, (32, 32, 3)).astype("float32") for _ in range(3)]  # x, c, s


def features(extractor, names, img):
    """Feature maps (H, W, C) by layer name, float64 numpy."""
    maps = extractor(model.preprocess(ops.convert_to_tensor(img[None])))
    return {n: ops.convert_to_numpy(f)[0].astype(np.float64) for n, f in zip(names, maps)}


def terms(cfg, extractor, names, x, content, style):
    cfg = dataclasses.replace(cfg, style_blend=None)
    total, parts = Objective(extractor, names, cfg, content, [style])(ops.convert_to_tensor(x))
    return float(total), {k: float(v) for k, v in parts.items()}


# --------------------------------------------------------------------------- neural-style
# neural_style.lua, line by line. Torch holds a feature map as (C, H, W).


def ns_content(fx, fc, strength):
    """ContentLoss: strength * nn.MSECriterion (a mean over all C*H*W entries)."""
    return strength * np.mean((fx - fc) ** 2)


def ns_gram(f):
    """GramMatrix of the (C, H*W) view, then StyleLoss's G:div(input:nElement())."""
    flat = f.reshape(-1, f.shape[-1]).T  # (C, H*W)
    return flat @ flat.T / f.size


def ns_style(fx, fs, strength):
    return strength * np.mean((ns_gram(fx) - ns_gram(fs)) ** 2)


def ns_preprocess(x):
    """preprocess(): [0, 1] RGB (here x / 255) to BGR, times 256, minus the mean; (C, H, W)."""
    return ((x / 255.0)[..., ::-1] * 256.0 - MEAN_BGR).transpose(2, 0, 1)


def ns_tv_grad(img, strength):
    """TVLoss:updateGradInput: its TV exists only as this gradient, on the Caffe image."""
    x_diff = img[:, :-1, :-1] - img[:, :-1, 1:]
    y_diff = img[:, :-1, :-1] - img[:, 1:, :-1]
    grad = np.zeros_like(img)
    grad[:, :-1, :-1] += x_diff + y_diff
    grad[:, :-1, 1:] -= x_diff
    grad[:, 1:, :-1] -= y_diff
    return strength * grad


def ns_tv_value(img, strength):
    """The loss whose gradient ns_tv_grad is (checked below): half the sum of squares."""
    x_diff = img[:, :-1, :-1] - img[:, :-1, 1:]
    y_diff = img[:, :-1, :-1] - img[:, 1:, :-1]
    return strength / 2 * np.sum(x_diff ** 2 + y_diff ** 2)


def edge_constant(rng, side):
    """A square image whose last row and column are one flat colour: there neural-style's TV
    (first H-1 rows, W-1 columns) and ours (every neighbour pair) see the same differences."""
    x = rng.uniform(0, 255, (side, side, 3))
    x[-1, :, :] = x[:, -1, :] = 100.0
    return x


def test_ns_tv_value_is_the_loss_of_its_gradient():
    """Finite differences of ns_tv_value equal neural-style's hand-written gradient."""
    rng = np.random.default_rng(0)
    img = rng.normal(size=(3, 5, 6))
    grad = ns_tv_grad(img, 1e-3)
    for _ in range(5):
        d = rng.normal(size=img.shape)
        numeric = (ns_tv_value(img + 1e-4 * d, 1e-3) - ns_tv_value(img - 1e-4 * d, 1e-3)) / 2e-4
        assert numeric == pytest.approx(np.sum(grad * d), rel=1e-6)


def test_default_tv_weight_is_neural_styles_tv_at_512_square():
    """At 512 x 512 the default tv_weight times our TV is neural-style's TV: values and
    gradients (with respect to our 0..255 pixels; its pixels are 0..256 and BGR)."""
    x = edge_constant(np.random.default_rng(1), 512)
    tw = config.LossConfig().tv_weight
    img = ns_preprocess(x)
    ours = autodiff.value_and_grad(lambda v: (tw * total_variation(v), {}), [])
    value, _, grad = ours(x.astype("float32"))
    assert value == pytest.approx(ns_tv_value(img, 1e-3), rel=1e-5)
    # Chain rule: d img / d x = 256/255, channels reversed, (C, H, W) back to (H, W, C).
    theirs = ns_tv_grad(img, 1e-3).transpose(1, 2, 0)[..., ::-1] * 256 / 255
    np.testing.assert_allclose(grad, theirs, rtol=1e-3, atol=1e-6 * np.abs(theirs).max())


def test_defaults_are_neural_style_converted(vgg19_max, images32):
    """Content, style and total at 32 px: neural-style's formulas (content 5, style 100 per
    layer, TV 1e-3) against the default objective (default layers, weights and rule)."""
    extractor, names = vgg19_max
    _, content, style = images32
    x = edge_constant(np.random.default_rng(2), 32).astype("float32")
    cfg = config.Config(content="c.png", style=["s.png"])
    cfg.model = dataclasses.replace(cfg.model, weights="random")
    # The TV conversion at this test's size (the default holds it at 512; test above).
    cfg.loss = dataclasses.replace(cfg.loss, tv_weight=1e-3 / 2 * (256 / 255) ** 2 * 3 * 32 * 31)
    total, parts = terms(cfg, extractor, names, x, content, style)
    fx, fc, fs = (features(extractor, names, i) for i in (x, content, style))
    content_ns = ns_content(fx["block4_conv2"], fc["block4_conv2"], 5)
    style_ns = sum(ns_style(fx[n], fs[n], 100) for n in PAPER_STYLE)
    tv_ns = ns_tv_value(ns_preprocess(x.astype(np.float64)), 1e-3)
    assert cfg.loss.content_weight * parts["content"] == pytest.approx(content_ns, rel=1e-4)
    assert cfg.loss.style_weight * parts["style"] == pytest.approx(style_ns, rel=1e-4)
    assert cfg.loss.tv_weight * parts["tv"] == pytest.approx(tv_ns, rel=1e-5)
    assert total == pytest.approx(content_ns + style_ns + tv_ns, rel=1e-4)


def test_neural_style_recipe_equals_the_defaults(tmp_path):
    """The recipe spells the defaults out (so that it stays put if they ever change)."""
    cfg = recipe(tmp_path, "neural-style")
    defaults = config.Config()
    assert cfg.model.pooling == defaults.model.pooling == "max"
    assert cfg.model.style_layers == defaults.model.style_layers
    assert cfg.model.content_layers == defaults.model.content_layers
    ours = np.array(config.style_weights(cfg.model))
    rule = np.array(config.style_weights(defaults.model))
    np.testing.assert_allclose(ours / ours.sum(), rule / rule.sum(), rtol=1e-12)
    for key in ("content_weight", "style_weight", "tv_weight"):
        assert getattr(cfg.loss, key) == pytest.approx(getattr(defaults.loss, key), rel=1e-5)


# --------------------------------------------------------------------------- keras.io


def kio_gram(f):
    flat = f.reshape(-1, f.shape[-1]).T  # its transpose to (C, H, W), then reshape (C, -1)
    return flat @ flat.T


def test_keras_io_recipe(tmp_path, vgg19_max, images32):
    """examples/generative/neural_style_transfer.py's compute_loss, TV aside, at 32 x 32."""
    extractor, names = vgg19_max
    x, content, style = images32
    cfg = recipe(tmp_path, "keras-io")
    rows = cols = 32

    def content_weight_at(h, w):  # its sum over block5_conv2's (h/16)(w/16)512 entries
        return 2.5e-8 * (h // 16) * (w // 16) * 512

    assert cfg.loss.content_weight == pytest.approx(content_weight_at(400, 400))
    cfg.loss = dataclasses.replace(cfg.loss, content_weight=content_weight_at(rows, cols),
                                   tv_weight=0.0)
    total, parts = terms(cfg, extractor, names, x, content, style)
    fx, fc, fs = (features(extractor, names, i) for i in (x, content, style))
    content_kio = 2.5e-8 * np.sum((fx["block5_conv2"] - fc["block5_conv2"]) ** 2)
    style_kio = sum(1e-6 / 5 * np.sum((kio_gram(fs[n]) - kio_gram(fx[n])) ** 2)
                    / (4.0 * 3 ** 2 * (rows * cols) ** 2) for n in PAPER_STYLE)
    assert cfg.loss.content_weight * parts["content"] == pytest.approx(content_kio, rel=1e-4)
    assert cfg.loss.style_weight * parts["style"] == pytest.approx(style_kio, rel=1e-4)
    assert total == pytest.approx(content_kio + style_kio, rel=1e-4)


# --------------------------------------------------------------------------- TF tutorial


def test_tf_tutorial_recipe(tmp_path, vgg19_max, images32):
    """style_content_loss: means, Grams over locations, weights / number of layers; its
    pixels are 0..1 and VGG sees them times 255, which are our pixels."""
    extractor, names = vgg19_max
    x, content, style = images32
    cfg = recipe(tmp_path, "tf-tutorial")
    cfg.loss = dataclasses.replace(cfg.loss, tv_weight=0.0)
    total, parts = terms(cfg, extractor, names, x, content, style)
    u = [i / 255.0 for i in (x, content, style)]  # its images
    fx, fc, fs = (features(extractor, names, i * 255.0) for i in u)

    def gram(f):
        return np.einsum("ijc,ijd->cd", f, f) / (f.shape[0] * f.shape[1])

    style_tf = sum(np.mean((gram(fx[n]) - gram(fs[n])) ** 2) for n in PAPER_STYLE) * 1e-2 / 5
    content_tf = np.mean((fx["block5_conv2"] - fc["block5_conv2"]) ** 2) * 1e4 / 1
    assert cfg.loss.content_weight * parts["content"] == pytest.approx(content_tf, rel=1e-4)
    assert cfg.loss.style_weight * parts["style"] == pytest.approx(style_tf, rel=1e-4)
    assert total == pytest.approx(content_tf + style_tf, rel=1e-4)
    assert (cfg.optimizer.method, cfg.optimizer.iterations) == ("adam", 1000)


def test_tv_fits_of_keras_io_and_tf_tutorial(tmp_path):
    """Their TV terms are not quadratic; each recipe's tv_weight is the least-squares fit of
    our TV's gradient to theirs over the neighbour differences of the demo's photo."""
    photo = images.load_image(config.expand_path("pkg:skimage/data/astronaut.png", ROOT))
    x = images.resize_long_side(photo, 400).astype(np.float64)
    dy, dx = x[1:, :-1] - x[:-1, :-1], x[:-1, 1:] - x[:-1, :-1]
    g2 = dy ** 2 + dx ** 2  # keras.io: 1e-6 (dy^2 + dx^2)^1.25, gradient 2.5e-6 g^1.5 (unit)
    a = 1.25e-6 * np.sum(g2 ** 1.25) / np.sum(g2)  # fit of 2 a g
    assert recipe(tmp_path, "keras-io").loss.tv_weight == pytest.approx(3 * 400 * 399 * a,
                                                                        rel=1e-2)
    x = images.resize_long_side(photo, 512).astype(np.float64)
    d = np.concatenate([(x[1:] - x[:-1]).ravel(), (x[:, 1:] - x[:, :-1]).ravel()])
    a = 30 / 255 * np.sum(np.abs(d)) / (2 * np.sum(d ** 2))  # TF: 30 |d| / 255, fit of 2 a d
    assert recipe(tmp_path, "tf-tutorial").loss.tv_weight == pytest.approx(3 * 512 * 511 * a,
                                                                           rel=1e-2)


# --------------------------------------------------------------------------- fast.ai


def test_fastai_vgg16_recipe(tmp_path, images32):
    """The lesson's loss: sum of w_l * mse(gram(x), gram(style)), Gram / num_elements, plus
    mse(content) / 10, on VGG16 with average pooling."""
    cfg = recipe(tmp_path, "fastai-vgg16")
    cfg.model = dataclasses.replace(cfg.model, weights="random")
    extractor, names, _ = model.feature_extractor(cfg.model, seed=5)
    x, content, style = images32
    total, parts = terms(cfg, extractor, names, x, content, style)
    fx, fc, fs = (features(extractor, names, i) for i in (x, content, style))

    def gram(f):
        flat = f.reshape(-1, f.shape[-1]).T
        return flat @ flat.T / f.size

    layers = [f"block{b}_conv2" for b in range(1, 6)]
    style_fa = sum(w * np.mean((gram(fx[n]) - gram(fs[n])) ** 2)
                   for n, w in zip(layers, [0.05, 0.2, 0.2, 0.25, 0.3]))
    content_fa = np.mean((fx["block4_conv2"] - fc["block4_conv2"]) ** 2) / 10
    assert cfg.loss.content_weight * parts["content"] == pytest.approx(content_fa, rel=1e-4)
    assert cfg.loss.style_weight * parts["style"] == pytest.approx(style_fa, rel=1e-4)
    assert total == pytest.approx(content_fa + style_fa, rel=1e-4)


# --------------------------------------------------------------------------- all recipes


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_validates_and_runs(tmp_path, path):
    """`base: <recipe>` plus content and style is a whole config; it runs (32 px, random
    weights, 2 iterations) to a completed run folder."""
    cfg = recipe(tmp_path, path.stem, size=32, output_dir="out", checkpoint_every=0,
                 model={"weights": "random"}, optimizer={"iterations": 2})
    if cfg.video:
        cfg.video.first_iterations = 2
    (job,) = batch.plan(cfg)
    outcome = batch.run_one(job)
    assert outcome.status == "completed", outcome.message
    results = outcome.folder.saved_frames() if cfg.video else [outcome.folder.result]
    assert [images.load_image(p).shape for p in results] == [(27, 32, 3)] * len(results)
    assert len(results) == (2 if cfg.video else 1)
    assert Path(outcome.folder.config).is_file()


def test_recipes_are_found():
    assert {p.stem for p in RECIPES} >= {"neural-style", "keras-io", "tf-tutorial",
                                         "fastai-vgg16", "artistic-videos"}


# --------------------------------------------------------------------------- artistic-videos


def test_artistic_videos_recipe(tmp_path):
    """artistic_video.lua: neural-style's image terms (content 5, style 100, TV 1e-3, here at a
    450 px square frame), and its temporal term, WeightedContentLoss(1e3) on the preprocessed
    pixels, against ours times the recipe's temporal_weight; lbfgs with 100 corrections,
    2000 iterations for the first frame and 1000 for the others."""
    cfg = recipe(tmp_path, "artistic-videos")
    ns = recipe(tmp_path, "neural-style")
    assert (cfg.model, cfg.loss.content_weight, cfg.loss.style_weight) == (
        ns.model, ns.loss.content_weight, ns.loss.style_weight)
    assert cfg.loss.tv_weight == pytest.approx(1e-3 / 2 * (256 / 255) ** 2 * 3 * 450 * 449,
                                               rel=1e-5)
    rng = np.random.default_rng(3)
    x, w = rng.uniform(0, 255, (2, 6, 5, 3))
    c = rng.uniform(size=(6, 5))
    root = np.sqrt(c)[None]  # WeightedContentLoss: sqrt(c) times input and target, then MSE
    his = 1e3 * np.mean((ns_preprocess(x) * root - ns_preprocess(w) * root) ** 2)
    ours = float(temporal_loss(x.astype("float32"), w.astype("float32"), c.astype("float32")))
    assert cfg.video.temporal_weight * ours == pytest.approx(his, rel=1e-5)
    assert (cfg.optimizer.method, config.history(cfg.optimizer), cfg.optimizer.iterations,
            cfg.video.first_iterations, cfg.video.init, cfg.video.long_term) == (
        "lbfgs", 100, 1000, 2000, "prev_warped", [1])
