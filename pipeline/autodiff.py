"""The one backend-specific piece: a compiled value-and-gradient of the objective, and
compiled optimiser loops that call it.

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
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tensorflow(objective)
    if backend == "jax":
        return _jax(objective, variables)
    raise RuntimeError(f"Keras backend '{backend}' is not supported: use tensorflow or jax")


def compiled_loop(objective, variables, program) -> Callable:
    """Compile `program(vg, state, n) -> outputs` for the active Keras backend.

    `program` is written in keras.ops (a while_loop of optimiser iterations, say); `vg(x)`,
    which it may call any number of times, returns (total, terms, gradient) as tensors of
    the same compiled program, so the whole loop runs on the device without the host.
    `state` is a dict of arrays and `n` an int; neither shape nor `n` causes a recompile.
    Returns a function of (state, n) giving `program`'s outputs as backend tensors.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tensorflow_loop(objective, program)
    if backend == "jax":
        return _jax_loop(objective, variables, program)
    raise RuntimeError(f"Keras backend '{backend}' is not supported: use tensorflow or jax")


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


def _tensorflow(objective) -> ValueAndGrad:
    import tensorflow as tf

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total, terms = objective(x)
        return total, terms, tape.gradient(total, x)

    return lambda x: _to_host(*step(tf.constant(x)))


def _jax(objective, variables) -> ValueAndGrad:
    import jax

    def pure(x, values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return objective(x)

    step = jax.jit(jax.value_and_grad(pure, has_aux=True))
    values = [v.value for v in variables]

    def call(x):
        (total, terms), grad = step(x, values)
        return _to_host(total, terms, grad)

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
