"""Where tiles lie: each layer's receptive field, computed from the architecture, and the cut
of an image into windows (the pixels a tile runs through the network) and cores (the feature
positions it owns). Plain integers, no framework: the memory estimate can import it.

Coordinates are (start, stop) pixel ranges along one side of the image; a feature position p
of a layer with stride j stands for the pixels [p j, (p + 1) j). The network's layers are
those of model.vgg: KERNEL x KERNEL convolutions with 'same' zero padding, then POOL x POOL
pooling with stride POOL (VGG's), which drops an odd last row or column.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import BLOCK_CONVS, nearest_multiple

KERNEL = 3  # model.vgg's convolutions ('same' padding: (KERNEL - 1) / 2 positions each side)
POOL = 2  # model.vgg's pooling: windows of POOL x POOL, stride POOL


@dataclass(frozen=True)
class Field:
    """What one feature position of a layer sees of the input image.

    Position p depends on the pixels [p j - margin, p j + j + margin), j = stride: its own
    cell of j pixels widened by `margin` on both sides, so size = 2 margin + stride. (About p j
    the field is lopsided, each pooling window looking one position further right; about the
    cell it is even, which is why a core made of whole cells needs the same halo both sides.)
    VGG19's block5_conv1: stride 16, margin 70, size 156.
    """

    stride: int
    margin: int
    size: int


def receptive_fields(network: str) -> dict[str, Field]:
    """Every convolution layer of `network` ('vgg19', 'vgg16'), by Keras name, in order.

    A convolution reaches (KERNEL - 1) / 2 positions further each side, at the current stride
    j; a pooling reaches POOL - 1 positions further right (its window starts at its own
    position) and multiplies the stride by POOL.
    """
    fields = {}
    stride, left, right = 1, 0, 0  # the field of the current layer: [p j - left, p j + right]
    reach = (KERNEL - 1) // 2
    for block, convs in enumerate(BLOCK_CONVS[network], start=1):
        for i in range(1, convs + 1):
            left, right = left + reach * stride, right + reach * stride
            fields[f"block{block}_conv{i}"] = Field(stride, left, left + right + 1)
        right += (POOL - 1) * stride
        stride *= POOL
    return fields


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def check_core(core: int, stride: int) -> None:
    """A core side must be a positive multiple of the stride, so that cores start on whole
    pooling windows at every layer."""
    if core <= 0 or core % stride:
        nearest = nearest_multiple(core, stride)
        raise ValueError(f"a tile core of {core!r} px is not a positive multiple of {stride} px "
                         f"(the stride of the deepest layer used); the nearest valid value is "
                         f"{nearest}")


@dataclass(frozen=True)
class Span:
    """One tile along one side: the pixels [start, stop) run through the network; the feature
    positions of the pixels [core_start, core_stop) are this tile's, at every layer."""

    start: int
    stop: int
    core_start: int
    core_stop: int


@dataclass(frozen=True)
class Halo:
    """How far a window reaches beyond its core: `before` is the deepest field's margin rounded
    up to its stride (so that windows start on whole pooling windows), `after` the margin."""

    stride: int
    before: int
    after: int

    @classmethod
    def of(cls, field: Field) -> Halo:
        return cls(field.stride, round_up(field.margin, field.stride), field.margin)


def halo(network: str, layers) -> Halo:
    """The halo for an objective on `layers` of `network`: its deepest layer's field."""
    fields = receptive_fields(network)
    return Halo.of(fields[max(layers, key=list(fields).index)])


def spans(length: int, core: int, halo: Halo) -> list[Span]:
    """Cut one side of `length` px into tiles whose windows are at most
    core + halo.before + halo.after px, the window of a core with a halo on both sides.

    Interior cores are `core` px; a core at an edge of the image has no halo beyond it, so it
    takes that room instead (it is up to `core` + halo px): the same bound on each window, and
    fewer tiles. Core boundaries are multiples of the stride; the last core ends at the image's
    end, odd pixels included (the network's own pooling drops them, here as in the whole)."""
    check_core(core, halo.stride)
    limit = core + halo.before + halo.after
    out, core_start = [], 0
    while core_start < length:
        start = max(0, core_start - halo.before)
        if start + limit >= length:
            core_stop = length
        else:
            core_stop = (start + limit - halo.after) // halo.stride * halo.stride
        out.append(Span(start, min(length, core_stop + halo.after), core_start, core_stop))
        core_start = core_stop
    return out


@dataclass(frozen=True)
class Tile:
    rows: Span
    cols: Span


def tiling(shape: tuple[int, int], core: int, halo: Halo) -> list[Tile]:
    """The tiles of an image of `shape` (H, W), row by row."""
    return [Tile(r, c) for r in spans(shape[0], core, halo) for c in spans(shape[1], core, halo)]


def window_limit(core: int, halo: Halo) -> int:
    """The longest side of any window: what a tile's memory grows with."""
    return core + halo.before + halo.after


def objective_halo(cfg) -> Halo:
    """The halo of a run's objective (config.Config): its network, its deepest layer."""
    return halo(cfg.model.network, [*cfg.model.content_layers, *cfg.model.style_layers])


def stage_core(cfg, shape: tuple[int, int]) -> int | None:
    """The one decision whether a stage is tiled: the core its objective is computed with, for
    an image of `shape` (H, W), or None: whole. Only a size tiles (config.tile as given, or as
    the estimate chose it for `auto`), and only where it cuts the image into more than one
    window: a tile larger than the image, or a small stage of coarse to fine, runs whole."""
    core = cfg.tile
    if isinstance(core, bool) or not isinstance(core, int):
        return None
    h = objective_halo(cfg)
    return core if len(spans(shape[0], core, h)) * len(spans(shape[1], core, h)) > 1 else None


# ------------------------------------------------------------------ crops inside the network


@dataclass(frozen=True)
class Frame:
    """A span seen from inside its window (what a compiled tile function depends on):
    the window's length, the core's range in it, and whether the core ends at the image's end
    (then every layer keeps its natural, floored end)."""

    length: int
    core_start: int
    core_stop: int
    at_end: bool

    @classmethod
    def of(cls, span: Span, image_length: int) -> Frame:
        return cls(span.stop - span.start, span.core_start - span.start,
                   span.core_stop - span.start, span.core_stop == image_length)


def keep_range(frame: Frame, field: Field, deepest_field: Field) -> tuple[int, int | None]:
    """The positions of a layer (relative to the window, at its stride) that the layers after
    it still need: the core widened by what remains of the deepest field. None: up to the
    layer's natural end. Cropping each layer to this shrinks the work of the deeper layers to
    the cone they need, instead of the whole window at every layer.

    The crops keep every pooling pairing positions as in the whole image: what remains of the
    field after pooling k is a sum of strides of 2^k or more, so the crop before it starts on
    a multiple of 2^k pixels from the (aligned) core, an even position at its input."""
    rest = deepest_field.margin - field.margin  # a multiple of this layer's stride
    lo = max(0, frame.core_start - rest) // field.stride
    hi = None if frame.at_end else (frame.core_stop + rest) // field.stride
    return lo, hi


def core_range(frame: Frame, field: Field) -> tuple[int, int | None]:
    """The core's positions at a layer, relative to the window; None: to the natural end."""
    return (frame.core_start // field.stride,
            None if frame.at_end else frame.core_stop // field.stride)
