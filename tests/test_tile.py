"""The objective tile by tile (pipeline/tile): receptive fields against the gradient of one
feature position, windows and cores against the fields they must cover, stitched features
against the whole network's, and the tiled loss and gradient against losses.Objective with
autodiff.value_and_grad (the independent computation), on TensorFlow and on JAX; then the
`tile` key as users meet it: its values, a run through the command line against the same run
whole, and the memory a tiled run holds as the image grows, measured in fresh processes."""

import ast
import dataclasses
import functools
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import ROOT, cli_env, run_cli, write_config, write_image
from keras import ops

from pipeline import autodiff, config, estimate, jobs, model, optimize
from pipeline.config import conv_layers
from pipeline.losses import Objective
from pipeline.optimize import device
from pipeline.stylize import GreyObjective, GreyValueAndGrad
from pipeline.tile import geometry
from pipeline.tile.objective import TiledValueAndGrad, TileNetwork

# Weights under which each term moves the gradient about as much as the others (with random
# VGG weights the style term's gradient is ~1000x the content term's per unit weight), so that
# an error in any one of them shows in the gradient.
BALANCED = {"content_weight": 1000.0, "style_weight": 1.0, "tv_weight": 100.0}


def network(name="vgg19", pooling="avg", layers=None, precision="float32", **loss):
    """A config and its extractor (random weights); `layers` replaces the style layers."""
    cfg = config.Config(content="c.png", style=["a.png", "b.png"], style_blend=[1.0, 3.0])
    cfg.model = dataclasses.replace(cfg.model, network=name, pooling=pooling, weights="random",
                                    precision=precision)
    if layers is not None:
        cfg.model = dataclasses.replace(cfg.model, style_layers=list(layers),
                                        style_layer_weights=None)
    cfg.loss = dataclasses.replace(cfg.loss, **loss)
    return cfg, *model.feature_extractor(cfg.model, seed=0)[:2]


# --------------------------------------------------------------------------- geometry


def test_receptive_fields_follow_the_architecture():
    """The issue's statement (VGG19's block5_conv1 sees 156 px), and the recurrence written
    out by hand for the first layers: a 3x3 conv adds one position each side at its stride,
    a 2x2 pooling one position on the right and doubles the stride."""
    fields = geometry.receptive_fields("vgg19")
    assert fields["block5_conv1"].size == 156 and fields["block5_conv1"].stride == 16
    assert [(f.stride, f.size) for f in list(fields.values())[:4]] == [
        (1, 3), (1, 5), (2, 5 + 1 + 2 * 2), (2, 10 + 2 * 2)]
    assert all(f.size == 2 * f.margin + f.stride for f in fields.values())
    assert list(geometry.receptive_fields("vgg16")) == list(conv_layers("vgg16"))
    # The halo comes from the deepest layer, in whatever order the layers are listed.
    assert geometry.halo("vgg19", ["block5_conv1", "block1_conv1", "block4_conv2"]) == \
        geometry.Halo(stride=16, before=80, after=70)
    assert geometry.halo("vgg16", ["block3_conv1", "block1_conv1"]) == geometry.Halo(4, 12, 10)


@pytest.mark.parametrize("network_name", ["vgg19", "vgg16"])
def test_receptive_fields_match_the_gradient_of_one_feature_position(network_name):
    """d F_l[p, p] / d pixels, summed over channels, with random weights and average pooling:
    non-zero on exactly the rows and columns the field says, at a layer of each kind: in the
    first block, after a pooling, and the default content and deepest style layers."""
    fields = geometry.receptive_fields(network_name)
    _, extractor, names = network(network_name, layers=["block1_conv2", "block2_conv1",
                                                        "block5_conv1"])
    fields = {n: fields[n] for n in names}  # and the content layer, block4_conv2
    # Each layer's position p sees [p j - margin, p j + j + margin); keep that inside.
    spots = {n: -(-f.margin // f.stride) + 1 for n, f in fields.items()}
    side = max((spots[n] + 2) * f.stride + f.margin for n, f in fields.items())

    def probe(x, choice):
        maps = extractor(model.preprocess(x[None]))
        value = sum(choice[i] * ops.sum(ops.cast(m[0, spots[n], spots[n], :], "float32"))
                    for i, (n, m) in enumerate(zip(names, maps)))
        return value, ()

    gradient = autodiff.gradient(probe, extractor.variables)
    x = np.random.default_rng(0).uniform(0, 255, (side, side, 3)).astype("float32")
    for i, (name, field) in enumerate(fields.items()):
        _, _, g = gradient(x, np.eye(len(names), dtype="float32")[i])
        seen = np.abs(ops.convert_to_numpy(g)).sum(axis=2) > 0
        start = spots[name] * field.stride - field.margin
        expected = np.arange(start, start + field.size)
        np.testing.assert_array_equal(np.flatnonzero(seen.any(axis=1)), expected, err_msg=name)
        np.testing.assert_array_equal(np.flatnonzero(seen.any(axis=0)), expected, err_msg=name)


@pytest.mark.parametrize("length", [1, 15, 16, 100, 182, 183, 200, 260, 513, 1030])
@pytest.mark.parametrize("core", [16, 32, 64, 256])
def test_cores_partition_every_layer_and_windows_cover_their_fields(length, core):
    """For every layer of VGG19 up to block5_conv1: the cores' positions (floored as the
    network floors) partition the layer's positions, and each core position's field lies in
    its window unless it leaves the image. Windows start on the deepest stride and none is
    longer than core + both halos."""
    fields = geometry.receptive_fields("vgg19")
    fields = {n: f for n, f in fields.items() if n <= "block5_conv1"}
    halo = geometry.halo("vgg19", ["block5_conv1"])
    spans = geometry.spans(length, core, halo)
    assert all(s.start % 16 == 0 for s in spans)
    assert all(s.stop - s.start <= geometry.window_limit(core, halo) for s in spans)
    for name, f in fields.items():
        owner = np.zeros(length // f.stride, int)
        for s in spans:
            positions = np.arange(s.core_start // f.stride, s.core_stop // f.stride)
            owner[positions] += 1
            if positions.size:
                need_lo = max(0, positions[0] * f.stride - f.margin)
                need_hi = min(length, (positions[-1] + 1) * f.stride + f.margin)
                assert s.start <= need_lo and need_hi <= s.stop, (name, s)
        assert np.all(owner == 1), name


def test_a_core_that_is_not_a_multiple_of_the_stride_names_the_nearest_valid_value():
    with pytest.raises(ValueError, match="nearest valid value is 96"):
        geometry.check_core(100, 16)
    with pytest.raises(ValueError, match="nearest valid value is 16"):
        geometry.check_core(0, 16)
    with pytest.raises(ValueError, match="nearest valid value is 112"):
        geometry.spans(300, 110, geometry.Halo(16, 80, 70))
    cfg, extractor, names = network()
    image = np.zeros((40, 48, 3), np.float32)
    with pytest.raises(ValueError, match="multiple of 16 px.*nearest valid value is 32"):
        TiledValueAndGrad(extractor, names, cfg, image, [image], 27)


# --------------------------------------------------------------------------- features


@pytest.mark.parametrize("network_name, pooling, deepest, shape, core", [
    ("vgg19", "max", "block5_conv1", (233, 213), 32),
    ("vgg16", "avg", "block4_conv2", (171, 205), 24),
])
def test_stitched_features_equal_the_whole_images_at_every_layer(network_name, pooling, deepest,
                                                                  shape, core):
    """Every conv layer up to the deepest (odd sizes, so poolings floor at the ends): the
    cores' features, put together, are what the network computes on the whole image, and the
    sums of the cores' Gram shares are the whole image's Gram matrices."""
    names = [n for n in conv_layers(network_name) if n <= deepest]
    _, extractor, _ = network(network_name, pooling, layers=names)
    image = np.random.default_rng(1).uniform(0, 255, (*shape, 3)).astype("float32")
    whole = extractor(model.preprocess(ops.convert_to_tensor(image[None])))
    net = TileNetwork(extractor, network_name)
    assert len(net.tiles(shape, core)) >= 4
    stitched, grams = net.targets(image, core, features=names, grams=names)
    for name, reference in zip(names, whole):
        reference = ops.convert_to_numpy(reference)[0]
        assert stitched[name].shape == reference.shape, name
        np.testing.assert_allclose(stitched[name], reference, rtol=1e-5,
                                   atol=1e-5 * np.abs(reference).max(), err_msg=name)
        flat = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
        gram = flat.T @ flat / flat.shape[0]
        np.testing.assert_allclose(grams[name], gram, rtol=1e-5, atol=1e-6 * np.abs(gram).max(),
                                   err_msg=name)


# --------------------------------------------------------------------------- the objective

CORE = 64


def inputs(shape, masks: bool):
    """Content, two styles, the generated image, a video frame's temporal term (a warped
    frame, its weights and the term's weight); with `masks`, a soft mask for the first style
    (the second everywhere) and a content mask."""
    rng = np.random.default_rng(2)
    h, w = shape
    content, x, warped = (rng.uniform(0, 255, (h, w, 3)).astype("float32") for _ in range(3))
    styles = [rng.uniform(0, 255, s + (3,)).astype("float32") for s in ((150, 200), (120, 190))]
    temporal = (warped, rng.uniform(0, 1, (h, w)).astype("float32"), 30.0)
    if not masks:
        return content, styles, x, None, None, temporal
    left = np.clip(np.linspace(1.2, -0.2, w), 0, 1)[None, :].repeat(h, 0).astype("float32")
    return (content, styles, x, [left, None], rng.uniform(0, 1, (h, w)).astype("float32"),
            temporal)


@functools.cache
def whole_and_tiled(network_name, pooling, shape, masks=True, precision="float32", core=CORE,
                    video=False):
    """The whole objective's value-and-gradient (losses.Objective, autodiff), the tiled one
    for the same arguments, and the generated image; kept for the tests that follow. `video`
    adds a video frame's temporal term."""
    cfg, extractor, names = network(network_name, pooling, precision=precision, **BALANCED)
    content, styles, x, style_masks, content_mask, temporal = inputs(shape, masks)
    temporal = temporal if video else None
    objective = Objective(extractor, names, cfg, content, styles, style_masks, content_mask,
                          temporal)
    whole = autodiff.value_and_grad(objective, extractor.variables)
    tiled = TiledValueAndGrad(extractor, names, cfg, content, styles, core, style_masks,
                              content_mask, temporal)
    return whole, tiled, x, objective


@pytest.fixture(scope="module", autouse=True)
def _forget_networks():
    """The networks kept for the tests that share them go when this module is done."""
    yield
    whole_and_tiled.cache_clear()


def errors(network_name, pooling, shape, masks=True, precision="float32", core=CORE,
           video=False) -> dict:
    """Relative differences, tiled against whole: the total, each term, and the gradient
    (its largest difference over its largest entry)."""
    whole, tiled, x, objective = whole_and_tiled(network_name, pooling, shape, masks, precision,
                                                 core, video)
    assert tiled.terms == objective.terms
    (total, terms, grad), (t_total, t_terms, t_grad) = whole(x), tiled(x)
    assert len(tiled.tiles) >= 2 and t_grad.shape == grad.shape and t_grad.dtype == np.float32
    out = {"total": abs(t_total - total) / abs(total),
           "gradient": float(np.abs(t_grad - grad).max() / np.abs(grad).max())}
    out.update({k: abs(t_terms[k] - terms[k]) / abs(terms[k]) for k in terms})
    return out


# 200 x 260 with a 64 px core is 1 x 2 tiles (a window is up to 64 + 150 px); 232 x 280 is
# 2 x 3, one with halos on both sides, here with the blended objective and a video frame's
# temporal term. The sizes are odd at several poolings.
CASES = [("vgg19", "avg", (200, 260), True), ("vgg19", "max", (200, 260), True),
         ("vgg16", "avg", (200, 260), True), ("vgg16", "max", (200, 260), True),
         ("vgg19", "max", (232, 280), False, "float32", CORE, True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:4])))
def test_tiled_objective_equals_the_whole_one(case):
    found = errors(*case)
    print(case, found)
    assert max(found.values()) < 1e-4, found


def test_tiled_objective_equals_the_whole_one_on_jax():
    """One of the cases above on JAX, the blended one with masks (the rest of the code is the
    same keras.ops): what is JAX's own is autodiff's compiled tile functions. VGG19's halo cuts
    this image into 2 tiles (VGG16's smaller one into 6, each window frame a compilation)."""
    code = ("import keras, test_tile as t; assert keras.backend.backend() == 'jax'; "
            "print('ERRORS', [t.errors(*t.CASES[0])])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests",
                          env=cli_env(KERAS_BACKEND="jax"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = ast.literal_eval(proc.stdout.split("ERRORS", 1)[1].strip())
    print("jax", found)
    assert all(max(e.values()) < 1e-4 for e in found), found


def test_bfloat16_network_tiled_agrees_with_whole():
    """bfloat16 rounds each layer's output; windows of other shapes may round a few values
    the other way, so the agreement is bfloat16's, not float32's; Grams and losses stay
    float32 (the gradient is float32)."""
    found = errors("vgg19", "avg", (120, 200), precision="bfloat16", core=32)
    print("bfloat16", found)
    assert max(found.values()) < 1e-2, found


@pytest.fixture
def vgg19_pair():
    return whole_and_tiled(*CASES[0])


def test_a_grey_image_tiled_has_the_whole_grey_objective(vgg19_pair):
    """preserve_colors: luminance optimises one channel seen as three: tile by tile
    (stylize.GreyValueAndGrad), the loss and the gradient (summed over the three channels) are
    the whole GreyObjective's."""
    _, tiled, x, objective = vgg19_pair
    y = x.mean(axis=-1, keepdims=True)
    whole = autodiff.value_and_grad(GreyObjective(objective), objective.extractor.variables)
    (total, terms, grad), (t_total, t_terms, t_grad) = whole(y), GreyValueAndGrad(tiled)(y)
    assert t_grad.shape == grad.shape == y.shape
    assert abs(t_total - total) <= 1e-4 * abs(total)
    for k in terms:
        assert abs(t_terms[k] - terms[k]) <= 1e-4 * abs(terms[k]), k
    assert np.abs(t_grad - grad).max() <= 1e-4 * np.abs(grad).max()


def test_device_methods_run_tiled_one_iteration_per_call(vgg19_pair):
    """device.compile_host: Adam driven by device.minimize with the tiled objective, eagerly,
    against the compiled whole run: the same trace. (L-BFGS's first step is 1 / |g|_1 along
    -g, so small that its first curvature pair is float32 noise either way: compiled and
    eager whole runs part after two iterations, as tiled and whole do.)"""
    whole, tiled, x, objective = vgg19_pair
    extractor = objective.extractor
    runs = []
    for compiled in (device.compile_method(optimize.device_method("adam"), objective,
                                           extractor.variables),
                     device.compile_host(optimize.device_method("adam"), tiled)):
        steps = []
        result = device.minimize(compiled, x, 2, on_step=steps.append, checkpoint_every=1)
        runs.append((result, steps))
    (r_whole, s_whole), (r_tiled, s_tiled) = runs
    assert [s.iteration for s in s_tiled] == [1, 2]
    assert s_tiled[0].image is not None and set(s_tiled[0].state()) >= {"m", "v", "t"}
    np.testing.assert_allclose([s.total for s in s_tiled], [s.total for s in s_whole],
                               rtol=1e-5)
    # Adam divides by sqrt(v) + 0.1 / 255: where a gradient is that small, its step (up to
    # 5.1 grey levels) follows float32 noise, so a few pixels part by tenths of a level.
    difference = np.abs(r_tiled.image - r_whole.image)
    assert difference.mean() < 1e-3 and difference.max() < 1.0, (difference.mean(),
                                                                   difference.max())


def test_a_tiled_lbfgs_run_resumes_bit_for_bit(vgg19_pair):
    """L-BFGS tile by tile, 3 iterations, against 1 iteration, its checkpoint's state (as a
    checkpoint saves it), then 2 more from it: the same images and losses, to the bit."""
    _, tiled, x, _ = vgg19_pair
    method = optimize.device_method("lbfgs", 5)
    steps = []
    whole_run = device.minimize(device.compile_host(method, tiled), x, 3, on_step=steps.append,
                                checkpoint_every=1)
    first = steps[0]
    state = {k: ops.convert_to_numpy(v) for k, v in first.state().items()}
    again = []
    resumed = device.minimize(device.compile_host(method, tiled), first.image, 3,
                              on_step=again.append, done=(1, first.evaluations, first.seconds),
                              state=state, checkpoint_every=1)
    assert [s.iteration for s in again] == [2, 3]
    assert [s.total for s in again] == [s.total for s in steps[1:]]
    np.testing.assert_array_equal(resumed.image, whole_run.image)


# --------------------------------------------------------------------------- the `tile` key


def test_tile_values_and_the_run_id(tmp_path):
    """off (YAML 1.1 reads a bare off as false), auto and sizes; a size is a positive multiple
    of the deepest layer's stride (16 px for block5, 4 for block3), and none of them changes
    the run id: the objective is the same."""
    path = write_config(tmp_path, size=64)
    for text, value in (("off", "off"), ("auto", "auto"), ("64", 64), ("4096", 4096)):
        assert config.load(path, [f"tile={text}"]).tile == value
    assert config.load(path).tile == "auto"
    ids = {config.run_id(c) for t in ("off", "auto", "64", "2048")
           for _, c in config.expand(config.load(path, [f"tile={t}"]))}
    assert len(ids) == 1
    shallow = ["model.content_layers=[block2_conv1]",
               "model.style_layers=[block1_conv1,block3_conv1]"]
    assert config.load(path, [*shallow, "tile=12"]).tile == 12
    with pytest.raises(config.ConfigError, match=r"tile: 30 px .* multiple of 4 px .*block3.*"
                                                 r"nearest valid value is 32"):
        config.load(path, [*shallow, "tile=30"])
    # On the command line: exit 2, one line naming the key and the nearest valid value.
    done = run_cli("validate", path, "--set", "tile=100")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "tile: 100 px" in line and "nearest valid value is 96" in line


def test_a_stage_runs_tiled_only_where_the_tile_cuts_it():
    """geometry.stage_core, the one decision: a size, and more than one window (VGG19 to
    block5_conv1: a window is the core + 150 px)."""
    cfg = config.Config(tile=64)
    assert geometry.stage_core(cfg, (187, 224)) == 64  # 64 + 150 < 224: two windows
    assert geometry.stage_core(cfg, (187, 214)) is None  # one window holds it: whole
    assert geometry.stage_core(dataclasses.replace(cfg, tile=4096), (3000, 4000)) is None
    for mode in ("off", "auto"):
        assert geometry.stage_core(dataclasses.replace(cfg, tile=mode), (3000, 4000)) is None


def test_a_run_tile_by_tile_through_the_command_line_follows_the_whole_trace(tmp_path):
    """`python -m pipeline run` with `sweep: {tile: [off, 64]}`: the same run whole and tile
    by tile, coarse to fine. The first stage (96 px) fits in one window, so both run it whole;
    the second (224 x 187 px, 2 iterations) is cut into 2 tiles. Every trace row agrees to
    1e-3; trace rows, metrics.json and the run's config.yaml say how each ran."""
    path = write_config(tmp_path, name="tiles", size=224, scales=[96, 224],
                        scale_iterations=[1, 2], checkpoint_every=0, sweep={"tile": ["off", 64]})
    done = run_cli("run", path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tile: a 64 px core, 2 tiles" in done.stderr  # the estimate line, as the run starts
    runs = {}
    for folder in (tmp_path / "out" / "tiles").glob("tile-*"):
        rows = [json.loads(line) for line in (folder / "trace.jsonl").read_text().splitlines()]
        metrics = json.loads((folder / "metrics.json").read_text())
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        runs[str(saved["tile"])] = rows, metrics
    (whole, whole_metrics), (tiled, tiled_metrics) = runs["off"], runs["64"]
    assert [(r["stage"], r["tile"]) for r in whole] == [(1, None), (2, None), (2, None)]
    assert [(r["stage"], r["tile"]) for r in tiled] == [(1, None), (2, 64), (2, 64)]
    assert (whole_metrics["tile"], whole_metrics["tiles"]) == (None, 1)
    assert (tiled_metrics["tile"], tiled_metrics["tiles"]) == (64, 2)
    assert tiled_metrics["status"] == whole_metrics["status"] == "completed"
    for name in ("total", "content", "style", "tv"):
        np.testing.assert_allclose([r[name] for r in tiled], [r[name] for r in whole],
                                   rtol=1e-3, err_msg=name)
    np.testing.assert_allclose(list(tiled_metrics["loss"].values()),
                               list(whole_metrics["loss"].values()), rtol=1e-3)


# --------------------------------------------------------------------------- memory

# One run in a fresh process: stylize at SIZE, tile by tile with a 256 px core, then whole
# (one iteration: enough for its peak); VmHWM after each. A network cut at block1_conv2 (a 2 px
# halo) is quick, so the sizes can be large enough for the arrays to stand out from the noise.
MEMORY_CHILD = """
import json, sys
import numpy as np
from pipeline import framework
framework.load()
from pipeline import config
from pipeline.stylize import stylize

def peak():
    with open('/proc/self/status') as f:
        return int(next(l for l in f if l.startswith('VmHWM:')).split()[1]) * 1024

size = int(sys.argv[1])
rng = np.random.default_rng(0)
content = rng.uniform(0, 255, (*config.long_side_shape(267, 320, size), 3)).astype('float32')
style = rng.uniform(0, 255, (size // 2, size // 2, 3)).astype('float32')
cfg = config.Config(content='c', style=['s'], size=size, checkpoint_every=0,
                    style_scale=0.5, tile=256, model=config.ModelConfig(**MODEL),
                    optimizer=config.OptimizerConfig(iterations=2, history=1))
found, last = {}, {}
for tile in (256, 'off'):
    cfg.tile, cfg.optimizer.iterations = tile, 2 if tile == 256 else 1
    stylize(cfg, content, [style], on_step=lambda step: last.update(step=step))
    found[str(tile)] = [peak(), last['step'].tiles]
print('PEAKS', json.dumps(found))
"""
SHALLOW = {"weights": "random", "content_layers": ["block1_conv2"],
           "style_layers": ["block1_conv1", "block1_conv2"]}


def test_a_tiled_runs_memory_grows_only_by_its_pixel_and_optimiser_arrays(tmp_path):
    """scipy (history 1, 2 iterations: every correction stored) at 320 and 640 px with a
    fixed 256 px core, each size in a fresh process, both at once: from one size to the other
    the tiled peak grows by what the estimate counts per pixel (the pixel arrays, the content
    targets, the style's pixels, scipy's vectors: estimate.predict, within 25%), and by less
    than half of what the same runs grow whole, whose network's activations grow with the
    image."""
    code = MEMORY_CHILD.replace("**MODEL", f"**{SHALLOW!r}")
    sizes = (320, 640)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(size)], cwd=ROOT,
                              env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for size in sizes]
    found = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        found.append(json.loads(out.split("PEAKS", 1)[1]))
    (small, large) = found
    # A 2 px halo: windows of at most 260 px. 320 x 267 px: cores end at 258 and at the
    # end, 2 x 2 tiles; 640 x 534: at 258, 514 and the end, 3 x 3.
    assert small["256"][1] == 4 and large["256"][1] == 9
    assert small["off"][1] == large["off"][1] == 1
    tiled_growth = large["256"][0] - small["256"][0]
    whole_growth = large["off"][0] - small["off"][0]
    # What the estimate says the same growth is: its figures with no fixed part and no
    # network (a made-up calibration of zeros), for these runs' shapes and method.
    cal = {"memory": [0.0, 0.0], "style": 0.0, "seconds": [0.0, 0.0], "history": None,
           "device": "cpu"}
    images = tmp_path / "images"
    images.mkdir()
    for name, shape in (("content", (267, 320)), ("style", (160, 160))):
        write_image(images / f"{name}.png", shape)
    predicted = []
    for size in sizes:
        cfg = config.from_dict({"content": str(images / "content.png"),
                                "style": [str(images / "style.png")], "size": size,
                                "style_scale": 0.5, "tile": 256, "model": SHALLOW,
                                "optimizer": {"history": 1}})
        predicted.append(estimate.estimate(cfg, "x", cal, math.inf).peak_bytes)
    expected = predicted[1] - predicted[0]
    print(f"tiled growth {tiled_growth / 1e6:.0f} MB, estimate {expected / 1e6:.0f} MB, "
          f"whole growth {whole_growth / 1e6:.0f} MB")
    assert tiled_growth == pytest.approx(expected, rel=0.25)
    assert tiled_growth < 0.5 * whole_growth


# --------------------------------------------------------------------------- runs that do not fit

# A run cheap enough to run: 80 x 96 px, one iteration, a network cut at block2_conv1 (a halo of
# a few pixels, so that small cores cut it into a few tiles).
SMALL_AND_SHALLOW = ["size=96", "optimizer.iterations=1", "checkpoint_every=0",
                     "model.content_layers=[block2_conv1]",
                     "model.style_layers=[block1_conv1,block2_conv1]"]


def sets(*values):
    return [arg for value in values for arg in ("--set", value)]


def machine_with(folder, fixed: float, per_pixel: float) -> dict:
    """The environment of a machine whose calibration (of the default setup, cached as a
    calibration caches it) says a run needs `fixed` + `per_pixel` x pixels bytes whole, and
    nothing per style pixel: figures a test can work out by hand, with no calibration to pay."""
    key = estimate.calibration_key()
    data = {"key": key, "memory": [fixed, per_pixel], "style": 0.0, "seconds": [0.01, 1e-6],
            "history": None, "device": "cpu", "device_memory": None}
    (folder / "cache").mkdir()
    (folder / "cache" / estimate.cache_name(key)).write_text(json.dumps(data))
    return {"PIPELINE_CACHE_DIR": str(folder / "cache")}


def test_a_run_that_does_not_fit_whole_is_refused_off_and_tiled_by_auto(tmp_path):
    """PIPELINE_MEMORY_LIMIT a megabyte under what the run needs whole: with `tile: off`, or a
    tile larger than the image (whole again), the command exits 2 before anything starts, in
    one line naming the largest size that fits (80 px, worked out by hand from a made-up
    calibration) and suggesting tile: auto; with `tile: auto` it says in one line which core
    it chose, runs tile by tile and completes, and the run's files say so."""
    path = write_config(tmp_path, name="big")
    # 40 x 48 px scaled to 96: 80 x 96 px, whole 1 GB + 20 kB x 7680 px; 80 px: 67 x 80 px.
    whole = 1e9 + 20e3 * 80 * 96
    limit = whole - 1e6
    env = {**machine_with(tmp_path, 1e9, 20e3), "PIPELINE_MEMORY_LIMIT": str(int(limit))}
    (job,) = jobs.plan(config.load(path, SMALL_AND_SHALLOW))
    for tile in ("off", "4096"):
        done = run_cli("run", path, *sets(*SMALL_AND_SHALLOW, f"tile={tile}"), env=env)
        assert done.returncode == 2, done.stderr[-3000:]
        (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
        found = re.search(r"the largest size that fits is (\d+) .*or tile: auto \(--set "
                          r"tile=auto\)", line)
        assert found and "at 96x80" in line, line
        assert not (tmp_path / "out" / "big" / job.run_id).exists()  # nothing started
    assert found[1] == "80"

    done = run_cli("run", path, *sets(*SMALL_AND_SHALLOW, "tile=auto"), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if "tile: auto chose" in x]
    core, tiles = map(int, re.search(r"a (\d+) px core, (\d+) tiles", line).groups())
    peak = float(re.search(r"peak memory ([\d.]+) GB", line)[1]) * 1e9
    assert peak <= limit + 5e6 and core % 2 == 0 and core < 96 and tiles > 1
    folder = tmp_path / "out" / "big" / job.run_id
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (metrics["status"], metrics["tile"], metrics["tiles"]) == ("completed", core, tiles)
    assert [json.loads(r)["tile"] for r in (folder / "trace.jsonl").read_text().splitlines()] \
        == [core]
    assert yaml.safe_load((folder / "config.yaml").read_text())["tile"] == core


def test_the_estimate_names_the_optimiser_where_its_memory_dominates(tmp_path):
    """At 4096 px, scipy's L-BFGS-B (history 10) keeps at least 2 x 10 float64 vectors of the
    image (s and y, three channels: 6.7 GB here), which no tile shrinks; under a 12 GB cap
    `python -m pipeline estimate` says the run does not fit at any core, that scipy keeps most
    of it, and that Adam (no history) would fit, with the core it would take, while lbfgs
    (history 30, float32) would not."""
    path = write_config(tmp_path, name="print", size=4096)
    env = {**machine_with(tmp_path, 1e9, 20e3), "PIPELINE_MEMORY_LIMIT": "12G"}
    done = run_cli("estimate", path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = done.stdout.splitlines()[0]
    assert "4096x3413: tile: auto finds no core that fits" in line and "does NOT fit" in line, \
        line
    peak = float(re.search(r"peak memory ([\d.]+) GB", line)[1])
    kept = float(re.search(r"scipy's L-BFGS-B keeps ([\d.]+) GB of it, which tiling cannot "
                           r"shrink", line)[1])
    assert 2 * 10 * 8 * 3 * 4096 * 3413 / 1e9 <= kept and 0.5 * peak <= kept <= peak
    found = re.search(r"optimizer\.method adam \(([\d.]+) GB with a (\d+) px core\) would fit",
                      line)
    assert found, line
    assert float(found[1]) <= 12 and int(found[2]) % 16 == 0
    assert "lbfgs" not in line.split("cannot shrink")[1]


def test_a_refusal_where_no_size_fits_names_none():
    """Where the fixed part alone exceeds the limit, the refusal names no size (size 0 is not
    one a user can set)."""
    one = estimate.Estimate("r", 96, 80, 2e9, 1.0, 1.0, 1e9, "cpu", largest_size=0)
    assert "no size fits whole" in one.refusal() and "size=0" not in one.refusal()
    tiled = dataclasses.replace(one, tile=32, tiles=4, largest_tiled=0)
    assert "no size fits tile by tile" in tiled.refusal() and "size=0" not in tiled.refusal()


def test_the_largest_size_named_tile_by_tile_fits_and_16_px_more_does_not(tmp_path):
    """The size a refusal names tile by tile counts all that a tiled run holds (the compiled
    window functions too): at that size auto finds a core that fits; 16 px larger, none."""
    cal = {"memory": [1e9, 20e3], "style": 0.0, "seconds": [0.01, 1e-6], "history": None,
           "device": "cpu"}
    path = write_config(tmp_path, name="print", size=4096)

    def at(size):
        cfg = config.load(path, [f"size={size}"])
        return estimate.estimate(cfg, "x", cal, 12e9)

    largest = at(4096).largest_tiled
    assert not at(4096).fits and 0 < largest < 4096, largest
    assert at(largest).fits and at(largest).tile
    assert not at(largest + 16).fits


def test_the_many_window_functions_raise_no_retracing_warning():
    """Each window frame is a compiled function of its own, traced once, by design; TensorFlow
    counts traces across function objects and warned "N out of the last N calls to <function>
    triggered tf.function retracing" every few frames (a 6-tile clip run printed it 4 times).
    autodiff.many_functions drops that warning, and no other."""
    import logging

    cfg = config.Config(content="c.png", style=["a.png"])
    cfg.model = dataclasses.replace(cfg.model, weights="random",
                                    content_layers=["block1_conv2"], style_layers=["block1_conv1"])
    extractor, names = model.feature_extractor(cfg.model, seed=0)[:2]
    rng = np.random.default_rng(5)
    content, style, x = (rng.uniform(0, 255, (60, 60, 3)).astype("float32") for _ in range(3))
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger, keep = logging.getLogger("tensorflow"), Keep(logging.WARNING)
    logger.addHandler(keep)
    try:
        tiled = TiledValueAndGrad(extractor, names, cfg, content, [style], 12)
        assert len({frames for _, frames in tiled.tiles}) == 9  # first, inner, last per axis
        tiled(x)
        logger.warning("another warning")  # still shown
    finally:
        logger.removeHandler(keep)
    assert [m for m in seen if "retracing" in m] == []
    assert "another warning" in seen
