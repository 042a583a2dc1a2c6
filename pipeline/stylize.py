"""One run, in memory: pixels and a config in, a Result and Step records out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
from keras import ops

from pipeline import color, images, model, optimize, scales
from pipeline.config import Config, style_size
from pipeline.losses import Objective
from pipeline.tile.geometry import stage_core
from pipeline.tile.objective import TiledValueAndGrad

# Ends of a stage after which the next stage starts (an abnormal end still has a best image).
_STAGE_DONE = (optimize.COMPLETED, optimize.CONVERGED, optimize.ABNORMAL)


def prepare(cfg: Config, content: np.ndarray, styles: list[np.ndarray], size: int | None = None):
    """Content scaled to `size` (default cfg.size) on its long side; each style to
    ceil(style_scale * size)."""
    size = size or cfg.size
    content = images.resize_long_side(content, size)
    return content, [images.resize_long_side(s, style_size(cfg, size)) for s in styles]


def check_fits(cfg: Config, content: np.ndarray, styles: list[np.ndarray]) -> None:
    """Each image must survive the poolings before the deepest layer asked for (block b sees
    it halved b-1 times): narrower, max pooling fails and average pooling gives no features."""
    deepest = max(int(n[len("block")]) for n in (*cfg.model.content_layers,
                                                 *cfg.model.style_layers))
    need = 2 ** (deepest - 1)
    for what, img in (("content", content), *(("style", s) for s in styles)):
        if min(img.shape[:2]) < need:
            raise ValueError(f"the {what} image is {img.shape[1]}x{img.shape[0]} px here; layers "
                             f"of block {deepest} need a short side of at least {need} px: "
                             f"raise size (or scales, style_scale)")


def _clip(img: np.ndarray) -> np.ndarray:
    # Colour transforms can leave the RGB cube; pixels must stay in the optimiser's bounds.
    return np.clip(img, 0, 255).astype(np.float32)


def color_inputs(cfg: Config, content, styles):
    """The targets under `preserve_colors` (Gatys et al. 2016): `histogram`, each style with
    the content's colour mean and covariance; `luminance`, grey images of the content's
    luminance and of each style's, matched to it."""
    if cfg.preserve_colors == "histogram":
        styles = [_clip(color.match_colors(s, content)) for s in styles]
    elif cfg.preserve_colors == "luminance":
        content, styles = color.luminance_inputs(content, styles)
        content, styles = _clip(content), [_clip(s) for s in styles]
    return content, styles


def initial_image(cfg: Config, content, styles, init_image=None) -> np.ndarray:
    """The starting pixels: the content, seeded noise of its shape, the first style or an
    init image (these two at their own size: start_image scales them to the content's). An
    init image given is the start whatever `init` says (a video frame's previous frame)."""
    if init_image is not None:
        return init_image
    if cfg.init == "content":
        return content.copy()
    if cfg.init == "noise":
        return np.random.default_rng(cfg.seed).uniform(0, 255, content.shape).astype("float32")
    return styles[0] if cfg.init == "style" else init_image


def iterate(cfg: Config, img: np.ndarray) -> np.ndarray:
    """What the optimiser varies, from an (H, W, 3) image: the image itself, or under
    `preserve_colors: luminance` its luminance alone, (H, W, 1), as the paper optimises (an
    (H, W, 1) image, from a checkpoint or an earlier stage, is one already)."""
    if cfg.preserve_colors != "luminance" or img.shape[-1] == 1:
        return np.asarray(img, np.float32)
    return _clip(color.luminance(img)[..., None])


def rgb(x: np.ndarray) -> np.ndarray:
    """An iterate as RGB pixels: a luminance (H, W, 1) is the grey image (Y, Y, Y)."""
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


class GreyObjective:
    """The objective of a grey image: one channel, seen by the network as three equal ones.
    The gradient with respect to it is the sum of the three channels' gradients, so the
    optimiser moves luminance alone and the result is exactly what was optimised."""

    def __init__(self, objective: Objective):
        self.objective, self.terms = objective, objective.terms

    @property
    def inputs(self) -> dict:
        return self.objective.inputs

    def __call__(self, y, inputs=None):
        return self.objective(ops.repeat(y, 3, axis=-1), inputs)


class GreyValueAndGrad:
    """GreyObjective for an objective computed tile by tile on the host (a
    TiledValueAndGrad): pixels and gradient are numpy arrays there."""

    on_host = True

    def __init__(self, vg: TiledValueAndGrad):
        self.vg, self.terms, self.core, self.tiles = vg, vg.terms, vg.core, vg.tiles

    def __call__(self, y):
        total, terms, grad = self.vg(np.repeat(np.asarray(y, np.float32), 3, axis=-1))
        return total, terms, grad.sum(axis=-1, keepdims=True)


def stage_objective(cfg: Config, network, content, styles, size: int, style_masks=None,
                    content_mask=None, temporal=None):
    """The objective at one stage's size: content and styles scaled to it (each style to
    style_scale times it), checked against the deepest layer, coloured as `preserve_colors`
    asks, masks resized to the content's shape; its targets computed once, here, tile by tile
    where geometry.stage_core says (a TiledValueAndGrad, computed on the host). Returns it,
    the content and styles as its targets saw them, and the content at that size in its own
    colours (luminance mode restores them into the result). `network` is
    model.feature_extractor's (extractor, layer names, weights); `temporal`, a video frame's
    (warped, weights, temporal_weight) at the content's shape (losses.Objective)."""
    extractor, layer_names, _ = network
    original, styles = prepare(cfg, content, styles, size)
    shape = original.shape[:2]
    if style_masks is not None:
        style_masks = [None if m is None else images.resize_mask(m, shape) for m in style_masks]
    if content_mask is not None:
        content_mask = images.resize_mask(content_mask, shape)
    check_fits(cfg, original, styles)
    content, styles = color_inputs(cfg, original, styles)
    core = stage_core(cfg, shape)  # a size from `tile` that cuts this stage: tile by tile
    if core is not None:
        objective = TiledValueAndGrad(extractor, layer_names, cfg, content, styles, core,
                                      style_masks=style_masks, content_mask=content_mask,
                                      temporal=temporal)
        grey = GreyValueAndGrad
    else:
        objective = Objective(extractor, layer_names, cfg, content, styles,
                              style_masks=style_masks, content_mask=content_mask,
                              temporal=temporal)
        grey = GreyObjective
    if cfg.preserve_colors == "luminance":
        objective = grey(objective)
    return objective, content, styles, original


def tiling_of(objective) -> dict:
    """A stage objective's tile core (None: whole) and tile count, as Step records carry."""
    core = getattr(objective, "core", None)
    return {"tile": core, "tiles": len(objective.tiles) if core else 1}


def start_image(cfg: Config, start: scales.Start, stage: scales.Stage, content, styles,
                init_image) -> np.ndarray:
    """What the stage's optimiser starts from, at the content's shape: the initial image
    (first stage), the checkpoint's own pixels (resumed inside this stage), or the previous
    stage's best image upsampled (Lanczos) to this stage's size."""
    shape = content.shape[:2]
    x = start.image  # a checkpoint's image or the previous stage's best (iterate() takes both)
    if x is None:
        x = initial_image(cfg, content, styles, init_image)
    elif start.inside and stage.index == start.stage and x.shape[:2] != shape:
        raise ValueError(f"checkpoint image is {x.shape[1]}x{x.shape[0]}, stage {stage.index} "
                         f"works at {shape[1]}x{shape[0]}")
    return iterate(cfg, images.resize_to(x, shape))  # no change where the shape is the same


def stylize(
    cfg: Config,
    content: np.ndarray,
    styles: list[np.ndarray],
    init_image: np.ndarray | None = None,
    on_step: Callable[[optimize.Step], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    start: scales.Start | None = None,
    style_masks: list[np.ndarray | None] | None = None,
    content_mask: np.ndarray | None = None,
    network=None,
    temporal=None,
    shared=None,
) -> tuple[optimize.Result, str]:
    """Optimise an image for `cfg`. Images are RGB float arrays in 0..255, any size; masks
    are (H, W) arrays in 0..1 at any size (each is resized to the generated image's shape).

    Coarse to fine (`scales`): each stage optimises at its own size, with the content and
    style targets (and masks) recomputed at that size, starting from the previous stage's
    best image upsampled. `start` is where a resumed run goes on (scales.start_of a
    checkpoint's state; None: from the beginning), as if it had never stopped. Step records
    carry the run's first loss (`initial`). Returns the last stage's Result, with the run's
    initial loss (None when a resumed checkpoint did not keep it), and a description of the
    weights that were loaded.

    A clip's frames share one `network` (model.feature_extractor's; None: built here) and
    its compiled functions (`shared`, an autodiff.Shared), and each adds its `temporal` term
    (see stage_objective).
    """
    keras.utils.set_random_seed(cfg.seed)
    network = network or model.feature_extractor(cfg.model, cfg.seed)
    plan = scales.stages(cfg)
    start = start or scales.Start()
    done, initial = start.done, start.initial
    for stage in plan[start.stage - 1:]:
        objective, content_s, styles_s, original = stage_objective(
            cfg, network, content, styles, stage.size, style_masks, content_mask, temporal)
        x0 = start_image(cfg, start, stage, content_s, styles_s, init_image)
        resumed_here = start.inside and stage.index == start.stage
        first = start.image is None and stage is plan[0]  # its first loss is the run's

        def stage_step(step, index=stage.index, first=first, tiling=tiling_of(objective)):
            nonlocal initial
            if first and initial is None:
                initial = step.initial
            if on_step is not None:
                on_step(dataclasses.replace(
                    step, stage=index, initial=initial,
                    image=None if step.image is None else rgb(step.image), **tiling))

        result = optimize.solve(cfg.optimizer, objective, network[0].variables, x0,
                                stage.last, stage_step, should_stop, done,
                                start.state if resumed_here else None, cfg.checkpoint_every,
                                shared)
        if first and initial is None:  # no iteration ran (a non-finite start, a stop)
            initial = result.initial
        if result.reason not in _STAGE_DONE or stage is plan[-1]:
            break
        # The next stage's numbers start after this stage's budget, even if it converged early.
        start = dataclasses.replace(start, image=result.image, inside=False)
        done = (stage.last, result.evaluations, result.seconds)
    image = rgb(result.image)
    if cfg.preserve_colors == "luminance":
        # The result is the optimised luminance under the content's I and Q (the last
        # stage's content). Out-of-gamut pixels clip.
        image = _clip(color.restore_colors(image, original))
    return dataclasses.replace(result, image=image, initial=initial), network[2]
