"""A run's configuration: the typed schema (the one source of defaults), YAML loading with
`base:` inheritance and `--set` overrides, validation, path resolution, hashing and expansion
of globs and sweeps into single runs.

Every mistake a user can make in a config is caught here, before any work starts, and raised
as one ConfigError line that names the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob as globlib
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The networks: convolutions per block; both have 64, 128, 256, 512, 512 channels per block.
BLOCK_CONVS = {"vgg19": (2, 2, 4, 4, 4), "vgg16": (2, 2, 3, 3, 3)}
BLOCK_CHANNELS = (64, 128, 256, 512, 512)
NETWORKS = tuple(BLOCK_CONVS)


def conv_layers(network: str) -> tuple[str, ...]:
    """A network's convolution layers as Keras names them, in order ('block1_conv1', ...)."""
    return tuple(f"block{block}_conv{i}"
                 for block, convs in enumerate(BLOCK_CONVS[network], start=1)
                 for i in range(1, convs + 1))


def layer_channels(layer: str) -> int:
    """C_l of a conv layer ('block3_conv2' -> 256), the same in both networks."""
    return BLOCK_CHANNELS[int(layer[len("block")]) - 1]


VGG19_CONV_LAYERS = conv_layers("vgg19")
COLOR_MODES = ("none", "luminance", "histogram")
INIT_KINDS = ("content", "noise", "style")
WEIGHT_KINDS = ("imagenet", "random")
POOLINGS = ("avg", "max")
METHODS = ("scipy", "lbfgs", "adam")  # optimizer.method: see pipeline/optimize/
PRECISIONS = ("float32", "bfloat16", "float16")  # model.precision: the network's compute dtype
MAX_SIZE = 8192


class ConfigError(ValueError):
    """A mistake in a config or on the command line: one line naming the file and key."""


# --------------------------------------------------------------------------- the schema


# The default objective is jcjohnson/neural-style's (tuned by many people on the same Caffe
# VGG19 weights Keras ships), converted exactly into this objective; README, "Where the
# defaults come from", has the derivation and configs/recipes/neural-style.yaml the rest of it.
_NEURAL_STYLE_LAYERS = [f"block{b}_conv1" for b in range(1, 6)]  # its relu1_1 .. relu5_1


@dataclass
class ModelConfig:
    network: str = "vgg19"  # vgg19 | vgg16 (Keras's architectures and layer names)
    weights: str = "imagenet"  # imagenet | random | a path to a weights file
    # neural-style keeps VGG's max pooling, and its weights were tuned with it; the paper
    # swaps in average pooling, which changes every layer's scale (and so the balance).
    pooling: str = "max"
    content_layers: list[str] = field(default_factory=lambda: ["block4_conv2"])
    style_layers: list[str] = field(default_factory=lambda: list(_NEURAL_STYLE_LAYERS))
    content_layer_weights: list[float] | None = None  # None: equal weights
    # None: proportional to 1 / C_l^2 (C_l the layer's channels), which is neural-style's
    # Gram normalisation by C*H*W, for whatever style layers are chosen; see style_weights().
    style_layer_weights: list[float] | None = None
    # The network's compute dtype; Gram matrices, losses and the optimiser stay float32.
    precision: str = "float32"


@dataclass
class LossConfig:
    # Means, not sums, so these weights carry across image sizes (tv_weight aside, below).
    # neural-style: content 5 on an MSE (a mean, as here); style 100 per layer on the MSE of
    # Gram matrices divided by C*H*W, which is ours divided by C: 100 / C_l^2 per layer, i.e.
    # 100 * sum_l 1/C_l^2 spread over the layers in proportion to 1/C_l^2 (the None rule).
    content_weight: float = 5.0
    style_weight: float = 100 * sum(1 / layer_channels(n) ** 2 for n in _NEURAL_STYLE_LAYERS)
    # neural-style's TV is (1e-3 / 2) * a sum of squared differences of its 0..256-scaled
    # pixels; ours a mean of 0..255 ones. Equal for a square 512 x 512 image (~395.5);
    # its sum grows with the pixel count, so at other sizes its TV weighs more or less.
    tv_weight: float = 1e-3 / 2 * (256 / 255) ** 2 * 3 * 512 * 511


@dataclass
class OptimizerConfig:
    iterations: int = 500  # L-BFGS-B iterations (each takes one or more evaluations)
    # L-BFGS memory, corrections kept (scipy's m). None: by method (DEFAULT_HISTORY).
    history: int | None = None
    # Early stops, off by default: users ask for `iterations` and expect that many. The terms
    # are means, so per-pixel gradients are tiny and scipy's own defaults (factr 1e7, pgtol
    # 1e-5) end runs after a few iterations (jcjohnson/neural-style sets tolX/tolFun to -1 for
    # the same reason). ftol: stop when the loss's relative reduction per iteration falls
    # below it (scipy's ftol = factr * machine epsilon); gtol: when every projected gradient
    # entry is below it (scipy's pgtol).
    ftol: float = 0.0
    gtol: float = 0.0
    # scipy: L-BFGS-B on the host; lbfgs, adam: compiled, many iterations per device call
    method: str = "scipy"


@dataclass
class Config:
    name: str = "stylize"
    output_dir: str = "outputs"
    content: str = ""
    # One path or glob (a glob makes one run per match), or a list of paths and globs whose
    # matches are all blended in one run. Each run's own config holds a list.
    style: str | list[str] = field(default_factory=list)
    style_blend: list[float] | None = None  # one weight per style image; None: equal
    size: int = 512  # long side of the generated image, in pixels
    style_scale: float = 1.0  # style images' long side is ceil(style_scale * size)
    preserve_colors: str = "none"  # none | luminance | histogram (Gatys et al. 2016)
    init: str = "content"  # content | noise | style | an image path
    seed: int = 0
    background: list[int] = field(default_factory=lambda: [255, 255, 255])
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # Coarse to fine: the long side of each stage, smallest first; the last one is `size`.
    # Each stage starts from the previous stage's result, upsampled. []: one stage at `size`.
    scales: list[int] = field(default_factory=list)
    scale_iterations: list[int] | None = None  # per stage; None: optimizer.iterations each
    # Masks (white: applies, black: not, grey: partly), resized to the generated image.
    style_masks: list[str | None] | None = None  # one per style image; null: everywhere
    content_mask: str | None = None  # where the content term counts; None: everywhere
    checkpoint_every: int = 50  # iterations between checkpoints; 0 turns them off
    log_every: int = 25  # iterations between log lines when the output is not a terminal
    sweep: dict[str, list] = field(default_factory=dict)


# Keys whose values are file paths: relative ones are resolved against the file that set them.
PATH_KEYS = ("content", "style", "init", "model.weights", "output_dir", "style_masks",
             "content_mask")
# Keys that change how a run is watched or stored, not the pixels it makes: left out of the hash.
UNHASHED_KEYS = ("name", "output_dir", "checkpoint_every", "log_every", "sweep")


# optimizer.history when not set. scipy's L-BFGS-B pays for each correction on the host (at
# 128 px, 100 of them cost 1.4x the seconds per iteration of 10; at 512 px 4-6x). The device
# L-BFGS pays little (its compact form is a few matrix products: 30 cost 1.01x of 10), and
# 30 reached a 1.4% lower loss after 300 iterations than 10 (100: no better than 30).
DEFAULT_HISTORY = {"scipy": 10, "lbfgs": 30}


def history(optimizer: OptimizerConfig) -> int:
    """The L-BFGS memory a run uses: optimizer.history, or its method's default."""
    if optimizer.history is not None:
        return optimizer.history
    return DEFAULT_HISTORY.get(optimizer.method, DEFAULT_HISTORY["scipy"])


def style_weights(model: ModelConfig) -> list[float]:
    """The style layers' weights as set, or by default 1 / C_l^2 each (before normalising)."""
    if model.style_layer_weights is not None:
        return list(model.style_layer_weights)
    return [1 / layer_channels(layer) ** 2 for layer in model.style_layers]


def style_size(cfg: Config, size: int | None = None) -> int:
    """The style images' long side for an image of long side `size` (default cfg.size):
    ceil, as neural-style's -style_scale computes it."""
    return math.ceil(cfg.style_scale * (size or cfg.size))


def dotted_keys(cls=Config, prefix="") -> dict[str, type]:
    """Every leaf key of the schema, dotted ('loss.style_weight'), with its type."""
    out = {}
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(dotted_keys(hint, prefix + f.name + "."))
        else:
            out[prefix + f.name] = hint
    return out


# --------------------------------------------------------------------------- YAML reading


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads 1e4 as a number.

    PyYAML silently keeps the last of two equal keys, and its YAML 1.1 float pattern needs a
    dot, so `style_weight: 1e4` would arrive as the string '1e4'.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key ([a, b]: 1): SafeLoader's own error says so
            continue
        if duplicate:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key '{key}'")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}{where}: invalid YAML: {problem}") from None


def _read_file(path: Path, chain: tuple[Path, ...]) -> dict:
    """One file's mapping with `base:` merged in and its paths made absolute."""
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise ConfigError(f"{path}: base: inheritance cycle ({cycle})")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    raw.pop("provenance", None)  # written into a run's config.yaml by the tool; not a setting
    _resolve_paths(raw, path.parent, str(path))
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: must be the path of another config file")
    try:
        base_path = _expand_path(base, path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: base: {e}") from None
    parent = _read_file(Path(base_path), chain + (path,))
    return _deep_merge(parent, raw)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "sweep":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- paths


def _expand_path(value: str, relative_to: Path) -> str:
    """`~` expanded; `pkg:NAME/rel/path` is a file shipped inside an installed package;
    anything else relative is taken against `relative_to`."""
    if value.startswith("pkg:"):
        package, _, rest = value[4:].partition("/")
        try:
            spec = importlib.util.find_spec(package) if package else None
        except (ImportError, ValueError):  # 'a.b' with no package 'a', or a malformed name
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{value}: package '{package}' is not installed")
        return str(Path(next(iter(spec.submodule_search_locations))) / rest)
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (relative_to / path).resolve())


def _is_path_value(key: str, value) -> bool:
    keywords = {"init": INIT_KINDS, "model.weights": WEIGHT_KINDS}.get(key, ())
    return isinstance(value, str) and value not in keywords


def _resolve_paths(raw: dict, relative_to: Path, source: str) -> None:
    """Make the path values of one file's mapping absolute, in place (sweep values too)."""

    def fix(key, value):
        if isinstance(value, list):
            return [fix(key, v) for v in value]
        if not _is_path_value(key, value):
            return value
        try:
            return _expand_path(value, relative_to)
        except ConfigError as e:
            raise ConfigError(f"{source}: {key}: {e}") from None

    for key in PATH_KEYS:
        head, _, leaf = key.rpartition(".")
        holder = raw.get(head) if head else raw
        if isinstance(holder, dict) and leaf in holder:
            holder[leaf] = fix(key, holder[leaf])
    sweep = raw.get("sweep")
    if isinstance(sweep, dict):
        for key, values in sweep.items():
            if key in PATH_KEYS and isinstance(values, list):
                sweep[key] = [fix(key, v) for v in values]


def _is_glob(path: str) -> bool:
    """A pattern to expand: glob characters, and not the name of a file that exists (an
    existing `trip[1].png` is that file; `trip[[]1].png` is the pattern that matches it)."""
    return any(ch in path for ch in "*?[") and not os.path.isfile(path)


def expand_glob(pattern: str, key: str) -> list[str]:
    """A path, or every file a glob matches (sorted); an error names the key if none."""
    if not _is_glob(pattern):
        return [pattern]
    matches = sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
    if not matches:
        raise ConfigError(f"{key}: no file matches '{pattern}'")
    return matches


# --------------------------------------------------------------------------- overrides


def apply_override(raw: dict, assignment: str) -> None:
    """`--set loss.style_weight=1e4`: the value is read as YAML, paths against the cwd."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE, e.g. loss.style_weight=1e4")
    known = dotted_keys()
    if key not in known:
        raise ConfigError(f"--set {key}: {_unknown(key, known)}")
    value = parse_yaml(text, f"--set {key}")
    if key in PATH_KEYS or key == "sweep":  # `--set sweep={content: [...]}` holds paths too
        wrapper: dict = {}
        _set_dotted(wrapper, key, value)
        _resolve_paths(wrapper, Path.cwd(), "--set")
        value = _get_dotted(wrapper, key)
    _set_dotted(raw, key, value)


def _set_dotted(raw: dict, key: str, value) -> None:
    *heads, leaf = key.split(".")
    for head in heads:
        child = raw.get(head)
        if not isinstance(child, dict):
            child = raw[head] = {}
        raw = child
    raw[leaf] = value


def _get_dotted(raw: dict, key: str):
    for part in key.split("."):
        raw = raw[part]
    return raw


def _unknown(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if not close:  # a typo in the leaf alone: compare against leaves
        leaf = key.rpartition(".")[2]
        by_leaf = {k.rpartition(".")[2]: k for k in known}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1)]
    return "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")


# --------------------------------------------------------------------------- validation


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
            raise ConfigError(f"{prefix}{key}: {_unknown(prefix + str(key), dotted_keys())}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a mapping, got {_describe(value)}")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def from_dict(raw: dict) -> Config:
    """A validated Config from a merged mapping; raises ConfigError on the first mistake."""
    cfg = _build(Config, raw, "")
    _check(cfg)
    return cfg


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
    if not any(_is_glob(s) for s in styles):  # else checked per run, once globs are expanded
        _check_weights(cfg.style_blend, len(styles), "style_blend", "style images")
    for key, paths in (("content", [cfg.content]), ("style", styles)):
        for p in paths:
            if _is_glob(p):
                expand_glob(p, key)  # a glob must match something: an error names the key
            else:
                need(os.path.isfile(p), key, f"file not found: {p}")
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
        need(key in known and key != "sweep", f"sweep.{key}", _unknown(key, known))
        need(key not in ("name", "output_dir"), f"sweep.{key}",
             "cannot be swept: the runs of one config share one experiment folder")
        need(isinstance(values, list) and len(values) > 0, f"sweep.{key}",
             "must be a non-empty list of values")


def style_list(style: str | list[str]) -> list[str]:
    return [style] if isinstance(style, str) else list(style)


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
    if masks is not None and not any(_is_glob(s) for s in styles) and len(masks) != len(
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


# --------------------------------------------------------------------------- entry points


def load_raw(path, overrides=()) -> dict:
    """The merged mapping of a config file, its bases and `--set` overrides (not validated)."""
    raw = _read_file(Path(os.path.expanduser(str(path))).resolve(), ())
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


def load(path, overrides=()) -> Config:
    """A validated Config (globs and sweep not yet expanded)."""
    raw = load_raw(path, overrides)  # its errors already name their file or --set
    try:
        cfg = from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    # A relative output_dir left at its default was set by no file: it means the working
    # directory's. Absolute, a run's saved config.yaml points back at the same folder.
    cfg.output_dir = os.path.abspath(cfg.output_dir)
    return cfg


def expand(cfg: Config) -> list[tuple[dict, Config]]:
    """The single runs a config describes, in a stable order, each with the values that
    distinguish it: the cartesian product of the sweep (keys sorted, so their order in the
    file does not matter), then each content match with each style match. A `style` given as
    one string makes one run per file its glob matches; the matches of a list of styles (globs
    included) are blended in one run.
    """
    base = to_dict(cfg)
    base["sweep"] = {}
    keys = sorted(cfg.sweep)
    runs = []
    for values in itertools.product(*(cfg.sweep[k] for k in keys)):
        raw = json.loads(json.dumps(base))
        for key, value in zip(keys, values):
            _set_dotted(raw, key, value)
        swept = dict(zip(keys, values))
        contents = expand_glob(raw["content"], "content")
        if isinstance(raw["style"], str):
            style_sets = [[s] for s in expand_glob(raw["style"], "style")]
        else:
            style_sets = [[m for s in raw["style"] for m in expand_glob(s, "style")]]
        for content, style in itertools.product(contents, style_sets):
            one = dict(raw, content=content, style=style)
            label = dict(swept)
            if len(contents) > 1:
                label["content"] = Path(content).stem
            if len(style_sets) > 1:
                label["style"] = Path(style[0]).stem
            run = from_dict(one)
            # Each run records the memory it uses, not "by method".
            run.optimizer.history = history(run.optimizer)
            runs.append((label, run))
    return runs


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


_DIGESTS: dict[tuple, str] = {}  # (real path, size, mtime) -> sha256 of the bytes


def _file_digest(path: str) -> str:
    """The file's sha256, read once per process: a sweep of many runs over one 80 MB weights
    file hashes it once. An edit changes the size or the modification time, and so the key."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def config_hash(cfg: Config) -> str:
    """A short hash of everything that decides the result's pixels.

    Input files count by their bytes, not their paths, so a run keeps its id when the folder
    moves to another machine, and gets a new one when an image is edited in place.
    """
    data = to_dict(cfg)
    for key in UNHASHED_KEYS:
        data.pop(key)
    data["content"] = _file_digest(cfg.content)
    data["style"] = [_file_digest(s) for s in style_list(cfg.style)]
    # What a None means has changed once (equal, then 1/C_l^2): hash what it means now.
    data["model"]["style_layer_weights"] = style_weights(cfg.model)
    data["optimizer"]["history"] = history(cfg.optimizer)  # None: what it means for the method
    if cfg.init not in INIT_KINDS:
        data["init"] = _file_digest(cfg.init)
    if cfg.style_masks is not None:
        data["style_masks"] = [m and _file_digest(m) for m in cfg.style_masks]
    if cfg.content_mask is not None:
        data["content_mask"] = _file_digest(cfg.content_mask)
    if cfg.model.weights not in WEIGHT_KINDS:  # by content: two files may share a name
        data["model"]["weights"] = _file_digest(cfg.model.weights)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "run"


def run_id(cfg: Config, label: dict | None = None) -> str:
    """Readable and deterministic: the swept values (or the name) plus the config hash."""
    if label:
        parts = []
        for key, value in label.items():
            shown = value
            if key in PATH_KEYS and isinstance(value, (str, list)):  # file names, not paths
                shown = "+".join(Path(v).stem if isinstance(v, str) else str(v)
                                 for v in (value if isinstance(value, list) else [value]))
            parts.append(f"{key.rpartition('.')[2]}-{shown}")
        words = "_".join(parts)
    else:
        words = cfg.name
    return f"{slug(words)}-{config_hash(cfg)}"
