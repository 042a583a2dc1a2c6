"""Checks: a merged mapping becomes a typed, validated Config, or one ConfigError line that
names the key. Every mistake a user can make in a config is caught here, before any work
starts."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import types
import typing
import warnings

from pipeline.config.paths import expand_glob, is_glob
from pipeline.config.schema import (
    COLOR_MODES,
    FLOW_METHODS,
    INIT_KINDS,
    MAX_SIZE,
    METHODS,
    NETWORKS,
    POOLINGS,
    PRECISIONS,
    TILE_MODES,
    VIDEO_EXTENSIONS,
    VIDEO_INITS,
    WEIGHT_KINDS,
    Config,
    ConfigError,
    conv_layers,
    deepest_block,
    dotted_keys,
    long_side_shape,
    nearest_multiple,
    section,
    style_list,
    style_size,
    tile_stride,
    unknown_key,
)


def _coerce(value, hint, key: str):
    """`value` as type `hint`, or a ConfigError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # `str | list[str]`: a list stays a list, anything else a str
            listed = [a for a in inner if typing.get_origin(a) is list]
            plain = [a for a in inner if typing.get_origin(a) is not list]
            inner = listed if isinstance(value, list) else plain
        return _coerce(value, inner[0], key)
    if origin is list:
        (item,) = args
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `style: a.jpg` means a list of one
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a whole number, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        if not math.isfinite(value):  # .inf and .nan are YAML numbers; no weight means them
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a non-empty string, got {_describe(value)}")
        return value
    return value


def _describe(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def _build(cls, raw: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: {unknown_key(prefix + str(key), dotted_keys())}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        inner = section(hint)
        if inner is not None:
            if value is None and inner is not hint:  # `video:` alone: the section's defaults
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a mapping, got {_describe(value)}")
            kwargs[name] = _build(inner, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def from_dict(raw: dict) -> Config:
    """A validated Config from a merged mapping; raises ConfigError on the first mistake."""
    raw = dict(raw)
    tile = raw.pop("tile", Config.tile)  # its valid sizes depend on the model's layers
    cfg = _build(Config, raw, "")
    _check(cfg)
    cfg.tile = _tile(tile, cfg)
    return cfg


def _tile(value, cfg: Config) -> str | int:
    """`tile` as `off`, `auto` or a core size: a positive multiple of the stride of the
    deepest layer used (16 px for block5). YAML 1.1 reads a bare `off` as false."""
    stride, block = tile_stride(cfg.model), deepest_block(cfg.model)
    if value is False:
        return "off"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, str) and value in TILE_MODES:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        if value > 0 and value == int(value) and int(value) % stride == 0:
            return int(value)
        raise ConfigError(f"tile: {value:g} px is not a positive multiple of {stride} px (the "
                          f"stride of block{block}, the deepest layer used); the nearest valid "
                          f"value is {nearest_multiple(value, stride)}")
    close = difflib.get_close_matches(str(value).lower(), TILE_MODES, n=1)
    raise ConfigError(f"tile: must be off, auto or a tile size in px (a multiple of {stride}), "
                      f"got {_describe(value)}; the nearest valid value is "
                      f"{close[0] if close else 'auto'}")


def _check(cfg: Config) -> None:
    def need(ok: bool, key: str, message: str):
        if not ok:
            raise ConfigError(f"{key}: {message}")

    need(bool(cfg.content), "content", "missing: the path of the content image")
    styles = style_list(cfg.style)
    need(bool(styles), "style", "missing: the path of at least one style image")
    need(16 <= cfg.size <= MAX_SIZE, "size", f"must be between 16 and {MAX_SIZE} pixels")
    need(cfg.optimizer.iterations >= 1, "optimizer.iterations", "must be at least 1")
    need(cfg.optimizer.history is None or cfg.optimizer.history >= 1, "optimizer.history",
         "must be at least 1")
    need(cfg.checkpoint_every >= 0, "checkpoint_every", "must be 0 (off) or more")
    need(cfg.log_every >= 1, "log_every", "must be at least 1")
    need(cfg.model.pooling in POOLINGS, "model.pooling", f"must be one of {', '.join(POOLINGS)}")
    need(cfg.model.network in NETWORKS, "model.network", f"must be one of {', '.join(NETWORKS)}")
    need(cfg.preserve_colors in COLOR_MODES, "preserve_colors",
         f"must be one of {', '.join(COLOR_MODES)}")
    need(math.isfinite(cfg.style_scale) and cfg.style_scale > 0, "style_scale",
         "must be a positive number")
    need(cfg.model.precision in PRECISIONS, "model.precision",
         f"must be one of {', '.join(PRECISIONS)}")
    need(cfg.optimizer.method in METHODS, "optimizer.method",
         f"must be one of {', '.join(METHODS)}")
    for key in ("ftol", "gtol"):
        value = getattr(cfg.optimizer, key)
        need(value >= 0, f"optimizer.{key}", f"must be 0 (off) or more, got {value:g}")
        # The device optimisers run every iteration asked for: a tolerance they ignored
        # would still change the run id, and promise an early stop that never comes.
        need(value == 0 or cfg.optimizer.method == "scipy", f"optimizer.{key}",
             f"is an early stop of optimizer.method scipy only; {cfg.optimizer.method} runs "
             f"every iteration asked for, so leave it at 0 (got {value:g})")
    need(
        len(cfg.background) == 3 and all(0 <= c <= 255 for c in cfg.background),
        "background",
        "must be three values 0..255 (RGB)",
    )
    for term in ("content_weight", "style_weight", "tv_weight"):
        need(getattr(cfg.loss, term) >= 0, f"loss.{term}", "must not be negative")
    for group in ("content", "style"):
        layers = getattr(cfg.model, f"{group}_layers")
        key = f"model.{group}_layers"
        need(bool(layers), key, "needs at least one layer")
        known_layers = conv_layers(cfg.model.network)
        for layer in layers:
            close = difflib.get_close_matches(layer, known_layers, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            need(layer in known_layers, key,
                 f"'{layer}' is not a {cfg.model.network.upper()} conv layer{hint}")
        _check_weights(getattr(cfg.model, f"{group}_layer_weights"), len(layers),
                       f"model.{group}_layer_weights", f"{group}_layers")
    if not any(is_glob(s) for s in styles):  # else checked per run, once globs are expanded
        _check_weights(cfg.style_blend, len(styles), "style_blend", "style images")
    for key, paths in (("content", [cfg.content]), ("style", styles)):
        for p in paths:
            if is_glob(p):
                expand_glob(p, key)  # a glob must match something: an error names the key
            elif not (key == "content" and cfg.video is not None and os.path.isdir(p)):
                need(os.path.isfile(p), key, f"file not found: {p}")
    _check_video(cfg)
    if cfg.init not in INIT_KINDS:
        need(os.path.isfile(cfg.init), "init", f"'{cfg.init}' is neither one of "
             f"{', '.join(INIT_KINDS)} nor an existing image file")
    if cfg.model.weights not in WEIGHT_KINDS:
        need(os.path.isfile(cfg.model.weights), "model.weights", f"'{cfg.model.weights}' is "
             f"neither one of {', '.join(WEIGHT_KINDS)} nor an existing weights file")
    _check_scales(cfg)
    for size in sorted({min([cfg.size, *cfg.scales]), cfg.size}):  # every stage in between
        need(16 <= style_size(cfg, size) <= MAX_SIZE, "style_scale", f"style images would be "
             f"{style_size(cfg, size)} px on their long side (style_scale * {size}); that must "
             f"be between 16 and {MAX_SIZE}")
    _check_masks(cfg)
    known = dotted_keys()
    for key, values in cfg.sweep.items():
        need(key in known and key != "sweep", f"sweep.{key}", unknown_key(key, known))
        need(key not in ("name", "output_dir"), f"sweep.{key}",
             "cannot be swept: the runs of one config share one experiment folder")
        need(isinstance(values, list) and len(values) > 0, f"sweep.{key}",
             "must be a non-empty list of values")


def is_video_file(path: str) -> bool:
    """A file name that ffmpeg reads as a clip (by its extension)."""
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def _check_video(cfg: Config) -> None:
    """The `video:` section's values, and a content that is a clip exactly when there is one.
    Whether the clip itself can be read is the plan's to find out (pipeline/video/plan.py)."""
    video, content = cfg.video, cfg.content
    if video is None:
        # A GIF without the section is an image, as before (Pillow reads its first frame).
        if is_video_file(content) and not content.lower().endswith(".gif"):
            raise ConfigError(f"content: {content} is a video: add a `video:` section to "
                              "stylise it frame by frame (`video: {}` takes the defaults)")
        return

    def need(ok: bool, key: str, message: str):
        if not ok:
            raise ConfigError(f"video.{key}: {message}")

    if not (is_glob(content) or os.path.isdir(content) or is_video_file(content)):
        raise ConfigError(f"video: {content} is a single image; a clip is a video file "
                          f"({', '.join(e[1:] for e in VIDEO_EXTENSIONS[:5])}, ...), a folder "
                          "or a glob of frame images (frames/*.png)")
    frames = video.frames
    need(frames.start >= 0, "frames.start", "must be 0 (the first frame) or more")
    need(frames.stop is None or frames.stop > frames.start, "frames.stop",
         f"must be more than frames.start ({frames.start}), or null for the end")
    need(frames.step >= 1, "frames.step", "must be at least 1")
    need(video.fps is None or video.fps > 0, "fps", "must be a positive number, or null")
    need(video.init in VIDEO_INITS, "init", f"must be one of {', '.join(VIDEO_INITS)}")
    need(video.temporal_weight >= 0, "temporal_weight", "must not be negative")
    need(video.first_iterations is None or video.first_iterations >= 1, "first_iterations",
         "must be at least 1")
    need(video.flow in FLOW_METHODS, "flow", f"must be one of {', '.join(FLOW_METHODS)}")
    long_term = video.long_term
    need(bool(long_term) and all(d >= 1 for d in long_term)
         and all(a < b for a, b in zip(long_term, long_term[1:])), "long_term",
         f"frame distances, growing from the closest, e.g. [1] or [1, 2, 4]; got {long_term}")
    # Each later frame starts from the previous one at full size: there is no coarse stage
    # for it to start from, and a first frame alone in stages would be numbered apart.
    if cfg.scales:
        raise ConfigError("scales: not with `video:` (each frame after the first starts "
                          "from the previous one at full size)")


def _check_weights(weights, count: int, key: str, what: str) -> None:
    if weights is None:
        return
    if len(weights) != count:
        raise ConfigError(f"{key}: has {len(weights)} values for {count} {what}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"{key}: must be non-negative with a positive sum")


def _check_scales(cfg: Config) -> None:
    scales, per_stage = cfg.scales, cfg.scale_iterations
    if scales:
        if any(not 16 <= s <= MAX_SIZE for s in scales):
            raise ConfigError(f"scales: each stage must be between 16 and {MAX_SIZE} pixels")
        if any(a >= b for a, b in zip(scales, scales[1:])):
            raise ConfigError(f"scales: must grow from stage to stage, got {scales}")
        if scales[-1] != cfg.size:
            raise ConfigError(f"scales: the last stage is the result's size, so it must equal "
                              f"size ({cfg.size}), got {scales[-1]}")
    if per_stage is not None:
        if not scales:
            raise ConfigError("scale_iterations: needs scales (one number per stage)")
        if len(per_stage) != len(scales):
            raise ConfigError(f"scale_iterations: has {len(per_stage)} values for "
                              f"{len(scales)} stages in scales")
        if any(n < 1 for n in per_stage):
            raise ConfigError("scale_iterations: each stage needs at least 1 iteration")


def _check_masks(cfg: Config) -> None:
    masks, styles = cfg.style_masks, style_list(cfg.style)
    # A style glob's count is known only once expanded: each expanded run is checked again.
    if masks is not None and not any(is_glob(s) for s in styles) and len(masks) != len(
            styles):
        raise ConfigError(f"style_masks: has {len(masks)} masks for {len(styles)} style "
                          "images (one per style image; null for everywhere)")
    named = [(f"style_masks[{i}]", m) for i, m in enumerate(masks or [])]
    for key, path in [*named, ("content_mask", cfg.content_mask)]:
        if path is not None:
            _check_image_file(path, key)


def _check_image_file(path: str, key: str) -> None:
    """The file exists and its header is an image's (decoding waits for the run)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ConfigError(f"{key}: file not found: {path}")
    try:
        with Image.open(path):
            pass
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ConfigError(f"{key}: not a readable image: {path} ({type(e).__name__})") from None


def check_stage_sizes(cfg: Config) -> None:
    """At the smallest stage, the content and each style image must keep the short side the
    deepest layer needs (stylize.check_fits), or every run of the config would fail as it
    starts. One run's config, globs expanded; only the image headers are read. A file that
    cannot be read is not this check's business: its run fails by itself, naming it."""
    block = deepest_block(cfg.model)
    need = 2 ** (block - 1)
    first = min(cfg.scales or [cfg.size])
    key, what = ("scales", "first stage") if cfg.scales else ("size", "size")
    why = f"layers of block {block} need a short side of at least {need} px"
    for index, path in enumerate([cfg.content, *style_list(cfg.style)]):
        dims = _header_size(path)
        is_content = index == 0
        long_side = first if is_content else style_size(cfg, first)
        if dims is None or min(long_side_shape(*dims, long_side)) >= need:
            continue
        h, w = long_side_shape(*dims, long_side)
        seen = (f"at {first} px{'' if is_content else f' (style_scale {cfg.style_scale:g})'} "
                f"the {'content' if is_content else 'style'} image ({os.path.basename(path)}, "
                f"{dims[1]}x{dims[0]}) is {w}x{h} px, and {why}")
        least = _least_long_side(dims, need)
        if least is None:
            raise ConfigError(f"{key if is_content else 'style_scale'}: {seen}: it is too "
                              f"narrow for them at any size up to {MAX_SIZE}")
        if is_content:
            raise ConfigError(f"{key}: {seen}: the smallest {what} that fits is {least}")
        # The smallest style_scale, to the hundredth, whose style_size reaches `least`.
        scale = next(k / 100 for k in itertools.count(1) if math.ceil(k / 100 * first) >= least)
        stage = next((s for s in range(first, MAX_SIZE + 1) if style_size(cfg, s) >= least), 0)
        raise ConfigError(f"style_scale: {seen}: style_scale {scale:g} fits"
                          + (f" (or a {what} of {stage})" if stage else ""))


def _least_long_side(dims: tuple[int, int], need: int) -> int | None:
    """The smallest long side (up to MAX_SIZE) at which an image of these dims keeps a short
    side of `need` pixels, rounded as images.resize_long_side rounds it."""
    return next((s for s in range(need, MAX_SIZE + 1)
                 if min(long_side_shape(*dims, s)) >= need), None)


_HEADERS: dict[tuple, tuple[int, int] | None] = {}  # (real path, size, mtime) -> (h, w)


def _header_size(path: str) -> tuple[int, int] | None:
    """(height, width) from an image file's header, once per process and version of the file;
    None where it cannot be read. EXIF rotation swaps the sides, which changes neither the
    short one nor the long one."""
    from PIL import Image

    try:
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        if key not in _HEADERS:
            with warnings.catch_warnings():  # a huge image: its run says so, if it must
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    _HEADERS[key] = (img.height, img.width)
        return _HEADERS[key]
    except Exception:  # noqa: BLE001 - any unreadable file: its run reports it
        return None
