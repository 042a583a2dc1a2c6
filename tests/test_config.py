"""Tests for pipeline.config and the config half of pipeline.cli.

Every config and image is made here, in tmp_path. Expected values come from the brief and the
schema's documented defaults (DESIGN.md, the paper), worked out by hand, never read back from
the code under test.
"""

import itertools
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline import config
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAPER_STYLE_LAYERS = ["block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1",
                      "block5_conv1"]


# --------------------------------------------------------------------------- helpers


def png(path, color=(200, 30, 30), size=(8, 8)) -> Path:
    """A small real PNG; a different colour gives different bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write(path, text) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture
def exp(tmp_path):
    """A folder with a content and a style image next to where configs are written."""
    png(tmp_path / "content.png", (10, 120, 200))
    png(tmp_path / "style.png", (250, 200, 0))
    return tmp_path


def minimal(folder, extra="", name="run.yaml") -> Path:
    """content + style (relative to the config) plus `extra` YAML lines."""
    return write(folder / name, "content: content.png\nstyle: style.png\n" + textwrap.dedent(extra))


def load_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path, overrides)
    message = str(info.value)
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    return message


# --------------------------------------------------------------------------- defaults


def test_minimal_config_takes_the_schema_defaults(exp):
    cfg = config.load(minimal(exp))
    assert cfg.size == 512
    assert cfg.optimizer.iterations == 500
    assert cfg.optimizer.history is None and config.history(cfg.optimizer) == 10  # scipy's
    assert cfg.model.pooling == "max"  # as neural-style, whose weights are the defaults
    assert cfg.model.network == "vgg19" and cfg.model.weights == "imagenet"
    assert cfg.style_scale == 1.0 and cfg.preserve_colors == "none"
    assert cfg.model.content_layers == ["block4_conv2"]
    assert cfg.model.style_layers == PAPER_STYLE_LAYERS
    assert cfg.model.content_layer_weights is None and cfg.model.style_layer_weights is None
    assert cfg.init == "content" and cfg.seed == 0
    assert cfg.style_blend is None and cfg.sweep == {}
    # Paths come back absolute; a single style stays a string (a glob there would make one
    # run per match), and the planned run holds it as a list of one.
    assert cfg.content == str((exp / "content.png").resolve())
    assert cfg.style == str((exp / "style.png").resolve())
    ((_, run),) = config.expand(cfg)
    assert run.style == [str((exp / "style.png").resolve())]


def test_empty_config_file_complains_about_content(tmp_path):
    message = load_error(write(tmp_path / "run.yaml", "# nothing yet\n"))
    assert "content" in message and "run.yaml" in message


# --------------------------------------------------------------------------- errors

# (extra YAML after the content/style lines, fragments the message must hold besides the file
# name). Line 1 is content, line 2 style, so `extra` starts at line 3.
ERRORS = {
    "unknown-nested": ("loss:\n  style_wieght: 1\n", ["loss.style_wieght", "loss.style_weight"]),
    "unknown-top": ("sze: 64\n", ["sze", "'size'"]),
    "int-is-word": ("size: big\n", ["size", "big"]),
    "int-is-fraction": ("optimizer:\n  iterations: 1.5\n", ["optimizer.iterations"]),
    "int-is-bool": ("seed: true\n", ["seed"]),
    "section-not-mapping": ("loss: 5\n", ["loss"]),
    "too-small": ("size: 3\n", ["size"]),
    "too-large": ("size: 100000\n", ["size"]),
    "pooling": ("model:\n  pooling: median\n", ["model.pooling"]),
    "negative-weight": ("loss:\n  tv_weight: -1\n", ["loss.tv_weight"]),
    "negative-iters": ("optimizer:\n  iterations: 0\n", ["optimizer.iterations"]),
    "layer-typo": ("model:\n  style_layers: [block1_conv1, blok2_conv1]\n",
                   ["model.style_layers", "blok2_conv1", "'block2_conv1'"]),
    "layer-missing": ("model:\n  content_layers: [block6_conv1]\n",
                      ["model.content_layers", "block6_conv1"]),
    "no-layers": ("model:\n  style_layers: []\n", ["model.style_layers"]),
    "layer-weights-len": ("model:\n  style_layer_weights: [1, 2]\n",
                          ["model.style_layer_weights"]),
    "content-weights-len": ("model:\n  content_layer_weights: [1, 1]\n",
                             ["model.content_layer_weights"]),
    "blend-len": ("style_blend: [1, 2, 3]\n", ["style_blend"]),
    "background": ("background: [1, 2]\n", ["background"]),
    "init-unknown": ("init: nowhere.png\n", ["init", "nowhere.png"]),
    "weights-unknown": ("model:\n  weights: vgg.h5\n", ["model.weights", "vgg.h5"]),
    "dup-top": ("size: 64\nsize: 128\n", ["duplicate", "'size'", "line 4"]),
    "dup-nested": ("loss:\n  tv_weight: 1\n  tv_weight: 2\n",
                   ["duplicate", "'tv_weight'", "line 5"]),
    "sweep-unknown": ("sweep:\n  loss.style_wieght: [1, 2]\n",
                      ["sweep.loss.style_wieght", "loss.style_weight"]),
    "sweep-not-list": ("sweep:\n  size: 64\n", ["sweep.size"]),
}


@pytest.mark.parametrize("extra, fragments", list(ERRORS.values()), ids=list(ERRORS))
def test_config_mistakes_name_the_file_and_the_key(exp, extra, fragments):
    message = load_error(minimal(exp, extra))
    assert "run.yaml" in message
    # The tmp folder's name is made from the test's id: keep it out of the key checks.
    bare = message.replace(str(exp), "")
    for fragment in fragments:
        assert fragment in bare, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("text, key, missing", [
    ("style: style.png\n", "content", None),
    ("content: content.png\n", "style", None),
    ("content: absent.png\nstyle: style.png\n", "content", "absent.png"),
    ("content: content.png\nstyle: [style.png, gone.png]\n", "style", "gone.png"),
    ("content: shots/*.png\nstyle: style.png\n", "content", "*.png"),  # glob matching nothing
    ("content: content.png\nstyle: [paintings/*.jpg]\n", "style", "*.jpg"),
], ids=["no-content", "no-style", "content-file", "style-file", "content-glob", "style-glob"])
def test_missing_inputs_name_the_file_and_the_key(exp, text, key, missing):
    message = load_error(write(exp / "run.yaml", text))
    assert "run.yaml" in message
    bare = message.replace(str(exp), "")
    assert re.search(rf"\b{key}\b", bare), message
    if missing:
        assert missing in message


def test_a_glob_that_matches_nothing_errors_when_expanding_too(exp):
    # Built past load (as a sweep or a script would): expand must still refuse it.
    cfg = config.load(minimal(exp))
    cfg.content = str(exp / "nothing" / "*.png")
    with pytest.raises(ConfigError, match="content"):
        config.expand(cfg)


@pytest.mark.parametrize("text, line", [
    ("content: content.png\nstyle: style.png\nsize: 64\n  seed: 1\n", 4),
    ("content: content.png\nstyle: [style.png\nsize: 64\n", 3),
])
def test_invalid_yaml_names_the_file_and_line(exp, text, line):
    message = load_error(write(exp / "run.yaml", text))
    assert "run.yaml" in message and "YAML" in message
    bare = message.replace(str(exp), "")
    assert re.search(rf"(:|line ){line}\b", bare), message


def test_unhashable_key_is_a_config_error_not_a_crash(exp):
    message = load_error(minimal(exp, "[a, b]: 1\n"))
    assert "run.yaml" in message


def test_a_list_is_not_a_config(tmp_path):
    message = load_error(write(tmp_path / "run.yaml", "- content: a.png\n- style: b.png\n"))
    assert "run.yaml" in message and "mapping" in message


def test_missing_config_file(tmp_path):
    message = load_error(tmp_path / "absent.yaml")
    assert "absent.yaml" in message


def test_base_cycle_is_reported(exp):
    write(exp / "a.yaml", "base: b.yaml\ncontent: content.png\nstyle: style.png\n")
    write(exp / "b.yaml", "base: a.yaml\nsize: 64\n")
    message = load_error(exp / "a.yaml")
    assert "base" in message and "a.yaml" in message and "b.yaml" in message


def test_self_base_cycle_and_missing_base(exp):
    write(exp / "self.yaml", "base: self.yaml\ncontent: content.png\nstyle: style.png\n")
    assert "self.yaml" in load_error(exp / "self.yaml")
    write(exp / "orphan.yaml", "base: lost/parent.yaml\ncontent: content.png\nstyle: style.png\n")
    assert "parent.yaml" in load_error(exp / "orphan.yaml")


def test_set_without_equals(exp):
    message = load_error(minimal(exp), ["size"])
    assert "--set" in message and "size" in message


def test_set_of_an_unknown_key_suggests_the_right_one(exp):
    message = load_error(minimal(exp), ["loss.style_wieght=1"])
    assert "loss.style_wieght" in message and "loss.style_weight" in message


def test_set_with_a_bad_value_names_the_key(exp):
    message = load_error(minimal(exp), ["size=huge"])
    assert "size" in message and "huge" in message


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("text, number", [("1e4", 1e4), ("1.5e-3", 0.0015), ("-2E+2", -200.0),
                                          ("1.0e4", 1e4), ("3E2", 300.0)])
def test_exponent_notation_reads_as_a_float(text, number):
    value = config.parse_yaml(f"x: {text}\n", "t")["x"]
    assert isinstance(value, float) and value == number


def test_number_resolver_leaves_other_scalars_alone():
    data = config.parse_yaml("a: 12\nb: 1.5\nc: 1e4x\nd: e4\ne: '1e4'\n", "t")
    assert data == {"a": 12, "b": 1.5, "c": "1e4x", "d": "e4", "e": "1e4"}
    assert isinstance(data["a"], int)


@pytest.mark.parametrize("extra, key", [
    ("loss:\n  style_weight: .inf\n", "loss.style_weight"),
    ("loss:\n  tv_weight: .nan\n", "loss.tv_weight"),
    ("loss:\n  content_weight: -.inf\n", "loss.content_weight"),
    ("style_blend: [.nan]\n", "style_blend[0]"),
    ("model:\n  style_layer_weights: [1, 1, .inf, 1, 1]\n", "model.style_layer_weights[2]"),
    ("optimizer:\n  ftol: .nan\n", "optimizer.ftol"),
])
def test_infinite_and_nan_numbers_are_refused(exp, extra, key):
    message = load_error(minimal(exp, extra))
    assert f"{key}: expected a finite number" in message


@pytest.mark.parametrize("extra, words", [
    # scipy answers a negative factr with "ERROR: FACTR < 0" and no iteration at all.
    ("optimizer:\n  ftol: -1\n", ["optimizer.ftol", "0 (off) or more", "-1"]),
    ("optimizer:\n  gtol: -0.5\n", ["optimizer.gtol", "0 (off) or more", "-0.5"]),
    # The device optimisers have no early stop: the value would change nothing but the id.
    ("optimizer:\n  method: lbfgs\n  ftol: 1e-9\n", ["optimizer.ftol", "scipy only", "lbfgs"]),
    ("optimizer:\n  method: adam\n  gtol: 1e-5\n", ["optimizer.gtol", "scipy only", "adam"]),
    # A sweep that gives one run a method where the tolerance means nothing: that run's key.
    ("optimizer:\n  ftol: 1e-9\nsweep:\n  optimizer.method: [scipy, adam]\n",
     ["optimizer.ftol", "scipy only", "adam"]),
], ids=["negative-ftol", "negative-gtol", "lbfgs-ftol", "adam-gtol", "swept-method"])
def test_tolerances_a_run_would_not_honour_exit_2_naming_the_key(exp, capsys, extra, words):
    from pipeline import cli

    assert cli.main(["run", str(minimal(exp, extra + "output_dir: out\n"))]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error:")
    for word in words:
        assert word in message, message
    assert not (exp / "out").exists()  # nothing started


def test_scipy_takes_its_tolerances_and_no_method_is_refused_a_zero(exp):
    scipy = config.load(minimal(exp, "optimizer:\n  ftol: 1e-9\n  gtol: 1e-5\n"))
    assert (scipy.optimizer.ftol, scipy.optimizer.gtol) == (1e-9, 1e-5)
    for method in ("lbfgs", "adam"):
        config.load(minimal(exp, f"optimizer:\n  method: {method}\n  ftol: 0\n  gtol: 0.0\n"))


def test_infinite_number_from_set_is_refused(exp):
    assert "loss.style_weight: expected a finite number" in load_error(
        minimal(exp), ["loss.style_weight=.inf"])


def test_exponent_floats_in_a_config_file(exp):
    cfg = config.load(minimal(exp, """
        loss:
          style_weight: 1e4
          content_weight: 1.5e-3
          tv_weight: "2E-1"
        size: 1e2
        seed: -2E+2
    """))
    assert cfg.loss.style_weight == 10000.0
    assert cfg.loss.content_weight == 0.0015
    assert cfg.loss.tv_weight == 0.2  # a quoted string that spells a number is accepted
    assert cfg.size == 100 and isinstance(cfg.size, int)
    assert cfg.seed == -200 and isinstance(cfg.seed, int)


def test_exponent_floats_from_set(exp):
    cfg = config.load(minimal(exp), ["loss.style_weight=1e4", "loss.content_weight=1.5e-3",
                                     "seed=-2E+2"])
    assert cfg.loss.style_weight == 10000.0
    assert cfg.loss.content_weight == 0.0015
    assert cfg.seed == -200


def test_quoted_number_and_plain_int_for_float_keys(exp):
    quoted = config.load(minimal(exp, 'loss:\n  style_weight: "1e4"\n', name="q.yaml"))
    plain = config.load(minimal(exp, "loss:\n  style_weight: 10000\n", name="p.yaml"))
    assert quoted.loss.style_weight == 10000.0 and isinstance(quoted.loss.style_weight, float)
    assert plain.loss.style_weight == 10000.0 and isinstance(plain.loss.style_weight, float)
    # The same number however it was written: the same run.
    assert config.config_hash(quoted) == config.config_hash(plain)


# --------------------------------------------------------------------------- inheritance


def test_base_inheritance_merges_and_resolves_against_the_base_file(tmp_path):
    common, child_dir = tmp_path / "common", tmp_path / "experiments" / "today"
    png(common / "imgs" / "photo.png", (1, 2, 3))
    png(common / "paint.png", (4, 5, 6))
    png(child_dir / "mine.png", (7, 8, 9))
    write(common / "base.yaml", """
        content: imgs/photo.png
        style: paint.png
        size: 64
        seed: 3
        loss:
          style_weight: 5
          tv_weight: 0.25
        model:
          style_layers: [block1_conv1, block2_conv1, block3_conv1]
          pooling: max
    """)
    child = write(child_dir / "child.yaml", """
        base: ../../common/base.yaml
        size: 128
        loss:
          style_weight: 7
        model:
          style_layers: [block5_conv1]
    """)
    cfg = config.load(child)
    assert cfg.size == 128  # child beats parent
    assert cfg.seed == 3  # parent's scalar kept
    assert cfg.loss.style_weight == 7.0  # nested mappings merge key by key
    assert cfg.loss.tv_weight == 0.25
    assert cfg.loss.content_weight == config.LossConfig().content_weight  # untouched
    assert cfg.model.pooling == "max"
    assert cfg.model.style_layers == ["block5_conv1"]  # lists replace, not append
    # Paths written in the base are relative to the base's folder, not the child's.
    assert cfg.content == str((common / "imgs" / "photo.png").resolve())
    assert cfg.style == str((common / "paint.png").resolve())

    grandchild = write(tmp_path / "gc.yaml", "base: experiments/today/child.yaml\nstyle: "
                       "experiments/today/mine.png\nseed: 9\n")
    cfg = config.load(grandchild)
    assert (cfg.size, cfg.seed, cfg.loss.tv_weight) == (128, 9, 0.25)
    assert cfg.style == str((child_dir / "mine.png").resolve())
    assert cfg.content == str((common / "imgs" / "photo.png").resolve())


# --------------------------------------------------------------------------- overrides


def test_set_beats_the_file_and_parses_yaml(exp):
    path = minimal(exp, "size: 64\nloss:\n  tv_weight: 0.5\n")
    cfg = config.load(path, ["size=96", "model.style_layers=[block1_conv1,block2_conv1]",
                             "loss.style_weight=3", "size=80"])
    assert cfg.size == 80  # the last --set of a key wins
    assert cfg.model.style_layers == ["block1_conv1", "block2_conv1"]
    assert cfg.loss.style_weight == 3.0
    assert cfg.loss.tv_weight == 0.5  # the file's sibling key survives a nested --set


def test_set_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    cfg_dir, work = tmp_path / "cfg", tmp_path / "work"
    png(cfg_dir / "content.png")
    png(cfg_dir / "style.png")
    png(work / "other.png", (0, 0, 0))
    png(work / "s1.png", (1, 1, 1))
    png(work / "s2.png", (2, 2, 2))
    path = minimal(cfg_dir)
    monkeypatch.chdir(work)
    cfg = config.load(path, ["content=other.png", "style=[s1.png, s2.png]"])
    assert cfg.content == str((work / "other.png").resolve())
    assert cfg.style == [str((work / "s1.png").resolve()), str((work / "s2.png").resolve())]


def test_set_sweep_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    cfg_dir, work = tmp_path / "cfg", tmp_path / "work"
    png(cfg_dir / "content.png")
    png(cfg_dir / "style.png")
    png(work / "a.png", (0, 0, 1))
    png(work / "b.png", (0, 0, 2))
    path = minimal(cfg_dir)
    monkeypatch.chdir(work)
    cfg = config.load(path, ["sweep={content: [a.png, b.png], style: [[a.png, b.png]]}"])
    runs = config.expand(cfg)
    assert [one.content for _, one in runs] == [str(work / "a.png"), str(work / "b.png")]
    assert all(one.style == [str(work / "a.png"), str(work / "b.png")] for _, one in runs)
    # What a run's config.yaml records: absolute, so it runs again from anywhere.
    assert config.to_dict(runs[0][1])["content"] == str(work / "a.png")


def test_set_keywords_are_not_paths(exp):
    cfg = config.load(minimal(exp), ["init=noise", "model.weights=random"])
    assert cfg.init == "noise" and cfg.model.weights == "random"


def test_output_dir_default_is_the_working_directory_and_a_set_one_the_files(tmp_path,
                                                                            monkeypatch):
    cfg_dir, work = tmp_path / "cfg", tmp_path / "work"
    png(cfg_dir / "content.png")
    png(cfg_dir / "style.png")
    work.mkdir()
    monkeypatch.chdir(work)
    assert config.load(minimal(cfg_dir)).output_dir == str(work / "outputs")
    written = config.load(minimal(cfg_dir, "output_dir: results\n", name="r.yaml"))
    assert written.output_dir == str((cfg_dir / "results").resolve())


# --------------------------------------------------------------------------- ~ and pkg:


def test_tilde_expands_to_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    png(home / "pics" / "c.png")
    png(home / "pics" / "s.png", (9, 9, 9))
    monkeypatch.setenv("HOME", str(home))
    cfg = config.load(write(tmp_path / "elsewhere" / "run.yaml",
                            "content: ~/pics/c.png\nstyle: ~/pics/s.png\n"))
    assert Path(cfg.content) == home / "pics" / "c.png"
    assert cfg.style == str(home / "pics" / "s.png")


def test_pkg_path_points_inside_an_installed_package(exp):
    cfg = config.load(write(exp / "run.yaml", "content: pkg:yaml/__init__.py\nstyle: style.png\n"))
    assert Path(cfg.content).resolve() == Path(yaml.__file__).resolve()


@pytest.mark.parametrize("value", ["pkg:nonexistent_pkg_xyz/a.png",
                                   "pkg:nonexistent_pkg_xyz.sub/a.png"])
def test_pkg_path_of_a_missing_package(exp, value):
    message = load_error(write(exp / "run.yaml", f"content: {value}\nstyle: style.png\n"))
    assert "nonexistent_pkg_xyz" in message and "run.yaml" in message
    assert "content" in message.replace(str(exp), "")


# --------------------------------------------------------------------------- globs


def test_content_glob_makes_one_run_per_image_in_sorted_order(exp):
    imgs = exp / "imgs"
    for stem, color in (("b", (0, 0, 90)), ("c", (0, 90, 0)), ("a", (90, 0, 0))):
        png(imgs / f"{stem}.png", color)
    (imgs / "notes.txt").write_text("not an image")
    cfg = config.load(write(exp / "run.yaml", "content: imgs/*.png\nstyle: style.png\n"))
    runs = config.expand(cfg)
    assert [one.content for _, one in runs] == [str(imgs.resolve() / f"{s}.png") for s in "abc"]
    assert [label for label, _ in runs] == [{"content": s} for s in "abc"]
    ids = [config.run_id(one, label) for label, one in runs]
    assert len(set(ids)) == 3


def test_style_glob_string_makes_one_run_per_painting(exp):
    png(exp / "paintings" / "monet.png", (1, 100, 1))
    png(exp / "paintings" / "klimt.png", (100, 1, 1))
    cfg = config.load(write(exp / "run.yaml", "content: content.png\nstyle: paintings/*.png\n"))
    runs = config.expand(cfg)
    folder = (exp / "paintings").resolve()
    assert [one.style for _, one in runs] == [[str(folder / "klimt.png")],
                                              [str(folder / "monet.png")]]
    assert [label for label, _ in runs] == [{"style": "klimt"}, {"style": "monet"}]
    assert len({config.run_id(one, label) for label, one in runs}) == 2


def test_style_list_is_blended_in_one_run(exp):
    png(exp / "second.png", (3, 3, 3))
    cfg = config.load(write(exp / "run.yaml", "content: content.png\n"
                                              "style: [style.png, second.png]\n"
                                              "style_blend: [3, 1]\n"))
    runs = config.expand(cfg)
    assert len(runs) == 1
    label, one = runs[0]
    assert label == {}
    assert one.style == [str((exp / "style.png").resolve()), str((exp / "second.png").resolve())]
    assert one.style_blend == [3.0, 1.0]


def test_a_list_of_globs_is_blended_in_one_run(exp):
    png(exp / "paintings" / "monet.png", (1, 100, 1))
    png(exp / "paintings" / "klimt.png", (100, 1, 1))
    for listed in ("[paintings/*.png]", "[paintings/*.png, style.png]"):
        cfg = config.load(write(exp / "run.yaml", f"content: content.png\nstyle: {listed}\n"))
        (label, one), *more = config.expand(cfg)
        assert not more and label == {}
        assert one.style[:2] == [str(exp / "paintings" / "klimt.png"),
                                 str(exp / "paintings" / "monet.png")]


def test_a_blend_weight_per_matched_painting_is_checked_once_globs_are_expanded(exp):
    png(exp / "paintings" / "monet.png", (1, 100, 1))
    png(exp / "paintings" / "klimt.png", (100, 1, 1))
    ok = config.load(write(exp / "ok.yaml", "content: content.png\nstyle: [paintings/*.png]\n"
                                            "style_blend: [1, 3]\n"))
    assert config.expand(ok)[0][1].style_blend == [1.0, 3.0]
    bad = config.load(write(exp / "bad.yaml", "content: content.png\nstyle: [paintings/*.png]\n"
                                              "style_blend: [1, 2, 3]\n"))
    with pytest.raises(ConfigError, match="style_blend: has 3 values for 2 style images"):
        config.expand(bad)


@pytest.mark.parametrize("name", ["trip[1].png", "what?.png", "star*.png"])
def test_an_existing_file_with_glob_characters_is_that_file(exp, name):
    png(exp / name, (7, 7, 7))
    png(exp / "tripX.png", (8, 8, 8))  # what the pattern reading would match instead
    cfg = config.load(write(exp / "run.yaml", f"content: '{name}'\nstyle: '{name}'\n"))
    ((label, one),) = config.expand(cfg)
    assert one.content == str(exp / name) and one.style == [str(exp / name)]
    assert label == {}


def test_an_escaped_pattern_matches_a_name_with_brackets(exp):
    png(exp / "trip[1].png", (7, 7, 7))
    png(exp / "trip[2].png", (8, 8, 8))
    cfg = config.load(write(exp / "run.yaml", "content: 'trip[[]*].png'\nstyle: style.png\n"))
    assert [one.content for _, one in config.expand(cfg)] == [
        str(exp / "trip[1].png"), str(exp / "trip[2].png")]


# --------------------------------------------------------------------------- sweeps


def _sweep_runs(exp, body, name):
    return config.expand(config.load(minimal(exp, body, name=name)))


def test_sweep_is_the_cartesian_product_in_key_order(exp):
    runs = _sweep_runs(exp, "sweep:\n  loss.style_weight: [1, 10]\n  size: [32, 64, 96]\n",
                       "a.yaml")
    expected = list(itertools.product([1.0, 10.0], [32, 64, 96]))  # keys sorted: loss < size
    assert [(one.loss.style_weight, one.size) for _, one in runs] == expected
    for label, one in runs:
        assert label == {"loss.style_weight": one.loss.style_weight, "size": one.size}
        assert one.sweep == {}
        assert one.loss.tv_weight == config.LossConfig().tv_weight  # unswept keys kept
    ids = [config.run_id(one, label) for label, one in runs]
    assert len(set(ids)) == 6

    flipped = _sweep_runs(exp, "sweep:\n  size: [32, 64, 96]\n  loss.style_weight: [1, 10]\n",
                          "b.yaml")
    assert [config.run_id(one, label) for label, one in flipped] == ids


def test_sweep_values_are_validated(exp):
    with pytest.raises(ConfigError, match="size"):
        _sweep_runs(exp, "sweep:\n  size: [64, 2]\n", "run.yaml")


def test_sweep_with_a_content_glob_multiplies(exp):
    png(exp / "imgs" / "x.png", (5, 5, 5))
    png(exp / "imgs" / "y.png", (6, 6, 6))
    cfg = config.load(write(exp / "run.yaml", "content: imgs/*.png\nstyle: style.png\n"
                                              "sweep:\n  size: [32, 64]\n"))
    runs = config.expand(cfg)
    assert [(Path(one.content).stem, one.size) for _, one in runs] == [
        ("x", 32), ("y", 32), ("x", 64), ("y", 64)]


# --------------------------------------------------------------------------- hashing


@pytest.fixture
def inputs(tmp_path):
    """Every kind of input file a run reads, each with bytes of its own."""
    files = {name: png(tmp_path / f"{name}.png", color, (40, 40)) for name, color in (
        ("content", (10, 120, 200)), ("content2", (11, 120, 200)), ("style", (250, 200, 0)),
        ("style2", (0, 90, 90)), ("style3", (1, 90, 90)), ("mask_a", (255, 255, 255)),
        ("mask_b", (0, 0, 0)), ("init", (5, 5, 5)))}
    files["weights"] = tmp_path / "vgg19.weights.h5"  # the hash reads bytes, not HDF5
    files["weights"].write_bytes(b"\x01" * 100)
    for n in (1, 2):  # a clip of two frames
        png(tmp_path / "frames" / f"{n}.png", (n, 100, 100), (40, 40))
    files["frames"] = tmp_path / "frames" / "*.png"
    return {name: str(path) for name, path in files.items()}


def hash_of(raw: dict) -> str:
    return config.config_hash(config.from_dict(raw))


# Keys whose other valid values cannot be derived from their type alone: (settings both
# configs share, the other value). Each changes the pixels of BASE below.
CLIP = {"content": "{frames}", "video": {}}  # the video keys' base: a clip
OTHER_VALUES = {
    "content": ({}, "{content2}"),
    "style": ({}, ["{style}", "{style3}"]),
    "style_blend": ({}, [1.0, 2.0]),  # of two styles; [1, 1] is None's equal blend
    "background": ({}, [0, 0, 0]),
    "scales": ({}, [24, 32]),
    # With a budget per stage, optimizer.iterations counts for nothing: the same in both.
    "scale_iterations": ({"scales": [24, 32]}, [2, 5]),
    "style_masks": ({}, ["{mask_a}", None]),
    "content_mask": ({}, "{mask_b}"),
    "model.content_layers": ({}, ["block2_conv1"]),
    # As many layers of the same widths: their default weights (1 / C_l^2) stay the same.
    "model.style_layers": ({}, ["block1_conv2", "block2_conv1", "block3_conv1", "block4_conv1",
                                "block5_conv1"]),
    "model.content_layer_weights": ({}, [1.0, 3.0]),  # of two layers
    "model.style_layer_weights": ({}, [1.0, 1.0, 1.0, 1.0, 1.0]),  # None is 1 / C_l^2
    "optimizer.history": ({}, 5),  # scipy's default is 10
    # The method alone: its default history (scipy 10, lbfgs 30) would change the hash too.
    "optimizer.method": ({"optimizer": {"history": 10}}, "lbfgs"),
    # A clip of two frames: each selection takes other frames.
    "video.frames.stop": (CLIP, 1),
    "video.frames.start": (CLIP, 1),
    "video.frames.step": (CLIP, 2),
    "video.long_term": (CLIP, [1, 2]),
    "video.consistency": (CLIP, False),
    "video.first_iterations": (CLIP, 7),  # None: twice optimizer.iterations
    "video.temporal_weight": (CLIP, 1.0),
}
CHOICES = {"model.network": config.NETWORKS, "model.pooling": config.POOLINGS,
           "model.precision": config.PRECISIONS, "optimizer.method": config.METHODS,
           "preserve_colors": config.COLOR_MODES, "init": config.INIT_KINDS,
           "model.weights": config.WEIGHT_KINDS, "video.init": config.VIDEO_INITS,
           "video.flow": config.FLOW_METHODS}


def other_value(key, value):
    """A valid value of `key` other than `value`: from the table, from the key's choices, or
    from its type (a number: one more, or twice as much)."""
    if key in OTHER_VALUES:
        return OTHER_VALUES[key][1]
    if key in CHOICES:
        return next(choice for choice in CHOICES[key] if choice != value)
    if type(value) is int:
        return value + 1
    if type(value) is float:
        return value * 2 if value else 1e-9  # optimizer.ftol and gtol are 0 by default
    raise AssertionError(f"{key} = {value!r}: no other value known; add one to OTHER_VALUES")


def test_every_key_that_decides_the_pixels_changes_the_hash(inputs):
    """Each key of the schema outside UNHASHED_KEYS, changed alone to another valid value,
    gives another hash: a key left out of the hash would make two runs one. The base has
    two styles and two content layers, so that blend and layer weights mean something."""
    def filled(value):  # "{content}" -> the content file's path
        if isinstance(value, list):
            return [filled(v) for v in value]
        return value.format(**inputs) if isinstance(value, str) else value

    base = {"content": inputs["content"], "style": [inputs["style"], inputs["style2"]],
            "size": 32, "model": {"weights": "random",
                                  "content_layers": ["block4_conv2", "block3_conv1"]}}
    walked = []
    for key in config.dotted_keys():
        if key in config.UNHASHED_KEYS:
            continue
        shared, _ = OTHER_VALUES.get(key, ({}, None))
        if key.startswith("video."):  # a clip: the video section, a content of frames
            shared = {**CLIP, **shared, "content": filled(CLIP["content"])}
        before = config.to_dict(config.from_dict({**base, **shared}))
        value = filled(other_value(key, config.get_dotted(before, key)))
        assert value != config.get_dotted(before, key), key
        after = config.to_dict(config.from_dict({**base, **shared}))
        config.set_dotted(after, key, value)
        assert hash_of(after) != hash_of(before), f"{key}: {value!r} leaves the hash as it was"
        walked.append(key)
    assert len(walked) == len(config.dotted_keys()) - len(config.UNHASHED_KEYS) >= 38


@pytest.mark.parametrize("key, name", [
    ("content", "content"), ("style", "style"), ("style_masks", "mask_a"),
    ("content_mask", "mask_b"), ("init", "init"), ("model.weights", "weights")])
def test_an_input_file_edited_in_place_changes_the_hash(inputs, key, name):
    """Files count by their bytes: the same path with other pixels is another run."""
    raw = {"content": inputs["content"], "style": [inputs["style"]], "size": 32,
           "model": {"weights": "random"}}
    value = [inputs[name]] if key in ("style", "style_masks") else inputs[name]
    config.set_dotted(raw, key, value)
    before = hash_of(raw)
    path = Path(inputs[name])
    if name == "weights":
        path.write_bytes(b"\x02" * 100)  # the same length
    else:
        png(path, (123, 45, 67), (40, 40))
    os.utime(path, ns=(1, 1))  # a new modification time, whatever the clock's resolution
    assert hash_of(raw) != before
    assert config.from_dict(raw) == config.from_dict(raw)  # the config itself is unchanged


def test_spellings_of_the_same_pixels_share_the_hash(inputs):
    """One stage is one stage, equal weights are equal weights, and a value nothing reads is
    no value: each spelling below makes the pixels of the one beside it."""
    base = {"content": inputs["content"], "style": [inputs["style"], inputs["style2"]],
            "size": 32, "model": {"weights": "random"}, "optimizer": {"iterations": 7}}

    def with_(**extra):
        raw = config.to_dict(config.from_dict(base))
        for key, value in extra.items():
            config.set_dotted(raw, key.replace("__", "."), value)
        return hash_of(raw)

    plain = with_()
    assert with_(scales=[32]) == plain
    assert with_(scales=[32], scale_iterations=[7]) == plain
    assert with_(scales=[32], scale_iterations=[9]) == with_(optimizer__iterations=9)
    assert with_(scales=[24, 32], scale_iterations=[7, 7]) == with_(scales=[24, 32])
    assert (with_(scales=[24, 32], scale_iterations=[3, 4], optimizer__iterations=100)
            == with_(scales=[24, 32], scale_iterations=[3, 4]))
    assert with_(style_blend=[1.0, 1.0]) == with_(style_blend=[2.5, 2.5]) == plain
    assert with_(model__content_layers=["block4_conv2", "block3_conv1"],
                 model__content_layer_weights=[4.0, 4.0]) == with_(
        model__content_layers=["block4_conv2", "block3_conv1"])
    assert with_(optimizer__method="adam", optimizer__history=3) == with_(
        optimizer__method="adam")
    # And what differs, differs.
    assert len({plain, with_(scales=[24, 32]), with_(style_blend=[1.0, 2.0]),
                with_(scales=[24, 32], scale_iterations=[3, 4]),
                with_(optimizer__method="lbfgs", optimizer__history=3),
                with_(optimizer__method="lbfgs")}) == 6


def test_each_run_records_its_methods_history_unless_one_is_set(exp):
    path = minimal(exp, "sweep:\n  optimizer.method: [scipy, lbfgs, adam]\n")
    runs = {one.optimizer.method: one for _, one in config.expand(config.load(path))}
    assert {m: one.optimizer.history for m, one in runs.items()} == {
        "scipy": 10, "lbfgs": 30, "adam": 10}  # adam keeps no pairs: the number is unused
    (fixed,) = [one for _, one in config.expand(config.load(path, ["optimizer.history=5"]))
                if one.optimizer.method == "lbfgs"]
    assert fixed.optimizer.history == 5
    # A default spelled out is the same run: ids made before the default was per method hold.
    unset, spelled = (config.expand(config.load(minimal(exp), o))[0][1]
                      for o in ([], ["optimizer.history=10"]))
    assert config.run_id(unset) == config.run_id(spelled)
    assert config.config_hash(config.load(minimal(exp))) == config.config_hash(spelled)


def test_run_id_is_deterministic_and_follows_the_pixels(exp):
    def ident(extra="", overrides=()):
        cfg = config.load(minimal(exp, extra), overrides)
        return config.run_id(cfg), config.config_hash(cfg)

    first = ident("size: 64\n")
    assert ident("size: 64\n") == first
    assert re.fullmatch(r"stylize-[0-9a-f]+", first[0])  # the default name's slug, then hash
    assert first[0].endswith(first[1])

    # Pixel-affecting keys change both.
    for changed in (ident("size: 65\n"), ident("size: 64\n", ["loss.style_weight=2"]),
                    ident("size: 64\n", ["optimizer.iterations=10"])):
        assert changed[0] != first[0] and changed[1] != first[1]

    # Bookkeeping keys change neither.
    for same in (ident("size: 64\ncheckpoint_every: 7\n"), ident("size: 64\nlog_every: 3\n"),
                 ident("size: 64\noutput_dir: somewhere/else\n")):
        assert same == first

    # The name is in the id, not in the hash.
    renamed = ident("size: 64\nname: My Demo!\n")
    assert renamed[1] == first[1]
    assert renamed[0].startswith("my-demo-") and renamed[0] != first[0]

    # Editing an input image in place changes them.
    png(exp / "style.png", (250, 200, 1))
    edited = ident("size: 64\n")
    assert edited[0] != first[0] and edited[1] != first[1]


def test_hash_counts_image_bytes_not_paths(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there" / "deeper"
    for folder in (here, there):
        png(folder / "content.png", (10, 20, 30))
        png(folder / "style.png", (40, 50, 60))
    a, b = config.load(minimal(here)), config.load(minimal(there))
    assert a.content != b.content
    assert config.run_id(a) == config.run_id(b)


def test_weights_files_count_by_their_bytes_not_their_name_and_size(tmp_path):
    """Two VGG19 files of one name have one size; a run with new weights is a new run."""
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    (tmp_path / "copy").mkdir()
    (tmp_path / "old" / "vgg19.h5").write_bytes(b"\x01" * 1000)
    (tmp_path / "new" / "vgg19.h5").write_bytes(b"\x02" * 1000)
    (tmp_path / "copy" / "vgg19.h5").write_bytes(b"\x01" * 1000)
    png(tmp_path / "content.png")
    png(tmp_path / "style.png", (1, 2, 3))
    path = minimal(tmp_path)

    def ident(folder):
        return config.run_id(config.load(path, [f"model.weights={tmp_path / folder / 'vgg19.h5'}"]))

    assert ident("old") != ident("new")
    assert ident("old") == ident("copy")
    # Rewritten in place with other bytes of the same length: the id follows.
    before = ident("old")
    (tmp_path / "old" / "vgg19.h5").write_bytes(b"\x03" * 1000)
    os.utime(tmp_path / "old" / "vgg19.h5", ns=(1, 1))  # whatever the clock's resolution
    assert ident("old") != before


# --------------------------------------------------------------------------- provenance


def test_saved_config_with_provenance_loads_back_the_same(exp):
    cfg = config.load(minimal(exp, "size: 64\nloss:\n  style_weight: 1e4\n"))
    saved = config.to_dict(cfg)
    saved["provenance"] = {"python": "3.11", "tensorflow": "2.16"}
    path = write(exp / "saved" / "config.yaml", config.to_yaml(saved))
    again = config.load(path)
    assert again == cfg
    assert config.run_id(again) == config.run_id(cfg)


def test_provenance_key_is_ignored(exp):
    cfg = config.load(minimal(exp, 'provenance:\n  python: "3.11"\n'))
    assert cfg.size == 512


# --------------------------------------------------------------------------- the CLI


def cli(*args, cwd, flags=()):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *flags, "-m", "pipeline", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_validate_prints_the_resolved_config_without_tensorflow(exp):
    path = minimal(exp, "size: 64\n")
    done = cli("validate", path, "--set", "loss.style_weight=1e4", cwd=exp,
               flags=["-X", "importtime"])
    assert done.returncode == 0, done.stderr[-2000:]
    printed = yaml.safe_load(done.stdout)
    assert printed["content"] == str((exp / "content.png").resolve())
    assert printed["size"] == 64 and printed["loss"]["style_weight"] == 10000.0
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "yaml" in imported  # the import trace was really captured
    assert not imported & {"tensorflow", "keras", "jax", "torch"}


def test_cli_unknown_key_is_one_error_line_and_exit_2(exp):
    done = cli("validate", minimal(exp, "loss:\n  style_wieght: 1\n"), cwd=exp)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "loss.style_wieght" in lines[0] and "run.yaml" in lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize("args", [
    ["validate", "{cfg}", "--set", "size"],  # bad --set
    ["frobnicate", "{cfg}"],  # unknown subcommand
    ["validate"],  # missing config argument
], ids=["bad-set", "unknown-command", "missing-argument"])
def test_cli_command_line_mistakes_exit_2(exp, args):
    cfg = minimal(exp)
    done = cli(*[a.format(cfg=cfg) for a in args], cwd=exp)
    assert done.returncode == 2
    assert "error:" in done.stderr
    assert "Traceback" not in done.stderr
