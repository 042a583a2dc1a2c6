"""The objective computed tile by tile: prints larger than memory, with the same loss and the
same gradient as the whole image, not an approximation of them.

Why it is exact. Every term of the objective (DESIGN.md) is a sum over feature positions, or a
function of such sums: a content term sums squared differences over positions; a Gram matrix
G = F^T F / N (masked: (F m)^T (F m) / sum(m^2)) sums outer products over positions; the style
term is a function of the Grams. So if every feature position of every layer is computed
exactly and counted exactly once, the sums, and so the loss, are the whole image's:

- A position of a layer depends only on the pixels of its receptive field (geometry.py
  computes it from the architecture: VGG19's block5_conv1 sees 156 px, its own 16 px cell
  widened by 70 px on each side). A tile runs the network on a window: its core widened by
  that margin (the halo), clipped at the image's true edges, where the network's own zero
  padding applies as it does for the whole image. Windows start on multiples of the deepest
  layer's stride, so every pooling pairs the same pixels as in the whole image, and the odd
  last row or column is floored the same way. The core's features are then the whole image's,
  up to the order of floating-point sums inside a convolution.
- Each layer's features are cropped to the tile's core (at that layer's resolution); the cores
  partition the image, so each position of each layer belongs to exactly one tile.
- The gradient: L depends on a tile's core features F_t only through the sums they add to, so
  dL/dF_t comes from dL/dG = 2 (G - A) / C^2 (the mean-squared Gram loss), a global quantity
  but a constant once G is known. Hence two passes per evaluation: pass 1, forward only, sums
  the Grams and the content term; pass 2, forward and backward, differentiates each tile's
  <F_t^T F_t, dL/dG> / N plus its content sums, whose gradient is the whole objective's
  through that tile. Pixel gradients of overlapping windows add up, as the chain rule adds
  the paths through different positions. TV needs no network: it is taken on the whole image.

How this differs from the tiles of other style-transfer tools. ProGamerGov/Neural-Tile and
albarji/neural-style-docker stylise overlapping tiles one by one and feather them together:
each tile matches the style's statistics on its own, so style features come out at the tile's
scale and the seams need blending. crowsonkb's Caffe style_transfer builds one global Gram
target from tiles but compares each tile's own Gram with it: a different objective, whose
optimum is not the whole image's. Here the loss and its gradient are the whole image's
(tests/test_tile.py compares them with losses.Objective to 1e-4); only the memory differs.

What it costs. Each evaluation runs the network forward twice and backward once, on windows
larger than their cores (interior windows are core + 150 px a side for VGG19 to block5_conv1;
a core at the image's edge takes the room of the halo it does not need). Each layer is cropped
to the cone the deeper layers still read, so the deep layers do little more than the core's
work. benchmarks/bench_tiles.py measures the time against the whole image's. Memory is bounded
by the largest window, plus what grows with the image however it is tiled: the pixels, their
gradient, the content and style images, the content targets and the optimiser's vectors.

geometry.py: receptive fields, windows and cores (no framework: the estimate can use it).
objective.py: the network on one window, the targets, and TiledValueAndGrad, an
autodiff.ValueAndGrad. optimize.device.compile_host drives the device optimisers with it, one
iteration per call.
"""
