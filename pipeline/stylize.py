"""One run, in memory: pixels and a config in, a Result and Step records out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
from keras import ops

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
    """The starting pixels, the content's shape: content, seeded noise, style, or an image."""
    if cfg.init == "content":
        return content.copy()
    if cfg.init == "noise":
        return np.random.default_rng(cfg.seed).uniform(0, 255, content.shape).astype("float32")
    source = styles[0] if cfg.init == "style" else init_image
    return images.resize_to(source, content.shape[:2])


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

    def __call__(self, y):
        return self.objective(ops.repeat(y, 3, axis=-1))


def _loss(values, names) -> dict:
    """A loss record ({"total": ..., term: ...}) from a checkpoint's array (total first)."""
    return {name: float(v) for name, v in zip(("total", *names), values)}


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
    are (H, W) arrays in 0..1 at any size (each is resized to the generated image's shape).

    Coarse to fine (`scales`): each stage optimises at its own size, with the content and
    style targets (and masks) recomputed at that size, starting from the previous stage's
    best image upsampled. `resume` is a checkpoint's state (runs.RunFolder.load_state): the
    run goes on in the stage and at the iteration it was saved at, or, from a checkpoint that
    ended a stage, with the next stage from that stage's best image, as if it had never
    stopped. Step records carry the run's first loss (`initial`), which a checkpoint keeps as
    `initial.<term>`. Returns the last stage's Result, with the run's initial loss (None when
    a resumed checkpoint did not keep it), and a description of the weights that were loaded.
    """
    keras.utils.set_random_seed(cfg.seed)
    extractor, layer_names, weights = model.feature_extractor(cfg.model, cfg.seed)
    plan = scales.stages(cfg)
    x, done, start, inside, saved, initial = None, (0, 0, 0.0), 1, False, {}, None
    if resume:
        done = (int(resume["iteration"]), int(resume["evaluations"]), float(resume["seconds"]))
        start = scales.resume_point(plan, int(resume.get("stage", 1)), done[0])
        inside = done[0] >= plan[start - 1].first  # else the checkpoint ended the stage before
        saved = {k[len(optimize.STATE_PREFIX):]: v for k, v in resume.items()
                 if k.startswith(optimize.STATE_PREFIX)}
        # The image a stage goes on from (its last iterate), or the next stage starts from
        # (the stage's best: scipy and the device optimisers keep it; older checkpoints
        # only the iterate).
        x = resume["image"] if inside else saved.get("best_x", resume["image"])
        if not inside:
            saved = {}
        kept = {k[len("initial."):]: v for k, v in resume.items() if k.startswith("initial.")}
        initial = {k: float(v) for k, v in kept.items()} or None
    for stage in plan[start - 1:]:
        original_s, styles_s = prepare(cfg, content, styles, stage.size)
        check_fits(cfg, original_s, styles_s)
        content_s, styles_s = color_inputs(cfg, original_s, styles_s)
        shape = content_s.shape[:2]
        objective = Objective(
            extractor, layer_names, cfg, content_s, styles_s,
            style_masks=None if style_masks is None else [
                None if m is None else images.resize_mask(m, shape) for m in style_masks],
            content_mask=None if content_mask is None else images.resize_mask(content_mask,
                                                                              shape),
        )
        if cfg.preserve_colors == "luminance":
            objective = GreyObjective(objective)
        resumed_here = inside and stage.index == start
        if x is None:
            x0 = iterate(cfg, initial_image(cfg, content_s, styles_s, init_image))
        elif resumed_here:  # the checkpoint's own pixels
            if x.shape[:2] != shape:
                raise ValueError(f"checkpoint image is {x.shape[1]}x{x.shape[0]}, stage "
                                 f"{stage.index} works at {shape[1]}x{shape[0]}")
            x0 = iterate(cfg, x)
        else:  # the previous stage's best image, upsampled (Lanczos) to this stage's size
            x0 = images.resize_to(iterate(cfg, x), shape)
        state = saved if resumed_here else {}
        first = resume is None and stage is plan[0]  # its first loss is the run's

        def stage_step(step, index=stage.index, first=first):
            nonlocal initial
            if first and initial is None:
                initial = step.initial
            if on_step is not None:
                on_step(dataclasses.replace(
                    step, stage=index, initial=initial,
                    image=None if step.image is None else rgb(step.image)))

        opt = cfg.optimizer
        if opt.method == "scipy":
            best = (state["best_x"], _loss(state["best"], objective.terms)) if {
                "best_x", "best"} <= state.keys() else None
            vg = autodiff.value_and_grad(objective, extractor.variables)
            result = optimize.minimize(vg, x0, stage.last, config.history(opt), stage_step,
                                       should_stop, done, ftol=opt.ftol, gtol=opt.gtol,
                                       best=best)
        else:  # compiled on the device; a checkpoint of this stage holds its state
            method = optimize.device_method(opt.method, config.history(opt))
            compiled = device.compile_method(method, objective, extractor.variables)
            result = device.minimize(compiled, x0, stage.last, stage_step, should_stop, done,
                                     state or None, cfg.checkpoint_every)
        if first and initial is None:  # no iteration ran (a non-finite start, a stop)
            initial = result.initial
        if result.reason not in _STAGE_DONE or stage is plan[-1]:
            break
        # The next stage's numbers start after this stage's budget, even if it converged early.
        x, done = result.image, (stage.last, result.evaluations, result.seconds)
    image = rgb(result.image)
    if cfg.preserve_colors == "luminance":
        # The result is the optimised luminance under the content's I and Q (the last
        # stage's content). Out-of-gamut pixels clip.
        image = _clip(color.restore_colors(image, original_s))
    return dataclasses.replace(result, image=image, initial=initial), weights
