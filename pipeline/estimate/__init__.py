"""How much memory and time a run will take on this machine, before it starts.

Not a table written by hand: a calibration measures real runs (random weights, the default
layers, the run's network, precision and optimiser method, one checkpoint taken as a run takes
it), each in a fresh process, and fits

    peak memory = a + b * pixels + c * style pixels (+ k * history * pixels, lbfgs)
    seconds per iteration = t + u * pixels (+ v * history * pixels, lbfgs)

which holds because every large buffer grows with a pixel count and the rest (the framework,
the weights) does not: VGG19's activations and their gradients, scipy's float64 vectors, with
the generated image's pixels; the style images' activations, computed once, forward only, when
the targets are made, with theirs; lbfgs's history, its while-loop copies and the history x
pixels temporaries of its products, with both the history and the pixels. The runs:

    two sizes, styles as large as the content (a, b, t, u);
    the smaller size with a style 4x as long (c: the only thing that changed is the style);
    lbfgs only: the larger size at history 200 (k, v against the same size at history 10).

scipy's history is not measured: its L-BFGS-B holds exactly 2 x history float64 vectors of
the image's size on the host, counted as such on the CPU (on a GPU they are not in the
device's memory). Memory is the process's peak RSS on the CPU (the whole process, since that is
what the machine must hold) and the backend's peak device memory on a GPU. The fit is cached
once per machine, backend, device, versions and setup (network, precision, method), under the
user's cache folder (PIPELINE_CACHE_DIR moves it), so only the first run on a machine pays for
it (~30-50 s on a 2-core CPU). A cache folder that cannot be written moves the cache to the
temporary directory, with a warning (see calibration).

Light on purpose: the deep-learning framework is imported only by the calibration's own
subprocesses, so `estimate`, `run` and the parent of a worker pool stay quick.

calibration.py measures a machine and caches the fit; figures.py applies a fit to one run,
whole or tile by tile; predict.py turns it into each run's estimate; `python -m
pipeline.estimate` is a calibration's measuring process.
"""

from pipeline.estimate.calibration import (
    CPU_SIZES,
    ENV_CACHE,
    ENV_SIZES,
    ENV_SKIP,
    GB,
    STYLE_FACTOR,
    EstimateError,
    cache_dir,
    cache_name,
    calibration,
    calibration_key,
    setup_of,
    skipped,
)
from pipeline.estimate.predict import (
    ENV_LIMIT,
    Estimate,
    Tiled,
    estimate,
    for_jobs,
    generated_shape,
    memory_limit,
    state_bytes,
)
