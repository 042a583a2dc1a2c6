"""Adam on the device, in keras.ops, with the recipe of TensorFlow's style-transfer tutorial
converted exactly to this tool's pixels; run by the compiled loop of optimize.device.

The tutorial optimises pixels u in 0..1 with Adam(learning_rate=0.02, beta_1=0.99,
epsilon=0.1) (beta_2 left at 0.999) and clips u to 0..1 after each step. Keras's Adam moves

    u -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

with m, v the running means of g and g^2. Here x = 255 u. For the same objective the
gradient is g_x = g_u / 255, so m_x = m_u / 255 and sqrt(v_x) = sqrt(v_u) / 255, and

    x -= lr_x * c_t * m_u / (sqrt(v_u) + 255 eps_x).

For this to be 255 times the tutorial's step on u, lr_x = 255 lr = 5.1 and
eps_x = eps / 255 = 0.1 / 255: then every iterate is exactly 255 times the tutorial's, and
clipping to 0..255 is its clipping to 0..1. The betas are unitless and stay. Scaling the
loss by c scales m and sqrt(v) by c, so Adam ignores the loss's scale except through eps,
which is in gradient units: it damps only pixels whose gradient is comparable to it.
"""

from __future__ import annotations

import numpy as np
from keras import ops

LEARNING_RATE = 0.02 * 255  # 5.1 grey levels: the tutorial's 0.02 of the 0..1 range
BETA_1 = 0.99
BETA_2 = 0.999  # Keras's default, which the tutorial keeps
EPSILON = 0.1 / 255  # the tutorial's 0.1, in gradients per 0..255 pixel


class Adam:
    def init(self, x0: np.ndarray) -> dict:
        zeros = np.zeros_like(x0, np.float32)
        return {"m": zeros, "v": zeros, "t": np.float32(0)}

    def step(self, vg, state):
        x, g = state["x"], state["grad"]
        t = state["t"] + 1.0
        m = state["m"] + (g - state["m"]) * (1.0 - BETA_1)
        v = state["v"] + (ops.square(g) - state["v"]) * (1.0 - BETA_2)
        rate = LEARNING_RATE * ops.sqrt(1.0 - ops.power(BETA_2, t)) / (1.0 - ops.power(BETA_1, t))
        x_new = ops.clip(x - rate * m / (ops.sqrt(v) + EPSILON), 0.0, 255.0)
        total, terms, g_new = vg(x_new)
        new = {"x": x_new, "loss": total, "grad": g_new, "m": m, "v": v, "t": t}
        return new, total, terms, ops.ones(())
