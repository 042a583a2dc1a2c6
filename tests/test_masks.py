"""Masks: the masked Gram matrix, the masked content term and the pooled masks against
loops and numpy written independently, the objective with two masked styles recomputed in
numpy from the network's features, config checks, and a tiny end-to-end run."""

import dataclasses
import json

import numpy as np
import pytest
import yaml
from conftest import write_config, write_image
from keras import ops
from PIL import Image

from pipeline import batch, config, model
from pipeline.losses import Objective, downsample_mask, masked_content_loss, masked_gram


def test_downsample_mask_averages_2x2_cells_and_drops_odd_edges():
    m = np.arange(20, dtype=np.float32).reshape(4, 5)  # the last column is dropped
    expected = [[(0 + 1 + 5 + 6) / 4, (2 + 3 + 7 + 8) / 4],
                [(10 + 11 + 15 + 16) / 4, (12 + 13 + 17 + 18) / 4]]
    np.testing.assert_allclose(downsample_mask(m, (2, 2)), expected)
    np.testing.assert_array_equal(downsample_mask(m, (4, 5)), m)
    assert downsample_mask(m, (1, 1))[0, 0] == pytest.approx((3 + 5 + 13 + 15) / 4)
    with pytest.raises(ValueError):
        downsample_mask(m, (3, 3))


def test_masked_gram_is_the_region_mean_of_outer_products():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(1, 3, 4, 2)).astype(np.float32)
    m = rng.uniform(0, 1, (3, 4)).astype(np.float32)
    expected = np.zeros((2, 2))
    for c in range(2):
        for d in range(2):
            expected[c, d] = sum(m[i, j] ** 2 * f[0, i, j, c] * f[0, i, j, d]
                                 for i in range(3) for j in range(4)) / (m ** 2).sum()
    np.testing.assert_allclose(ops.convert_to_numpy(masked_gram(f, m))[0], expected, rtol=1e-5)
    # A 0/1 mask: the plain Gram of the selected positions alone.
    binary = np.zeros((3, 4), np.float32)
    binary[:, :2] = 1
    sel = f[0, :, :2].reshape(-1, 2).astype(np.float64)
    np.testing.assert_allclose(ops.convert_to_numpy(masked_gram(f, binary))[0],
                               sel.T @ sel / 6, rtol=1e-5)


def test_masked_content_loss_is_a_weighted_mean():
    rng = np.random.default_rng(1)
    f, p = rng.normal(size=(2, 1, 3, 4, 2)).astype(np.float32)
    m = rng.uniform(0, 1, (3, 4)).astype(np.float32)
    expected = sum(m[i, j] * (f[0, i, j, c] - p[0, i, j, c]) ** 2
                   for i in range(3) for j in range(4) for c in range(2)) / (m.sum() * 2)
    assert float(masked_content_loss(f, p, m)) == pytest.approx(expected, rel=1e-5)
    assert float(masked_content_loss(f, p, np.ones((3, 4), np.float32))) == pytest.approx(
        float(np.mean((f - p) ** 2)), rel=1e-5)


@pytest.fixture(scope="module")
def net():
    cfg = config.Config(content="c.png", style=["s.png"])
    cfg.model = dataclasses.replace(cfg.model, weights="random",
                                    content_layers=["block2_conv1"],
                                    style_layers=["block1_conv1", "block3_conv1"],
                                    style_layer_weights=[1.0, 3.0])
    return cfg, *model.feature_extractor(cfg.model, seed=0)[:2]


def test_objective_with_masked_styles_against_numpy(net):
    """Two styles on complementary soft masks, a content mask: each term recomputed in numpy
    (masks pooled by block means, a different formula from the code's repeated halving)."""
    cfg, extractor, names = net
    cfg = dataclasses.replace(cfg, style=["a.png", "b.png"], style_blend=[1.0, 3.0])
    rng = np.random.default_rng(2)
    h, w = 20, 26
    content, x = (rng.uniform(0, 255, (h, w, 3)).astype("float32") for _ in range(2))
    styles = [rng.uniform(0, 255, (16, 18, 3)).astype("float32") for _ in range(2)]
    left = np.clip(np.linspace(1.2, -0.2, w), 0, 1)[None, :].repeat(h, 0).astype("float32")
    cmask = rng.uniform(0, 1, (h, w)).astype("float32")
    objective = Objective(extractor, names, cfg, content, styles, [left, 1 - left], cmask)
    _, terms = objective(ops.convert_to_tensor(x))

    def feats(img):
        out = extractor(model.preprocess(ops.convert_to_tensor(img[None])))
        return {n: ops.convert_to_numpy(f)[0].astype(np.float64) for n, f in zip(names, out)}

    def pool(m, shape):
        f = m.shape[0] // shape[0]
        return m[: shape[0] * f, : shape[1] * f].reshape(shape[0], f, shape[1], f).mean((1, 3))

    def np_gram(f, m=None):
        m = np.ones(f.shape[:2]) if m is None else m
        flat = (f * m[:, :, None]).reshape(-1, f.shape[-1])
        return flat.T @ flat / (m ** 2).sum()

    fx, fc = feats(x), feats(content)
    fs = [feats(s) for s in styles]
    style = 0.0
    for layer, lw in (("block1_conv1", 0.25), ("block3_conv1", 0.75)):
        shape = fx[layer].shape[:2]
        for blend, mask, f in ((0.25, left, fs[0]), (0.75, 1 - left, fs[1])):
            masked = np_gram(fx[layer], pool(mask, shape))
            style += lw * blend * np.mean((masked - np_gram(f[layer])) ** 2)
    cm = pool(cmask, fx["block2_conv1"].shape[:2])
    diff = (fx["block2_conv1"] - fc["block2_conv1"]) ** 2
    content_term = (diff * cm[:, :, None]).sum() / (cm.sum() * diff.shape[-1])
    assert float(terms["style"]) == pytest.approx(style, rel=1e-4)
    assert float(terms["content"]) == pytest.approx(content_term, rel=1e-4)
    # A null mask is the whole image: the plain Gram, not blended with the others.
    objective = Objective(extractor, names, cfg, content, styles, [None, 1 - left])
    _, terms = objective(ops.convert_to_tensor(x))
    everywhere = sum(lw * (0.25 * np.mean((np_gram(fx[n]) - np_gram(fs[0][n])) ** 2)
                           + 0.75 * np.mean((np_gram(fx[n], pool(1 - left, fx[n].shape[:2]))
                                             - np_gram(fs[1][n])) ** 2))
                     for n, lw in (("block1_conv1", 0.25), ("block3_conv1", 0.75)))
    assert float(terms["style"]) == pytest.approx(everywhere, rel=1e-4)


def _halves(folder, w=48, h=40):
    """A white left half and its complement, as mask files of another size than the content."""
    left = np.zeros((h // 2, w // 2), np.uint8)
    left[:, : w // 4] = 255
    Image.fromarray(left).save(folder / "left.png")
    Image.fromarray(255 - left).save(folder / "right.png")
    return folder / "left.png", folder / "right.png"


def test_mask_counts_and_files_are_checked(tmp_path):
    left, right = _halves(tmp_path)
    write_image(tmp_path / "other.png", (32, 32), seed=5)
    styles = ["images/style.png", "other.png"]
    path = write_config(tmp_path, style=styles, style_masks=[str(left)])
    with pytest.raises(config.ConfigError, match="style_masks: has 1 masks for 2 style"):
        config.load(path)
    (tmp_path / "notes.png").write_text("not an image")
    path = write_config(tmp_path, style=styles, style_masks=[str(left), "notes.png"])
    with pytest.raises(config.ConfigError, match=r"style_masks\[1\]: not a readable image"):
        config.load(path)
    path = write_config(tmp_path, content_mask="missing.png")
    with pytest.raises(config.ConfigError, match="content_mask: file not found"):
        config.load(path)
    path = write_config(tmp_path, style=styles, style_masks=[str(left), None])
    cfg = config.load(path)
    assert cfg.style_masks == [str(left), None]
    before = config.config_hash(cfg)
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(left)  # same path, new pixels
    assert config.config_hash(cfg) != before


def test_two_styles_on_complementary_masks_end_to_end(tmp_path):
    """A red and a blue style, each on one half: each half of the result takes its colour."""
    left, right = _halves(tmp_path)
    red, blue = np.zeros((2, 32, 32, 3), np.uint8)
    rng = np.random.default_rng(0)
    red[..., 0] = rng.integers(180, 255, (32, 32))
    blue[..., 2] = rng.integers(180, 255, (32, 32))
    Image.fromarray(red).save(tmp_path / "red.png")
    Image.fromarray(blue).save(tmp_path / "blue.png")
    path = write_config(tmp_path, name="masked", size=48, style=["red.png", "blue.png"],
                        style_masks=[str(left), str(right)], content_mask=str(left),
                        loss={"content_weight": 0.0, "style_weight": 1.0, "tv_weight": 0.0},
                        optimizer={"iterations": 15}, checkpoint_every=0)
    (job,) = batch.plan(config.load(path))
    outcome = batch.run_one(job)  # in process: the real run, mask files read from disk
    assert outcome.status == "completed", outcome.message
    run = outcome.folder.path
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["loss"]["style"] < 0.2 * metrics["initial_loss"]["style"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["style_masks"] == [str(left), str(right)]
    result = np.asarray(Image.open(run / "result.png"), np.float64)
    red_minus_blue = result[..., 0] - result[..., 2]
    assert red_minus_blue[:, :20].mean() > red_minus_blue[:, 28:].mean() + 40
