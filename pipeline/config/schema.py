"""The schema of a run's configuration: typed dataclasses whose defaults are the one source of
truth, the constants every room shares (networks, layers, modes), and what a value means when
it is left unset (history by method, style layer weights by channels, style size).

Light on purpose: plain dataclasses, no framework, so that every room may import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field

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
VIDEO_INITS = ("prev_warped", "prev", "content")  # video.init: frames after the first
FLOW_METHODS = ("dis", "farneback")  # video.flow: see pipeline/video/flow.py
# Read through ffmpeg as clips (pipeline/video/frames.py). Pillow reads a GIF too, as its first
# frame: without a `video:` section a GIF stays the image it always was.
VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".gif", ".mpg", ".mpeg",
                    ".wmv", ".flv", ".ogv", ".ts", ".mts")
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
class FramesConfig:
    """Which frames of the source a clip takes, as a Python slice takes them (0 is the first
    frame; stop is not included; null: to the end)."""

    start: int = 0
    stop: int | None = None
    step: int = 1


@dataclass
class VideoConfig:
    """A `video:` section makes `content` a clip (Ruder, Dosovitskiy and Brox 2016): each frame
    is stylised in order, from the previous one warped along the optical flow and held to it
    where the flow is consistent. pipeline/video/ has the method and README "Video" the keys."""

    frames: FramesConfig = field(default_factory=FramesConfig)
    fps: float | None = None  # of result.mp4; None: the source's over frames.step (24 for images)
    init: str = "prev_warped"  # frames after the first: prev_warped | prev | content
    # Ruder's 1e3 on an MSE of his 0..256-scaled pixels, ours 0..255: 1e3 * (256/255)^2.
    # pipeline/video/temporal.py has the derivation; configs/recipes/artistic-videos.yaml too.
    temporal_weight: float = 1e3 * (256 / 255) ** 2
    # Iterations of the first frame, which starts from `init` as an image does; later frames
    # start from the previous one and take optimizer.iterations. None: 2 x optimizer.iterations
    # (Ruder's 2000 and 1000).
    first_iterations: int | None = None
    flow: str = "dis"  # dis | farneback (OpenCV)
    long_term: list[int] = field(default_factory=lambda: [1])  # [1, 2, 4]: Ruder's long-term
    consistency: bool = True  # Ruder's forward-backward check weighs the temporal term


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
    # Prints larger than memory (pipeline/tile): the same objective, computed tile by tile.
    # auto: whole when the estimate says the run fits, else the largest tile core that fits;
    # off: always whole; N: cores of N px a side, a multiple of tile_stride(model).
    tile: str | int = "auto"
    sweep: dict[str, list] = field(default_factory=dict)
    video: VideoConfig | None = None  # a clip: see VideoConfig


# Keys whose values are file paths: relative ones are resolved against the file that set them.
PATH_KEYS = ("content", "style", "init", "model.weights", "output_dir", "style_masks",
             "content_mask")
# Keys that change how a run is watched or stored, not the pixels it makes: left out of the hash.
# `tile` computes the same objective in other pieces (tests/test_tile.py: to 1e-4), so a run
# keeps its id however it is tiled, and `auto` may choose a core from the machine's memory.
# video.fps is result.mp4's playback rate: no frame changes with it (see video/clip.py).
UNHASHED_KEYS = ("name", "output_dir", "checkpoint_every", "log_every", "sweep", "tile",
                 "video.fps")
TILE_MODES = ("off", "auto")  # and a core size in pixels


# optimizer.history when not set. scipy's L-BFGS-B pays for each correction on the host (at
# 128 px, 100 of them cost 1.4x the seconds per iteration of 10; at 512 px 4-6x). The device
# L-BFGS pays little (its compact form is a few matrix products: 30 cost 1.01x of 10), and
# 30 reached a 1.4% lower loss after 300 iterations than 10 (100: no better than 30).
DEFAULT_HISTORY = {"scipy": 10, "lbfgs": 30}


def first_iterations(video: VideoConfig, optimizer: OptimizerConfig) -> int:
    """The first frame's iterations: video.first_iterations, or twice the later frames'."""
    if video.first_iterations is not None:
        return video.first_iterations
    return 2 * optimizer.iterations


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


def long_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) of an image scaled so that its longer side is `size`: the shape that
    images.resize_long_side makes, which the plan also needs from image headers alone."""
    if max(height, width) == size:
        return height, width
    scale = size / max(height, width)
    if width >= height:
        return max(1, round(height * scale)), size
    return size, max(1, round(width * scale))


def deepest_block(model: ModelConfig) -> int:
    """The deepest block of the layers asked for: it sees an image halved b - 1 times, so the
    image's short side must be at least 2 ** (b - 1) pixels."""
    return max(int(name[len("block")]) for name in (*model.content_layers, *model.style_layers))


def tile_stride(model: ModelConfig) -> int:
    """The stride of the deepest layer used, in pixels: a tile core is a multiple of it, so
    that cores start on whole pooling windows at every layer (pipeline/tile/geometry.py)."""
    return 2 ** (deepest_block(model) - 1)


def nearest_multiple(value: float, step: int) -> int:
    """The positive multiple of `step` nearest `value` (halves round up)."""
    return max(step, int((value + step / 2) // step) * step)


def normalised(weights: list[float] | None, count: int) -> list[float]:
    """Layer or blend weights scaled to sum to 1 (equal when None), as the objective uses
    them; the run id hashes weights that normalise to equal ones as None."""
    import numpy as np  # here, not above: the schema stays light for every room

    w = np.ones(count) if weights is None else np.asarray(weights, dtype=np.float64)
    return list(w / w.sum())


def style_size(cfg: Config, size: int | None = None) -> int:
    """The style images' long side for an image of long side `size` (default cfg.size):
    ceil, as neural-style's -style_scale computes it."""
    return math.ceil(cfg.style_scale * (size or cfg.size))


def section(hint) -> type | None:
    """The dataclass a field's type names, or holds as `X | None` (an optional section such
    as `video`); None for a leaf."""
    if dataclasses.is_dataclass(hint):
        return hint
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
        return inner[0]
    return None


def dotted_keys(cls=Config, prefix="") -> dict[str, type]:
    """Every leaf key of the schema, dotted ('loss.style_weight'), with its type."""
    out = {}
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if section(hint) is not None:
            out.update(dotted_keys(section(hint), prefix + f.name + "."))
        else:
            out[prefix + f.name] = hint
    return out


def style_list(style: str | list[str]) -> list[str]:
    return [style] if isinstance(style, str) else list(style)


def set_dotted(raw: dict, key: str, value) -> None:
    *heads, leaf = key.split(".")
    for head in heads:
        child = raw.get(head)
        if not isinstance(child, dict):
            child = raw[head] = {}
        raw = child
    raw[leaf] = value


def get_dotted(raw: dict, key: str):
    for part in key.split("."):
        raw = raw[part]
    return raw


def unknown_key(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if not close:  # a typo in the leaf alone: compare against leaves
        leaf = key.rpartition(".")[2]
        by_leaf = {k.rpartition(".")[2]: k for k in known}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1)]
    return "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
