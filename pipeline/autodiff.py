"""The one backend-specific piece: a compiled value-and-gradient of the objective, compiled
optimiser loops that call it, and the compiled functions of a tile (pipeline/tile): a forward
pass, and the gradient of a tile's share of the objective.

Everything else is written in keras.ops and runs on any Keras backend; taking a gradient with
respect to an input, and compiling a function, are not part of keras.ops, so each backend
gets its few lines here.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

# (pixels (H, W, 3) float32) -> (total, {term: value}, gradient (H, W, 3) float32)
ValueAndGrad = Callable[[np.ndarray], tuple[float, dict, np.ndarray]]


class Shared:
    """Compiled functions shared by objectives that differ in their targets alone: a clip's
    frames (one network, one run's settings, frames of one size; each frame's content and
    temporal targets its own). Each function is compiled once per kind, shape and structure of
    the targets, with the targets as arguments (losses.Objective.inputs), and each objective
    calls it with its own. Without it every frame compiles anew: lbfgs on JAX, 3 frames at
    96 px, 12 iterations each, on a 2-core CPU (load 5): a later frame took 21.6 s compiling
    its own loop and 8.5 s sharing one (XLA compiles on the host, on a GPU too); scipy on
    TensorFlow, whose trace is cheap, 2.1-2.3 s either way. The frames are the same bit for
    bit. One per clip run: a function holds on to the first objective's network and
    settings."""

    def __init__(self):
        self.compiled: dict = {}

    def get(self, key, make: Callable):
        if key not in self.compiled:
            self.compiled[key] = make()
        return self.compiled[key]


def signature(objective) -> str:
    """What a function compiled for `objective` depends on beyond its network and settings:
    its terms and the shapes of its inputs (Shared's key)."""
    shapes = keras.tree.map_structure(lambda a: tuple(a.shape), objective.inputs)
    return repr((type(objective).__name__, tuple(objective.terms), shapes))


def value_and_grad(objective, variables, shared: Shared | None = None) -> ValueAndGrad:
    """Compile `objective(x) -> (total, terms)` for the active Keras backend.

    `variables` are the Keras variables the objective reads (the network's weights); the JAX
    version passes them as arguments so that they are not baked into the compiled program.
    The objective's targets (`inputs`, where it has them) are arguments too, and with
    `shared` the function is compiled once for every objective of the same signature.
    """
    inputs = _targets(objective)

    def make():
        return gradient(lambda x, inputs: _call(objective, x, inputs), variables)

    step = make() if shared is None else shared.get(("value_and_grad", signature(objective)),
                                                    make)
    return lambda x: _to_host(*step(x, inputs))


def gradient(fn, variables) -> Callable:
    """Compile `fn(x, *args) -> (value, aux)` into a function of (x, *args) giving
    (value, aux, d value / d x) as backend tensors. `args` and `aux` are arrays or nested
    lists and dicts of them; `variables` as for value_and_grad. One compile per shape."""
    backend = _backend()
    return _tensorflow_gradient(fn) if backend == "tensorflow" else _jax_gradient(fn, variables)


def function(fn, variables) -> Callable:
    """Compile `fn(*args) -> outputs` (no gradient) for the active backend; outputs are
    backend tensors. One compile per shape."""
    if _backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, autograph=False)
    import jax

    def pure(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(*args)

    run = jax.jit(pure)
    values = [v.value for v in variables]
    return lambda *args: run(values, *args)


class _NoRetracingWarning:
    """Drops TensorFlow's "N out of the last N calls to <function> triggered tf.function
    retracing" warning, which counts traces across every function object made in a loop."""

    def filter(self, record) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def many_functions() -> None:
    """Say that this process compiles many functions on purpose, each traced once (the tiled
    objective: one per window frame, a few dozen at most), so that TensorFlow's warning about
    functions made in a loop does not fill a run's log; other warnings stay. JAX has none."""
    if _backend() != "tensorflow":
        return
    import logging

    logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _NoRetracingWarning) for f in logger.filters):
        logger.addFilter(_NoRetracingWarning())


def once(fn, variables) -> Callable:
    """`fn(*args) -> outputs` (no gradient) for a function called about once per shape (the
    targets): eagerly on TensorFlow, where a trace costs more than a run; compiled on JAX,
    whose eager ops are compiled one by one, for every new shape again."""
    return fn if _backend() == "tensorflow" else function(fn, variables)


def compiled_loop(objective, variables, program, shared: Shared | None = None,
                  key=()) -> Callable:
    """Compile `program(vg, state, n) -> outputs` for the active Keras backend.

    `program` is written in keras.ops (a while_loop of optimiser iterations, say); `vg(x)`,
    which it may call any number of times, returns (total, terms, gradient) as tensors of
    the same compiled program, so the whole loop runs on the device without the host.
    `state` is a dict of arrays and `n` an int; neither shape nor `n` causes a recompile.
    Returns a function of (state, n) giving `program`'s outputs as backend tensors. The
    objective's targets are arguments (as for value_and_grad); with `shared`, the loop is
    compiled once per `key` (what else shapes `program`: the optimiser) and signature.
    """
    def make():
        if _backend() == "tensorflow":
            return _tensorflow_loop(objective, program)
        return _jax_loop(objective, variables, program)

    inputs = _targets(objective)
    loop = make() if shared is None else shared.get(("loop", key, signature(objective)), make)
    return lambda state, n: loop(state, n, inputs)


def environment() -> dict:
    """Versions and device, recorded with every run: numbers are only comparable within one."""
    import importlib.metadata
    import platform

    versions = {"python": platform.python_version()}
    for package in ("keras", "tensorflow", "jax", "scipy", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"
    else:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        device = f"gpu: {gpus[0].name}" if gpus else "cpu"
    return {**versions, "backend": backend, "device": device}


def devices() -> list[str]:
    """Every device the active backend can compute on, as it names them."""
    if keras.backend.backend() == "jax":
        import jax

        return [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()]
    import tensorflow as tf

    return [d.name.removeprefix("/physical_device:") for d in tf.config.list_physical_devices()]


def _to_host(total, terms, grad):
    return float(total), {k: float(v) for k, v in terms.items()}, np.asarray(grad)


def _backend() -> str:
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        raise RuntimeError(f"Keras backend '{backend}' is not supported: use tensorflow or jax")
    return backend


def _tensorflow_gradient(fn):
    import tensorflow as tf

    # No autograph: the objective branches on Python values only, and tracing is faster.
    @tf.function(autograph=False)
    def step(x, *args):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value, aux = fn(x, *args)
        return value, aux, tape.gradient(value, x)

    return lambda x, *args: step(tf.constant(x), *args)


def _jax_gradient(fn, variables):
    import jax

    def pure(x, values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(x, *args)

    step = jax.jit(jax.value_and_grad(pure, has_aux=True))
    values = [v.value for v in variables]

    def call(x, *args):
        (value, aux), grad = step(x, values, *args)
        return value, aux, grad

    return call


def _targets(objective):
    """The targets a compiled objective takes as arguments (losses.Objective.inputs); None for
    a function of x alone. Arguments even for one objective alone, not constants: XLA folds
    constants into the program and rounds differently, so a clip's frames would differ with
    and without Shared (measured on JAX: by up to 1 grey level after 12 iterations, which
    the next frames, starting from it, amplify)."""
    return getattr(objective, "inputs", None)


def _call(objective, x, inputs):
    """objective(x) with the given targets (its own, or another objective's like it)."""
    return objective(x) if inputs is None else objective(x, inputs)


def _tensorflow_loop(objective, program):
    import tensorflow as tf

    @tf.function
    def run(state, n, inputs):
        def vg(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                total, terms = _call(objective, x, inputs)
            return total, terms, tape.gradient(total, x)

        return program(vg, state, n)

    return lambda state, n, inputs: run({k: tf.convert_to_tensor(v) for k, v in state.items()},
                                        tf.constant(n, tf.int32), inputs)


def _jax_loop(objective, variables, program):
    import jax

    value_and_grad = jax.value_and_grad(lambda x, inputs: _call(objective, x, inputs),
                                        has_aux=True)

    def pure(values, state, n, inputs):
        def vg(x):
            (total, terms), grad = value_and_grad(x, inputs)
            return total, terms, grad

        # The weights are arguments, not constants baked into the program (as in _jax).
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return program(vg, state, n)

    run = jax.jit(pure)
    values = [v.value for v in variables]
    return lambda state, n, inputs: run(values, state, np.int32(n), inputs)
