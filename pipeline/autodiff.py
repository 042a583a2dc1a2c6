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


def value_and_grad(objective, variables) -> ValueAndGrad:
    """Compile `objective(x) -> (total, terms)` for the active Keras backend.

    `variables` are the Keras variables the objective reads (the network's weights); the JAX
    version passes them as arguments so that they are not baked into the compiled program.
    """
    step = gradient(objective, variables)
    return lambda x: _to_host(*step(x))


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


def once(fn, variables) -> Callable:
    """`fn(*args) -> outputs` (no gradient) for a function called about once per shape (the
    targets): eagerly on TensorFlow, where a trace costs more than a run; compiled on JAX,
    whose eager ops are compiled one by one, for every new shape again."""
    return fn if _backend() == "tensorflow" else function(fn, variables)


def compiled_loop(objective, variables, program) -> Callable:
    """Compile `program(vg, state, n) -> outputs` for the active Keras backend.

    `program` is written in keras.ops (a while_loop of optimiser iterations, say); `vg(x)`,
    which it may call any number of times, returns (total, terms, gradient) as tensors of
    the same compiled program, so the whole loop runs on the device without the host.
    `state` is a dict of arrays and `n` an int; neither shape nor `n` causes a recompile.
    Returns a function of (state, n) giving `program`'s outputs as backend tensors.
    """
    if _backend() == "tensorflow":
        return _tensorflow_loop(objective, program)
    return _jax_loop(objective, variables, program)


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


def _tensorflow_loop(objective, program):
    import tensorflow as tf

    def vg(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total, terms = objective(x)
        return total, terms, tape.gradient(total, x)

    @tf.function
    def run(state, n):
        return program(vg, state, n)

    return lambda state, n: run({k: tf.convert_to_tensor(v) for k, v in state.items()},
                                tf.constant(n, tf.int32))


def _jax_loop(objective, variables, program):
    import jax

    value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def vg(x):
        (total, terms), grad = value_and_grad(x)
        return total, terms, grad

    def pure(values, state, n):
        # The weights are arguments, not constants baked into the program (as in _jax).
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return program(vg, state, n)

    run = jax.jit(pure)
    values = [v.value for v in variables]
    return lambda state, n: run(values, state, np.int32(n))
