"""One run, in memory: pixels and a config in, a Result and Step records out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np

from pipeline import autodiff, color, config, images, model, optimize, scales
from pipeline.config import Config, style_size
from pipeline.losses import Objective
from pipeline.optimize import device

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


def color_inputs(cfg: Config, content, styles, init_image=None):
    """What the optimiser sees under `preserve_colors` (Gatys et al. 2016): `histogram`, each
    style with the content's colour mean and covariance; `luminance`, grey images of the
    content's luminance and of each style's, matched to it (and of an init image)."""
    if cfg.preserve_colors == "histogram":
        styles = [_clip(color.match_colors(s, content)) for s in styles]
    elif cfg.preserve_colors == "luminance":
        content, styles = color.luminance_inputs(content, styles)
        content, styles = _clip(content), [_clip(s) for s in styles]
        if init_image is not None:
            init_image = _clip(color.grey(color.luminance(init_image)))
    return content, styles, init_image


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
    resume: dict | None = None,
    style_masks: list[np.ndarray | None] | None = None,
    content_mask: np.ndarray | None = None,
) -> tuple[optimize.Result, str]:
    """Optimise an image for `cfg`. Images are RGB float arrays in 0..255, any size; masks
    are (H, W) arrays in 0..1, any size (each is resized to the generated image's shape).

    Coarse to fine (`scales`): each stage optimises at its own size, with the content and
    style targets (and masks) recomputed at that size, starting from the previous stage's
    best image upsampled. `resume` is a checkpoint's state (runs.RunFolder.load_state): the
    run goes on in the stage and at the iteration it was saved at.
    Returns the last stage's Result (with the first stage's initial loss) and a description
    of the weights that were loaded.
    """
    keras.utils.set_random_seed(cfg.seed)
    extractor, layer_names, weights = model.feature_extractor(cfg.model, cfg.seed)
    plan = scales.stages(cfg)
    if resume:
        x = resume["image"]
        done = (int(resume["iteration"]), int(resume["evaluations"]), float(resume["seconds"]))
        start = scales.resume_point(plan, int(resume.get("stage", 1)), done[0])
    else:
        x, done, start = None, (0, 0, 0.0), 1
    initial = None
    for stage in plan[start - 1:]:
        original_s, styles_s = prepare(cfg, content, styles, stage.size)
        check_fits(cfg, original_s, styles_s)
        content_s, styles_s, init_s = color_inputs(cfg, original_s, styles_s, init_image)
        shape = content_s.shape[:2]
        objective = Objective(
            extractor, layer_names, cfg, content_s, styles_s,
            style_masks=None if style_masks is None else [
                None if m is None else images.resize_mask(m, shape) for m in style_masks],
            content_mask=None if content_mask is None else images.resize_mask(content_mask,
                                                                              shape),
        )
        vg = autodiff.value_and_grad(objective, extractor.variables)
        if x is None:
            x0 = initial_image(cfg, content_s, styles_s, init_s)
        elif done[0] >= stage.first:  # resumed inside this stage: the checkpoint's own pixels
            if x.shape[:2] != shape:
                raise ValueError(f"checkpoint image is {x.shape[1]}x{x.shape[0]}, stage "
                                 f"{stage.index} works at {shape[1]}x{shape[0]}")
            x0 = x
        else:  # the previous stage's image, upsampled (Lanczos) to this stage's size
            x0 = images.resize_to(x, shape)
        stage_step = None
        if on_step is not None:
            def stage_step(step, index=stage.index):
                on_step(dataclasses.replace(step, stage=index))
        opt = cfg.optimizer
        if opt.method == "scipy":
            result = optimize.minimize(vg, x0, stage.last, config.history(opt), stage_step,
                                       should_stop, done, ftol=opt.ftol, gtol=opt.gtol)
        else:  # compiled on the device; a checkpoint of this stage holds its state
            saved = {k[len(optimize.STATE_PREFIX):]: v for k, v in (resume or {}).items()
                     if k.startswith(optimize.STATE_PREFIX)} if x0 is x else {}
            method = optimize.device_method(opt.method, config.history(opt))
            compiled = device.compile_method(method, objective, extractor.variables)
            result = device.minimize(compiled, x0, stage.last, stage_step, should_stop, done,
                                     saved or None, cfg.checkpoint_every)
        initial = initial or result.initial
        if result.reason not in _STAGE_DONE or stage is plan[-1]:
            break
        # The next stage's numbers start after this stage's budget, even if it converged early.
        x, done = result.image, (stage.last, result.evaluations, result.seconds)
    if cfg.preserve_colors == "luminance":
        # The iterate (and so each checkpoint and the resume state) is the luminance image;
        # the result is its luminance under the content's I and Q. Out-of-gamut pixels clip.
        result = dataclasses.replace(result, image=_clip(color.restore_colors(result.image,
                                                                              original_s)))
    return dataclasses.replace(result, initial=initial), weights
