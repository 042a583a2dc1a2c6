"""The objective computed tile by tile: prints larger than memory, with the same loss and the
same gradient as the whole image, not an approximation of them.

Why it is exact. Every term of the objective (DESIGN.md) is a sum over feature positions, or a
function of such sums: a content term sums squared differences over positions; a Gram matrix
G = F^T F / N (masked: (F m)^T (F m) / sum(m^2)) sums outer products over positions; the style
term is a function of the Grams. So if every feature position of every layer is computed
exactly and counted exactly once, the sums, and so the loss, are the whole image's:

- A position of a layer depends only on the pixels of its receptive field (geometry.py
  computes it from the architecture: VGG19's block5_conv1 sees 156 px, its own 16 px cell
  widened by 70 px each side). A tile runs the network on a window: its core widened by that
  margin (the halo), clipped at the image's true edges, where the network's own zero padding
  applies as it does for the whole image. Windows start on multiples of the deepest layer's
  stride, so every pooling pairs the same pixels as in the whole image, and odd edges are
  floored the same way. Inside the window, the features of the core are then the whole
  image's, bit for bit up to the order of floating-point sums.
- Each layer's features are cropped to the tile's core (at that layer's resolution); the cores
  partition the image, so each position of each layer belongs to exactly one tile.
- The gradient: L depends on a tile's core features F_t only through the sums it adds to, so
  dL/dF_t = dL/dG : dG/dF_t + (content), with dL/dG = 2 (G - A) / C^2 for the mean-squared
  Gram loss: global, but a constant once G is known. Hence two passes per evaluation (pass 1
  forward only, summing the Grams; pass 2 forward and backward, each tile's surrogate
  <F_t^T F_t, stop_gradient(dL/dG)> / N plus its content sums), and pixel gradients of
  overlapping windows add up, as the chain rule adds the paths through different positions.

How this differs from the tiles of other style-transfer tools. ProGamerGov/Neural-Tile and
albarji/neural-style-docker stylise overlapping tiles one by one and feather them together:
each tile matches the style's statistics on its own, so style features come out at the tile's
scale and the seams need blending. crowsonkb's Caffe style_transfer builds one global Gram
target from tiles but compares each tile's own Gram with it: a different objective, whose
optimum differs from the whole image's. Here the loss and its gradient are the whole image's
(tests/test_tile.py compares them with losses.Objective to 1e-4); only the memory differs.

What it costs. Each evaluation runs the network forward twice and backward once on windows
larger than their cores: about (1 + 2 x 75 / core)^2 x 4/3 of the whole image's time for
VGG19 to block5_conv1, less the work saved by cropping each layer to what the deeper layers
still need (benchmarks/bench_tiles.py measures it). Memory is bounded by the largest window,
core + 150 px a side, plus what grows with the image whatever the tiling: the pixels, their
gradient, the content targets and the optimiser's vectors.

geometry.py: receptive fields, windows and cores (no framework). objective.py: the network on
one window, the targets and the tiled value-and-gradient.
"""
