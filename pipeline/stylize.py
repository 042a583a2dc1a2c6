"""One run, in memory: pixels and a config in, a Result and Step records out."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from pipeline import autodiff, images, model, optimize
from pipeline.config import Config
from pipeline.losses import Objective


def prepare(cfg: Config, content: np.ndarray, styles: list[np.ndarray]):
    """Content scaled to `size` on its long side; each style to the same long side."""
    content = images.resize_long_side(content, cfg.size)
    return content, [images.resize_long_side(s, cfg.size) for s in styles]


def initial_image(cfg: Config, content, styles, init_image=None) -> np.ndarray:
    """The starting pixels, the content's shape: content, seeded noise, style, or an image."""
    if cfg.init == "content":
        return content.copy()
    if cfg.init == "noise":
        return np.random.default_rng(cfg.seed).uniform(0, 255, content.shape).astype("float32")
    source = styles[0] if cfg.init == "style" else init_image
    return images.resize_to(source, content.shape[:2])


def stylize(
    cfg: Config,
    content: np.ndarray,
    styles: list[np.ndarray],
    init_image: np.ndarray | None = None,
    on_step: Callable[[optimize.Step], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    resume: tuple[np.ndarray, tuple[int, int, float]] | None = None,
) -> tuple[optimize.Result, str]:
    """Optimise an image for `cfg`. Images are RGB float arrays in 0..255, any size.

    `resume` is (image, (iterations, evaluations, seconds)) from a checkpoint of this run.
    Returns the optimiser's Result and a description of the weights that were loaded.
    """
    keras.utils.set_random_seed(cfg.seed)
    content, styles = prepare(cfg, content, styles)
    extractor, layer_names, weights = model.feature_extractor(cfg.model, cfg.seed)
    objective = Objective(extractor, layer_names, cfg, content, styles)
    vg = autodiff.value_and_grad(objective, extractor.variables)
    x0, done = resume if resume else (initial_image(cfg, content, styles, init_image), (0, 0, 0.0))
    opt = cfg.optimizer
    result = optimize.minimize(vg, x0, opt.iterations, opt.history, on_step, should_stop, done,
                               ftol=opt.ftol, gtol=opt.gtol)
    return result, weights
