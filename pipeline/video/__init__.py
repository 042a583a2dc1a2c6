"""Video: clips and frame sequences stylised with temporal consistency (Ruder, Dosovitskiy and
Brox, "Artistic style transfer for videos", 2016; their code: manuelruder/artistic-videos).

- frames.py: a clip (a video file or a glob of frame images) checked cheaply and read into
  RGB float32 frames;
- flow.py: optical flow between two frames (OpenCV's DIS or Farneback) and backward warping;
- consistency.py: Ruder's forward-backward check (which pixels a flow can be trusted at) and
  his closest-first weights for long-term constraints;
- temporal.py: what a frame's temporal term needs (previous stylised frames warped onto it,
  with their weights), the flicker metric (warping error), and Ruder's weight converted.

The temporal term itself is a loss like the others: losses.temporal_loss.

Conventions. Frames are (H, W, 3) float32 RGB in 0..255, as images are everywhere. A flow is
(H, W, 2) float32: flow[y, x] = (dx, dy), the displacement of the pixel (x, y) of the frame it
is computed FROM to where that point is in the frame it points TO (OpenCV's and the Middlebury
.flo convention). For frame i and an earlier frame j = i - k, Ruder uses:
- the backward flow, from i to j: warp(stylised j, backward) puts the stylised frame j onto
  frame i (each pixel of i looks up where it came from in j: backward warping);
- the forward flow, from j to i: only to check the backward flow (consistency.py).
"""
