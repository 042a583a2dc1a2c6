"""Make the video demo's clip: a slow pan and zoom over the demo's photo (the astronaut in
scikit-image's wheel), as a camera would film it, written as an H.264 mp4. `make video` runs
it first; the repository ships no video, only this (deterministic: the same pixels every time).

    python scripts/make_demo_clip.py OUT.mp4 [--frames 24] [--size 384] [--fps 12]

An existing OUT is kept (its bytes are its run id's): --force writes it again.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import config, images  # noqa: E402

PHOTO = "pkg:skimage/data/astronaut.png"


def frames(photo: Image.Image, count: int, size: int):
    """`count` frames, 4:3, `size` px wide: the window drifts right and down across the photo
    while it narrows by a fifth (a zoom in), each step a fraction of a pixel at the frame's
    scale, sampled bicubically at sub-pixel positions."""
    width, height = size, size * 3 // 4
    for t in np.linspace(0.0, 1.0, count):
        span = photo.width * (0.78 - 0.16 * t)  # the window's width, in photo pixels
        left = photo.width * (0.04 + 0.12 * t)
        top = photo.height * (0.06 + 0.06 * t)
        scale = span / width
        # Output pixel (x, y) reads the photo at (left + x * scale, top + y * scale).
        data = (scale, 0, left, 0, scale, top)
        yield np.asarray(photo.transform((width, height), Image.Transform.AFFINE, data,
                                         resample=Image.Resampling.BICUBIC))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=384, help="the frames' width (4:3)")
    parser.add_argument("--fps", type=float, default=12)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"{args.out}: kept (--force makes it again)")
        return
    import imageio_ffmpeg

    photo = images.load_image(config.expand_path(PHOTO, Path.cwd()))
    photo = Image.fromarray(photo.astype(np.uint8))
    width, height = args.size, args.size * 3 // 4
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    # One x264 thread: the same bytes on every machine, so the same run id.
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "rawvideo",
               "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{args.fps:g}", "-i", "-",
               "-c:v", "libx264", "-crf", "12", "-pix_fmt", "yuv420p", "-threads", "1",
               "-f", "mp4", str(tmp)]
    pixels = b"".join(f.tobytes() for f in frames(photo, args.frames, args.size))
    subprocess.run(command, input=pixels, check=True)
    tmp.replace(args.out)
    print(f"{args.out}: {args.frames} frames of {width}x{height} at {args.fps:g} fps")


if __name__ == "__main__":
    main()
