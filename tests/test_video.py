"""Video: clips read from real files (made here with Pillow and ffmpeg), optical flow on
synthetic clips whose motion is known, Ruder's consistency check against a hand-made
expectation and against a loop-by-loop port of his C++ checker, warping against np.roll and
hand-computed bilinear values, and the temporal term against a numpy loop and finite
differences."""

import dataclasses
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import scipy.ndimage as ndi
from keras import ops
from PIL import Image

from pipeline import autodiff, config, model
from pipeline.images import ImageError
from pipeline.losses import Objective, temporal_loss
from pipeline.stylize import stylize
from pipeline.video import consistency, flow, frames, temporal
from pipeline.video.frames import ClipError

# --------------------------------------------------------------------------- clips made here


def _solid_frames(count, shape=(32, 48)):
    """Frames of flat grey levels 20, 60, 100, ...: each frame recognisable after lossy video
    coding (flat areas survive H.264 within a few levels)."""
    return [np.full((*shape, 3), 20 + 40 * k, np.uint8) for k in range(count)]


def _write_mp4(path, pixels, fps=12):
    h, w = pixels[0].shape[:2]
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "rawvideo",
           "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-pix_fmt",
           "yuv420p", "-c:v", "libx264", "-qp", "0", str(path)]
    subprocess.run(cmd, input=b"".join(p.tobytes() for p in pixels), check=True)
    return path


def _one_line_naming(exc_info, path):
    message = str(exc_info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_video_file_is_probed_and_read_in_order(tmp_path):
    clip = _write_mp4(tmp_path / "clip.mp4", _solid_frames(6), fps=12)
    info = frames.probe(clip)
    assert (info.count, info.shape, info.fps, info.files) == (6, (32, 48), 12.0, None)
    chosen = info.select(1, None, 2)
    got = list(frames.read_frames(info, chosen))
    assert [i for i, _ in got] == [1, 3, 5]
    for i, frame in got:
        assert frame.dtype == np.float32 and frame.shape == (32, 48, 3)
        assert np.abs(frame - (20 + 40 * i)).max() <= 3  # lossless luma, chroma rounding


def test_gif_is_a_clip_of_all_its_frames_once(tmp_path):
    """Read through ffmpeg, not Pillow (which gives a GIF's first frame): every frame once,
    even where its duration varies (no frames repeated to make a constant rate)."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    pictures = [Image.new("RGB", (20, 12), c) for c in colours]
    path = tmp_path / "anim.gif"
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=[100, 300, 100,
                                                                                 50], loop=0)
    info = frames.probe(path)
    assert info.count == 4 and info.shape == (12, 20)
    got = [tuple(f[6, 10]) for _, f in frames.read_frames(info)]
    assert got == colours


def test_frame_sequence_in_natural_order_with_selection(tmp_path):
    rng = np.random.default_rng(0)
    pixels = {n: rng.integers(0, 256, (10, 14, 3), dtype=np.uint8) for n in range(1, 12)}
    for n, p in pixels.items():  # f1.png .. f11.png, not zero-padded
        Image.fromarray(p).save(tmp_path / f"f{n}.png")
    info = frames.probe(str(tmp_path / "f*.png"))
    assert info.count == 11 and info.shape == (10, 14) and info.fps is None
    assert [f.rsplit("/", 1)[1] for f in info.files[:3]] == ["f1.png", "f2.png", "f3.png"]
    assert info.files[-1].endswith("f11.png")
    got = list(frames.read_frames(info, info.select(8, None, 1)))
    assert [i for i, _ in got] == [8, 9, 10]
    for i, frame in got:
        np.testing.assert_array_equal(frame, pixels[i + 1].astype(np.float32))
    assert frames.probe(tmp_path).count == 11  # a folder: all its files


def test_kind_of_source(tmp_path):
    assert frames.kind("a/*.png") == "frames"
    assert frames.kind(tmp_path) == "frames"
    assert frames.kind("x.MP4") == frames.kind("x.gif") == "video"
    assert frames.kind("x.jpg") == "image"


# --------------------------------------------------------------------------- bad clips


def test_unreadable_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n")
    with pytest.raises(ClipError) as e:
        frames.probe(path)
    assert "not a readable video" in _one_line_naming(e, path)


def test_video_cut_short_has_only_its_decodable_frames_counted(tmp_path):
    """The header says 6 frames; the data holds fewer. probe counts what decodes."""
    whole = _write_mp4(tmp_path / "whole.mp4", _solid_frames(6))
    fast = tmp_path / "fast.mp4"  # index first, so that a cut keeps the header
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(whole),
                    "-c", "copy", "-movflags", "faststart", str(fast)], check=True)
    data = fast.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) - 40])
    assert frames.probe(cut).count < 6


def test_video_without_frames(tmp_path):
    path = tmp_path / "sound.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i",
                    "anullsrc=r=8000:cl=mono", "-t", "0.2", str(path)], check=True)
    with pytest.raises(ClipError) as e:
        frames.probe(path)
    assert "no video frames" in _one_line_naming(e, path)


def test_glob_matching_nothing(tmp_path):
    pattern = str(tmp_path / "frames" / "*.png")
    with pytest.raises(ClipError) as e:
        frames.probe(pattern)
    assert "no frame files" in _one_line_naming(e, pattern)


def test_missing_video_file(tmp_path):
    with pytest.raises(ClipError) as e:
        frames.probe(tmp_path / "gone.mov")
    assert "not found" in _one_line_naming(e, tmp_path / "gone.mov")


def test_frames_of_different_sizes(tmp_path):
    for n in range(3):
        Image.new("RGB", (16, 12) if n != 1 else (12, 16)).save(tmp_path / f"{n:03d}.png")
    with pytest.raises(ClipError) as e:
        frames.probe(str(tmp_path / "*.png"))
    message = _one_line_naming(e, tmp_path / "001.png")
    assert "12x16" in message and "16x12" in message


@pytest.mark.parametrize("damage", ["garbage", "truncated", "corrupt", "truncated jpeg"])
def test_glob_with_one_broken_frame(tmp_path, damage):
    ext = "jpg" if "jpeg" in damage else "png"
    for n in range(4):  # noise: most of a file is pixel data, past the headers
        Image.fromarray(np.random.default_rng(n).integers(0, 256, (48, 64, 3), np.uint8)).save(
            tmp_path / f"{n:03d}.{ext}")
    broken = tmp_path / f"002.{ext}"
    data = bytearray(broken.read_bytes())
    if damage == "garbage":
        data = b"\x00 not an image at all"
    elif damage == "corrupt":  # complete, but a byte of the pixel data flipped
        data[data.index(b"IDAT") + 20] ^= 0xFF
    else:
        data = data[: len(data) * 3 // 4]
    broken.write_bytes(bytes(data))
    with pytest.raises(ClipError) as e:
        frames.probe(str(tmp_path / f"*.{ext}"))
    assert "not a readable image" in _one_line_naming(e, broken)


def test_frame_turned_by_exif_counts_with_its_turned_size(tmp_path):
    """load_image applies EXIF orientation: a frame stored 12x16 and turned a quarter (6) is
    16x12 like the others, so the clip is fine; the check reads it from the header."""
    Image.new("RGB", (16, 12)).save(tmp_path / "0.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (12, 16)).save(tmp_path / "1.jpg", exif=exif)
    info = frames.probe(str(tmp_path / "*.jpg"))
    assert info.shape == (12, 16)
    assert [f.shape for _, f in frames.read_frames(info)] == [(12, 16, 3)] * 2


def test_ffmpeg_missing(tmp_path, monkeypatch):
    clip = _write_mp4(tmp_path / "clip.mp4", _solid_frames(2))
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "no-such-ffmpeg"))
    with pytest.raises(ClipError) as e:
        frames.probe(clip)
    assert "needs ffmpeg" in _one_line_naming(e, clip)


def test_selection_of_no_frame(tmp_path):
    clip = _write_mp4(tmp_path / "clip.mp4", _solid_frames(3))
    info = frames.probe(clip)
    with pytest.raises(ClipError) as e:
        info.select(5, 9)
    _one_line_naming(e, clip)
    with pytest.raises(ClipError):
        info.select(0, None, 0)


def test_clip_error_is_an_image_error_and_a_value_error():
    assert issubclass(ClipError, ImageError) and issubclass(ClipError, ValueError)


# --------------------------------------------------------------------------- optical flow


def _texture(h, w, dx=0.0, dy=0.0, seed=0):
    """A sum of plane waves sampled at (x - dx, y - dy): the picture moved by exactly
    (dx, dy), sub-pixel shifts included, with no resampling."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((h, w))
    for _ in range(12):
        fx, fy = rng.uniform(-0.6, 0.6, 2)
        out += np.sin(fx * (xs - dx) + fy * (ys - dy) + rng.uniform(0, 2 * np.pi))
    grey = np.clip(128 + 25 * out, 0, 255)
    return np.stack([grey, 255 - grey, grey * 0.5 + 60], axis=-1).astype(np.float32)


@pytest.mark.parametrize("method", flow.METHODS)
@pytest.mark.parametrize("shift", [(1.5, -0.75), (-0.25, 2.5)])
def test_flow_recovers_a_known_subpixel_shift(method, shift):
    a = _texture(48, 56)
    b = _texture(48, 56, *shift)  # a's content moved by `shift`
    f = flow.optical_flow(a, b, method)
    assert f.shape == (48, 56, 2) and f.dtype == np.float32
    interior = f[8:-8, 8:-8].reshape(-1, 2)
    assert np.abs(interior - np.array(shift)).max() <= 0.5


def test_backward_flow_warps_the_previous_frame_onto_the_current():
    """The direction convention: flows(frame i, frame j) gives the flow from i to j first, and
    warping frame j along it reproduces frame i."""
    previous = _texture(48, 48)
    current = _texture(48, 48, 2.0, 1.0)
    backward, forward = flow.flows(current, previous, "dis")
    assert np.allclose(np.median(backward[8:-8, 8:-8], axis=(0, 1)), (-2.0, -1.0), atol=0.2)
    assert np.allclose(np.median(forward[8:-8, 8:-8], axis=(0, 1)), (2.0, 1.0), atol=0.2)
    warped, _ = flow.warp(previous, backward)
    assert np.abs(warped - current)[8:-8, 8:-8].mean() < 2.0
    assert np.abs(previous - current)[8:-8, 8:-8].mean() > 10  # the test can tell


def test_unknown_flow_method_and_frames_too_small_are_value_errors():
    with pytest.raises(ValueError, match="deepflow"):
        flow.optical_flow(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)), "deepflow")
    with pytest.raises(ValueError, match="8x8 frames"):  # not OpenCV's own exception
        flow.optical_flow(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)), "dis")


# --------------------------------------------------------------------------- warping


def test_warp_by_an_integer_shift_equals_roll():
    rng = np.random.default_rng(4)
    image = rng.uniform(0, 255, (9, 11, 3)).astype(np.float32)
    f = np.zeros((9, 11, 2), np.float32)
    f[..., 0], f[..., 1] = 2, -1  # out[y, x] = image[y - 1, x + 2]
    warped, inside = flow.warp(image, f)
    rolled = np.roll(image, shift=(1, -2), axis=(0, 1))
    np.testing.assert_array_equal(warped[1:, :-2], rolled[1:, :-2])
    expected_inside = np.zeros((9, 11), bool)
    expected_inside[1:, :-2] = True
    np.testing.assert_array_equal(inside, expected_inside)


def test_warp_is_bilinear_by_hand():
    image = np.array([[0.0, 10.0], [100.0, 200.0]], np.float32)[..., None]
    f = np.zeros((2, 2, 2), np.float32)
    f[0, 0] = (0.25, 0.5)  # halfway down, a quarter across from (0, 0)
    warped, inside = flow.warp(image, f)
    # top edge 0 + 0.25 * 10 = 2.5; bottom 100 + 0.25 * 100 = 125; halfway: 63.75
    assert warped[0, 0, 0] == pytest.approx(63.75)
    assert warped[1, 1, 0] == 200.0 and inside.all()


def test_prev_warped_fills_what_the_flow_takes_outside_from_the_content():
    previous = np.full((6, 8, 3), 50.0, np.float32)
    content = np.full((6, 8, 3), 200.0, np.float32)
    f = np.zeros((6, 8, 2), np.float32)
    f[..., 0] = -3  # each pixel comes from 3 to its left: the first 3 columns from outside
    start = flow.prev_warped(previous, f, content)
    assert (start[:, :3] == 200).all() and (start[:, 3:] == 50).all()


# --------------------------------------------------------------------------- consistency


def _moving_block_flows():
    """Exact flows of a 4 x 5 block moving 2 px right over a still background, 12 x 16 px:
    in frame j it covers rows 4-7, columns 3-7; in frame i columns 5-9."""
    backward = np.zeros((12, 16, 2), np.float32)  # frame i -> j
    backward[4:8, 5:10, 0] = -2
    forward = np.zeros((12, 16, 2), np.float32)  # frame j -> i
    forward[4:8, 3:8, 0] = 2
    return backward, forward


def test_consistency_of_a_moving_block_by_hand():
    backward, forward = _moving_block_flows()
    expected = np.ones((12, 16), np.float32)
    # Motion boundaries: where the central difference of the backward flow straddles the
    # block's edge: columns 4, 5, 9, 10 of its rows, rows 3, 4, 7, 8 of its columns.
    expected[4:8, [4, 5, 9, 10]] = 0
    expected[[3, 4, 7, 8], 5:10] = 0
    # Disoccluded: the background the block uncovered, columns 3-4 (was the block in j).
    expected[4:8, 3:5] = -1
    # Outside: the last column and row, whose bilinear cell reaches past the frame.
    expected[:, -1] = 0
    expected[-1, :] = 0
    np.testing.assert_array_equal(consistency.marks(backward, forward), expected)
    hard = consistency.reliable(backward, forward, smooth=0)
    np.testing.assert_array_equal(hard, np.clip(expected, 0, 1))
    # Ruder's smoothing: a Gaussian of sigma 0.8 over 5 taps, mirrored edges, then 0..1.
    smoothed = np.clip(ndi.gaussian_filter(expected.astype(np.float64), 0.8, mode="reflect",
                                           truncate=2.0), 0, 1)
    np.testing.assert_allclose(consistency.reliable(backward, forward), smoothed, atol=1e-6)
    assert consistency.reliable(backward, forward)[4:8, 3:5].max() == 0  # stays excluded


def _ruder_checker_loop(flow1, flow2):
    """consistencyChecker.cpp's checkConsistency, pixel by pixel, in float64. Returns the marks
    (255 -> 1, 0, -255 -> -1) and, per pixel, how far it was from flipping a threshold."""
    h, w = flow1.shape[:2]

    def at(y, x):  # NFilter's mirrored edges
        y = -1 - y if y < 0 else (2 * h - 1 - y if y >= h else y)
        x = -1 - x if x < 0 else (2 * w - 1 - x if x >= w else x)
        return flow1[y, x].astype(np.float64)

    out = np.ones((h, w))
    margin = np.full((h, w), np.inf)
    for ay in range(h):
        for ax in range(w):
            dx = 0.5 * (at(ay, ax + 1) - at(ay, ax - 1))
            dy = 0.5 * (at(ay + 1, ax) - at(ay - 1, ax))
            edge = (dx ** 2).sum() + (dy ** 2).sum()
            u2, v2 = float(flow1[ay, ax, 0]), float(flow1[ay, ax, 1])
            bx, by = ax + u2, ay + v2
            x1, y1 = int(np.floor(bx)), int(np.floor(by))
            x2, y2 = x1 + 1, y1 + 1
            if x1 < 0 or x2 >= w or y1 < 0 or y2 >= h:
                out[ay, ax] = 0
                continue
            alpha_x, alpha_y = bx - x1, by - y1
            f = flow2.astype(np.float64)
            a = (1 - alpha_x) * f[y1, x1] + alpha_x * f[y1, x2]
            b = (1 - alpha_x) * f[y2, x1] + alpha_x * f[y2, x2]
            u, v = (1 - alpha_y) * a + alpha_y * b
            cx, cy = bx + u, by + v
            lhs = (cx - ax) ** 2 + (cy - ay) ** 2
            rhs = 0.01 * (u2 * u2 + v2 * v2 + u * u + v * v) + 0.5
            margin[ay, ax] = abs(lhs - rhs)
            if lhs >= rhs:
                out[ay, ax] = -1
                continue
            bound = 0.01 * (u2 * u2 + v2 * v2) + 0.002
            margin[ay, ax] = min(margin[ay, ax], abs(edge - bound))
            if edge > bound:
                out[ay, ax] = 0
    return out, margin


def test_consistency_matches_a_port_of_ruders_checker():
    """Smooth random flows with a fold (so that every rule fires somewhere), checked both ways:
    our vectorised check against his loops, and the smoothed weights against scipy's filter."""
    rng = np.random.default_rng(7)
    h, w = 20, 26
    flow1 = ndi.gaussian_filter(rng.normal(0, 6, (h, w, 2)), (2, 2, 0)).astype(np.float32)
    flow1[8:14, 10:18] += (2.5, -1.0)  # a moving patch: boundaries
    flow2 = (-flow1 + rng.normal(0, 0.4, (h, w, 2))).astype(np.float32)
    flow2[3:9, 2:9] += (3.0, 2.0)  # disagreement: disocclusions
    expected, margin = _ruder_checker_loop(flow1, flow2)
    assert {-1, 0, 1} <= set(np.unique(expected))  # every outcome is exercised
    got = consistency.marks(flow1, flow2)
    clear = margin > 1e-3  # float32 here, float64 there: leave exact ties aside
    assert clear.mean() > 0.98
    np.testing.assert_array_equal(got[clear], expected[clear])
    smoothed = np.clip(ndi.gaussian_filter(got.astype(np.float64), 0.8, mode="reflect",
                                           truncate=2.0), 0, 1)
    np.testing.assert_allclose(consistency.reliable(flow1, flow2), smoothed, atol=1e-6)


def _noise(h, w, seed, sigma=1.5):
    n = ndi.gaussian_filter(np.random.default_rng(seed).normal(size=(h, w)), sigma)
    return np.repeat(np.clip(128 + 60 * n / n.std(), 0, 255)[..., None], 3, axis=2)


def test_consistency_on_computed_flow_excludes_the_uncovered_background():
    """A textured block moves 4 px right over a textured background (64 px frames): with DIS
    flows, the background it uncovered gets (almost) no weight, while the still background
    and the block's inside keep theirs."""
    background = _noise(64, 64, 1)
    block = _noise(24, 24, 2) * 0.6 + 60

    def frame(x):
        out = background.copy()
        out[20:44, x:x + 24] = block
        return out.astype(np.float32)

    backward, forward = flow.flows(frame(20), frame(16), "dis")
    weights = consistency.reliable(backward, forward)
    assert weights[20:44, 16:20].mean() < 0.1  # uncovered
    assert weights[24:40, 24:40].mean() > 0.9  # the block, tracked
    still = np.ones((64, 64), bool)
    still[16:48, 12:48] = False
    still[:3], still[-3:], still[:, :3], still[:, -3:] = False, False, False, False
    assert weights[still].mean() > 0.95


def test_closest_first_by_hand():
    """Ruder's closestFirst: each farther frame keeps only what closer ones leave, clipped."""
    w1 = np.array([[1.0, 0.0, 0.0, 0.5]])
    w2 = np.array([[1.0, 1.0, 0.0, 0.8]])
    w4 = np.array([[1.0, 1.0, 1.0, 1.0]])
    c1, c2, c4 = consistency.closest_first([w1, w2, w4])
    np.testing.assert_allclose(c1, [[1.0, 0.0, 0.0, 0.5]])
    np.testing.assert_allclose(c2, [[0.0, 1.0, 0.0, 0.3]])  # 0.8 - 0.5
    np.testing.assert_allclose(c4, [[0.0, 0.0, 1.0, 0.2]])  # 1 - 0.5 - 0.3


# --------------------------------------------------------------------------- temporal term


def _temporal_loop(x, warped, weights):
    """sum over frames k, pixels (i, j) and channels c of w_k(i, j) (x - warped_k)^2, over D."""
    h, w, channels = x.shape
    total = 0.0
    for k in range(warped.shape[0]):
        for i in range(h):
            for j in range(w):
                for c in range(channels):
                    total += weights[k, i, j] * (float(x[i, j, c]) - warped[k, i, j, c]) ** 2
    return total / (h * w * channels)


def test_temporal_loss_matches_a_numpy_loop():
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 255, (5, 7, 3)).astype(np.float32)
    warped = rng.uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
    weights = (rng.uniform(size=(2, 5, 7)) > 0.4) * rng.uniform(size=(2, 5, 7))
    weights = weights.astype(np.float32)
    assert float(temporal_loss(x, warped, weights)) == pytest.approx(
        _temporal_loop(x, warped, weights), rel=1e-5)
    # One previous frame, unstacked: the same as a stack of one.
    assert float(temporal_loss(x, warped[0], weights[0])) == pytest.approx(
        _temporal_loop(x, warped[:1], weights[:1]), rel=1e-5)


def test_temporal_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(6)
    warped = rng.uniform(0, 255, (6, 6, 3)).astype(np.float32)
    weights = rng.uniform(size=(6, 6)).astype(np.float32)
    weights[:, :2] = 0
    w_t, c_t = ops.convert_to_tensor(warped), ops.convert_to_tensor(weights)
    vg = autodiff.value_and_grad(lambda x: (temporal_loss(x, w_t, c_t), {}), [])
    x = rng.uniform(0, 255, (6, 6, 3)).astype(np.float32)
    _, _, grad = vg(x)
    assert np.all(grad[:, :2] == 0)  # weightless pixels pull nowhere
    for _ in range(3):
        d = rng.normal(size=x.shape).astype(np.float32)
        h = 8.0  # central differences are exact for a quadratic: a long step, less rounding
        numeric = (vg(x + h * d)[0] - vg(x - h * d)[0]) / (2 * h)
        assert numeric == pytest.approx(float(np.sum(grad.astype(np.float64) * d)), rel=1e-3)


def test_objective_adds_the_temporal_term_only_when_given():
    """Same network, same targets: with `temporal` the total grows by weight x the term (the
    loop's value) and `temporal` joins the terms; without it the objective is unchanged. The
    whole objective's gradient with the term matches finite differences."""
    cfg = config.Config(content="c.png", style=["s.png"])
    cfg.model = dataclasses.replace(cfg.model, weights="random", pooling="avg",
                                    content_layers=["block2_conv1"],
                                    style_layers=["block1_conv1", "block2_conv1"])
    cfg.loss = config.LossConfig(content_weight=1.0, style_weight=1e-3, tv_weight=1.0)
    extractor, names, _ = model.feature_extractor(cfg.model, seed=0)
    rng = np.random.default_rng(10)
    content, style, x = (rng.uniform(0, 255, (12, 12, 3)).astype(np.float32) for _ in range(3))
    warped = rng.uniform(0, 255, (12, 12, 3)).astype(np.float32)
    weights = (rng.uniform(size=(12, 12)) > 0.3).astype(np.float32)
    plain = Objective(extractor, names, cfg, content, [style])
    video = Objective(extractor, names, cfg, content, [style], temporal=(warped, weights, 7.0))
    total0, terms0 = plain(ops.convert_to_tensor(x))
    total1, terms1 = video(ops.convert_to_tensor(x))
    assert list(terms0) == list(plain.terms) == ["content", "style", "tv"]
    assert list(terms1) == list(video.terms) == ["content", "style", "tv", "temporal"]
    loop = _temporal_loop(x, warped[None], weights[None])
    assert float(terms1["temporal"]) == pytest.approx(loop, rel=1e-5)
    assert float(total1) == pytest.approx(float(total0) + 7.0 * loop, rel=1e-5)
    vg = autodiff.value_and_grad(video, extractor.variables)
    x = rng.uniform(50, 200, (12, 12, 3)).astype(np.float32)
    _, _, grad = vg(x)
    for _ in range(2):
        d = rng.normal(size=x.shape).astype(np.float32)
        d /= np.linalg.norm(d)
        numeric = (vg(x + 0.5 * d)[0] - vg(x - 0.5 * d)[0]) / 1.0
        assert numeric == pytest.approx(float(np.sum(grad.astype(np.float64) * d)), rel=2e-2)


def test_ruder_temporal_weight_reproduces_his_term():
    """His WeightedContentLoss on his preprocessed pixels (0..1 images x 256, BGR, minus the
    mean; target and input times sqrt(c); an MSE), times his 1e3, equals ours times the
    converted weight."""
    rng = np.random.default_rng(8)
    x = rng.uniform(0, 255, (6, 5, 3))
    w = rng.uniform(0, 255, (6, 5, 3))
    c = rng.uniform(size=(6, 5))
    mean_bgr = np.array([103.939, 116.779, 123.68])

    def caffe(img):
        return (img / 255 * 256)[..., ::-1] - mean_bgr

    root = np.sqrt(c)[..., None]
    his = 1e3 * np.mean((caffe(x) * root - caffe(w) * root) ** 2)
    ours = temporal.RUDER_TEMPORAL_WEIGHT * float(
        temporal_loss(x.astype(np.float32), w.astype(np.float32), c.astype(np.float32)))
    assert ours == pytest.approx(his, rel=1e-5)


def test_targets_warp_each_previous_frame_and_weigh_closest_first():
    rng = np.random.default_rng(9)
    prev1, prev2 = (rng.uniform(0, 255, (8, 9, 3)).astype(np.float32) for _ in range(2))
    back1 = np.zeros((8, 9, 2), np.float32)
    back1[..., 0] = 1  # frame i-1: content moved 1 px left since
    back2 = np.zeros((8, 9, 2), np.float32)
    back2[..., 1] = 2  # frame i-2: 2 px up
    r1 = np.ones((8, 9), np.float32)
    r1[:, :4] = 0
    r2 = np.ones((8, 9), np.float32)
    warped, weights = temporal.targets([prev1, prev2], [back1, back2], [r1, r2])
    assert warped.shape == (2, 8, 9, 3) and weights.shape == (2, 8, 9)
    np.testing.assert_array_equal(warped[0, :, :-1], prev1[:, 1:])
    np.testing.assert_array_equal(warped[1, :-2], prev2[2:])
    np.testing.assert_array_equal(weights[0], r1)
    np.testing.assert_array_equal(weights[1], 1 - r1)


# --------------------------------------------------------------------------- flicker


def test_warping_error_by_hand():
    frame = np.zeros((2, 2, 3), np.float32)
    previous = np.zeros((2, 2, 3), np.float32)
    previous[0, 0] = 30  # differs by 30 at one pixel, all channels
    previous[1, 1] = 90  # and by 90 at another, which has no weight
    weights = np.array([[1.0, 1.0], [0.5, 0.0]])
    still = np.zeros((2, 2, 2), np.float32)
    # sum c |d| over channels: 3 * 30 * 1; over sum c * 3 = 2.5 * 3
    assert temporal.warping_error(frame, previous, still, weights) == pytest.approx(90 / 7.5)


def test_warping_error_follows_the_motion():
    """A stylised clip that moves exactly with its content has no flicker; the same frames
    unmoved do."""
    previous = _texture(32, 32)
    current = _texture(32, 32, 3.0, 0.0)
    backward = np.zeros((32, 32, 2), np.float32)
    backward[..., 0] = -3
    weights = np.ones((32, 32), np.float32)
    weights[:, :3] = 0  # came from outside
    assert temporal.warping_error(current, previous, backward, weights) < 1e-3
    assert temporal.warping_error(current, previous, np.zeros_like(backward), weights) > 10


@pytest.mark.parametrize("method", ["scipy", "lbfgs"])
def test_frames_sharing_compiled_functions_equal_frames_compiled_each_alone(method):
    """A clip's frames share their compiled value-and-gradient and device loop, each frame's
    targets passed as arguments (autodiff.Shared). Three frames (the first without the
    temporal term, two with it, each with its own content and warped previous frame) come
    out bit for bit as when each frame compiles its own functions with its targets as
    constants; the two later frames compiled one function (per kind) between them."""
    cfg = config.Config(content="c.png", style=["s.png"], size=24, seed=3)
    cfg.model = dataclasses.replace(cfg.model, weights="random",
                                    content_layers=["block2_conv1"],
                                    style_layers=["block1_conv1", "block2_conv1"])
    cfg.optimizer = dataclasses.replace(cfg.optimizer, method=method, iterations=6)
    network = model.feature_extractor(cfg.model, cfg.seed)
    rng = np.random.default_rng(12)
    style = rng.uniform(0, 255, (24, 24, 3)).astype(np.float32)
    frames_ = [rng.uniform(0, 255, (18, 24, 3)).astype(np.float32) for _ in range(3)]
    temporals = [None] + [(rng.uniform(0, 255, (18, 24, 3)).astype(np.float32),
                           (rng.uniform(size=(18, 24)) > 0.3).astype(np.float32), 50.0)
                          for _ in range(2)]
    shared = autodiff.Shared()

    def frame(k, shared):
        result, _ = stylize(cfg, frames_[k], [style], network=network, temporal=temporals[k],
                            shared=shared)
        return result.image

    alone = [frame(k, None) for k in range(3)]
    together = [frame(k, shared) for k in range(3)]
    for k in range(3):
        assert np.array_equal(alone[k], together[k]), f"frame {k + 1} differs"
    # Frames 2 and 3 differ from each other (their targets were theirs, not frame 2's).
    assert not np.array_equal(together[1], together[2])
    kinds = 1 if method == "scipy" else 2  # the value-and-gradient; with lbfgs also the loop
    assert len(shared.compiled) == 2 * kinds  # frame 1's, and one for frames 2 and 3
