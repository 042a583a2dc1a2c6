"""Coarse to fine: the stage plan against hand-written numbers, config checks, and real
two-stage runs (in process: the real VGG19 with random weights and scipy), interrupted and
resumed at the stage and iteration where they stopped."""

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import write_config, write_image
from keras import ops

from pipeline import batch, cli, config, images, model, scales, stylize
from pipeline.images import load_image, read_png_text, save_png
from pipeline.losses import Objective


def _cfg(**extra):
    return config.Config(content="c.png", style=["s.png"], **extra)


def test_stages_are_numbered_across_the_run():
    cfg = _cfg(size=64, scales=[16, 32, 64], scale_iterations=[3, 2, 4])
    plan = scales.stages(cfg)
    assert [(s.index, s.size, s.first, s.last) for s in plan] == [
        (1, 16, 1, 3), (2, 32, 4, 5), (3, 64, 6, 9)]
    assert scales.total_iterations(cfg) == 9
    # Without scale_iterations each stage gets optimizer.iterations; without scales, one stage.
    cfg = _cfg(size=64, scales=[32, 64], optimizer=config.OptimizerConfig(iterations=7))
    assert [(s.first, s.last) for s in scales.stages(cfg)] == [(1, 7), (8, 14)]
    assert [(s.size, s.first, s.last) for s in scales.stages(_cfg(size=40))] == [(40, 1, 500)]
    # Resuming: inside a stage stays there; a checkpoint that ended its stage goes on to the next.
    assert scales.resume_point(plan, 1, 2) == 1
    assert scales.resume_point(plan, 1, 3) == 2
    assert scales.resume_point(plan, 2, 4) == 2
    assert scales.resume_point(plan, 3, 9) == 3
    with pytest.raises(ValueError, match="does not fit"):
        scales.resume_point(plan, 1, 5)


@pytest.mark.parametrize("extra, key", [
    ({"scales": [32, 16]}, "scales: must grow"),
    ({"scales": [16, 24]}, "must equal size"),
    ({"scales": [8, 32]}, "scales: each stage"),
    ({"scales": [16, 32], "scale_iterations": [5]}, "scale_iterations: has 1 values for 2"),
    ({"scales": [16, 32], "scale_iterations": [5, 0]}, "scale_iterations: each stage"),
    ({"scale_iterations": [5]}, "scale_iterations: needs scales"),
])
def test_bad_scales_are_refused_naming_the_key(tmp_path, extra, key):
    path = write_config(tmp_path, size=32, **extra)
    with pytest.raises(config.ConfigError, match=key):
        config.load(path)


@pytest.mark.parametrize("extra, words", [
    # The content is 48 x 40: at 17 px, 17 x round(40 * 17 / 48 = 14.17); block 5 needs 16
    # rows, which round(40 * s / 48) first reaches at s = 19 (18 gives 15.0).
    ({"scales": [17, 32]}, ["scales: at 17 px", "content.png, 48x40", "is 17x14 px",
                            "block 5", "at least 16 px", "smallest first stage that fits is 19"]),
    ({"scales": [18, 32]}, ["scales: at 18 px", "is 18x15 px", "first stage that fits is 19"]),
    ({"size": 16}, ["size: at 16 px", "is 16x13 px", "the smallest size that fits is 19"]),
    # The style is 64 x 32: at style_scale 0.5 and 32 px, 16 x 8. 16 rows need a long side
    # of 31 (round(15.5) is 16, half to even; 30 gives 15): ceil(32 x) >= 31 for x above
    # 30 / 32 = 0.9375, so 0.94; or a stage s with ceil(0.5 s) >= 31, s = 61.
    ({"style_scale": 0.5, "size": 64, "scales": [32, 64]},
     ["style_scale: at 32 px (style_scale 0.5)", "style.png, 64x32", "is 16x8 px",
      "style_scale 0.94 fits (or a first stage of 61)"]),
])
def test_stages_too_small_for_the_deepest_layer_exit_2_at_plan_time(tmp_path, capsys, extra,
                                                                     words):
    """Found from the image headers before anything starts, where every run would fail."""
    path = write_config(tmp_path, **{"size": 32, **extra})
    write_image(tmp_path / "images" / "style.png", (32, 64), seed=2)  # 64 wide, 32 high
    assert cli.main(["validate", str(path)]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    for word in words:
        assert word in message, message
    if "scales" in extra and extra["scales"][0] in (17, 18):  # the value it names will do
        fixed = write_config(tmp_path, size=32, scales=[19, 32])
        assert len(batch.plan(config.load(fixed))) == 1


def test_the_plan_check_agrees_with_the_run_time_check(tmp_path):
    """For stages around the limit, the plan refuses exactly what stylize.check_fits (on
    pixels really resized) would refuse once the run had started: content and style."""
    write_image(tmp_path / "c.png", (40, 48), seed=1)
    write_image(tmp_path / "s.png", (21, 60), seed=2)
    content, styles = load_image(tmp_path / "c.png"), [load_image(tmp_path / "s.png")]
    for style_scale in (1.0, 1.7):
        for first in range(16, 30):
            cfg = config.Config(content=str(tmp_path / "c.png"), style=[str(tmp_path / "s.png")],
                                size=first, style_scale=style_scale)
            try:
                stylize.check_fits(cfg, *stylize.prepare(cfg, content, styles, first))
                fits = True
            except ValueError:
                fits = False
            try:
                config.check_stage_sizes(cfg)
                planned = True
            except config.ConfigError:
                planned = False
            assert planned == fits, (first, style_scale)


def test_an_unreadable_image_is_left_to_fail_its_own_run(tmp_path):
    """The plan reads headers to check stage sizes; a file it cannot read is not refused
    there (its run fails by itself, naming it), and the other runs go on."""
    photos = tmp_path / "photos"
    photos.mkdir()
    write_image(photos / "a.png", (40, 48), seed=1)
    (photos / "b.png").write_text("not an image")
    path = write_config(tmp_path, content="photos/*.png", scales=[19, 32])
    assert [Path(j.cfg.content).name for j in batch.plan(config.load(path))] == ["a.png", "b.png"]


def test_scales_are_part_of_the_run_id_and_sweepable(tmp_path):
    path = write_config(tmp_path, size=32, sweep={"scales": [[32], [24, 32]]})
    jobs = batch.plan(config.load(path))
    assert [j.cfg.scales for j in jobs] == [[32], [24, 32]]
    # The hash, not the id: an id holds the swept values whether or not the hash does.
    assert config.config_hash(jobs[0].cfg) != config.config_hash(jobs[1].cfg)


def _rows(folder):
    return [json.loads(line) for line in folder.trace.read_text().splitlines()]


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    """A 2-stage run (24 then 48 px, 4 + 3 iterations) stopped twice on request (after
    iteration 3, in stage 1, and after 5, in stage 2) and resumed twice; the metrics and
    checkpoint state are read after each part."""
    folder = tmp_path_factory.mktemp("c2f")
    path = write_config(folder, name="c2f", size=48, scales=[24, 48], scale_iterations=[4, 3],
                        checkpoint_every=2)
    (job,) = batch.plan(config.load(path))
    parts = []
    for stop_after in (3, 5, None):
        steps = []
        outcome = batch.run_one(job, steps.append, lambda n=stop_after, s=steps: n is not None
                                and bool(s) and s[-1].iteration >= n)
        parts.append({"outcome": outcome, "metrics": outcome.folder.read_metrics(),
                      "state": outcome.folder.load_state(),
                      "result": load_image(outcome.folder.result).shape,
                      "steps": [(s.iteration, s.stage) for s in steps]})
        if stop_after == 3:
            # Make stage 1's image unbeatable on loss: a resumed stage 2 must still replace it.
            folder = outcome.folder
            zero = json.dumps({"total": 0.0, "content": 0.0, "style": 0.0, "tv": 0.0})
            save_png(folder.result, load_image(folder.result),
                     {**read_png_text(folder.result), "loss": zero})
    return parts, outcome.folder


def test_a_stopped_two_stage_run_resumes_where_it_stopped(two_stage):
    parts, folder = two_stage
    first, second, last = parts
    assert first["metrics"]["status"] == "interrupted"
    assert first["metrics"]["iterations"] == 3 and first["steps"][-1] == (3, 1)
    assert (int(first["state"]["stage"]), int(first["state"]["iteration"])) == (1, 3)
    assert second["metrics"]["resumed_from"] == 3
    # The resumed part runs iteration 4 (stage 1's last) at 24 px, then stage 2 from 5.
    assert second["steps"] == [(4, 1), (5, 2)]
    assert (int(second["state"]["stage"]), int(second["state"]["iteration"])) == (2, 5)
    assert second["state"]["image"].shape == (40, 48, 3)  # stage 2's size: the content's shape
    # result.png is the current stage's best: a smaller stage's image never wins on loss alone.
    assert first["result"] == (20, 24, 3) and second["result"] == (40, 48, 3)
    assert last["outcome"].status == "completed"
    assert last["steps"] == [(6, 2), (7, 2)]
    assert last["metrics"]["iterations"] == 7 and last["metrics"]["resumed_from"] == 5


def test_two_stage_trace_checkpoints_and_result(two_stage):
    parts, folder = two_stage
    rows = _rows(folder)
    assert [r["iteration"] for r in rows] == list(range(1, 8))
    assert [r["stage"] for r in rows] == [1, 1, 1, 1, 2, 2, 2]
    assert [r["size"] for r in rows] == [24] * 4 + [48] * 3
    # The content is 40x48: 20x24 in stage 1, 40x48 in stage 2 (the result).
    assert load_image(folder.result).shape == (40, 48, 3)
    names = sorted(p.name for p in folder.checkpoints.glob("*.png"))
    assert {"stage1_iter_000002.png", "stage1_iter_000004.png",
            "stage2_iter_000006.png"} <= set(names)
    assert load_image(folder.checkpoints / "stage1_iter_000002.png").shape == (20, 24, 3)
    assert load_image(folder.checkpoints / "stage2_iter_000006.png").shape == (40, 48, 3)
    stages = parts[-1]["metrics"]["stages"]
    assert stages == [{"stage": 1, "size": 24, "iterations": [1, 4]},
                      {"stage": 2, "size": 48, "iterations": [5, 7]}]


def test_an_uninterrupted_two_stage_run_counts_and_starts_as_planned(tmp_path):
    """In process, through stylize (scipy): the run's initial loss is that of stage 1's start
    image under stage 1's own objective (content and style at 24 px), computed here from the
    parts; and a stage that converges early leaves its numbers unused."""
    content = load_image(write_image(tmp_path / "c.png", (40, 48), seed=1))
    style = load_image(write_image(tmp_path / "s.png", (32, 32), seed=2))
    cfg = config.Config(content="c.png", style=["s.png"], size=40, scales=[24, 40],
                        scale_iterations=[5, 2])
    cfg.model = dataclasses.replace(cfg.model, weights="random", content_layers=["block1_conv2"],
                                    style_layers=["block1_conv1"])
    # scipy stops as soon as an iteration lowers the loss by less than 90%: after one or two.
    cfg.optimizer = dataclasses.replace(cfg.optimizer, ftol=0.9)
    steps = []
    result, _ = stylize.stylize(cfg, content, [style], on_step=steps.append)
    first_stage = [s.iteration for s in steps if s.stage == 1]
    assert first_stage and first_stage[-1] < 5  # converged early
    assert [s.iteration for s in steps if s.stage == 2][0] == 6  # numbered after its budget

    content_24, style_24 = (images.resize_long_side(img, 24) for img in (content, style))
    assert content_24.shape == (20, 24, 3) and style_24.shape == (24, 24, 3)
    extractor, names, _ = model.feature_extractor(cfg.model, cfg.seed)
    total, _ = Objective(extractor, names, cfg, content_24, [style_24])(
        ops.convert_to_tensor(content_24))
    assert result.initial["total"] == pytest.approx(float(total), rel=1e-5)
    assert all(s.initial == result.initial for s in steps)  # the run's, on every record
