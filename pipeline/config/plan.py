"""From one validated Config to the single runs it describes (sweeps and globs expanded),
and each run's identity: a hash of everything that decides its pixels, and a readable id."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from pathlib import Path

import yaml

from pipeline.config.checks import check_stage_sizes, from_dict, is_video_file
from pipeline.config.paths import expand_glob, is_glob, sequence_files
from pipeline.config.schema import (
    INIT_KINDS,
    PATH_KEYS,
    UNHASHED_KEYS,
    WEIGHT_KINDS,
    Config,
    ConfigError,
    OptimizerConfig,
    first_iterations,
    history,
    normalised,
    set_dotted,
    style_list,
    style_weights,
)


def expand(cfg: Config) -> list[tuple[dict, Config]]:
    """The single runs a config describes, in a stable order, each with the values that
    distinguish it: the cartesian product of the sweep (keys sorted, so their order in the
    file does not matter), then each content match with each style match. A `style` given as
    one string makes one run per file its glob matches; the matches of a list of styles (globs
    included) are blended in one run. With `video:`, a content glob of images is one clip (a
    frame sequence), and a glob of video files one clip per file.
    """
    base = to_dict(cfg)
    base["sweep"] = {}
    keys = sorted(cfg.sweep)
    runs = []
    for values in itertools.product(*(cfg.sweep[k] for k in keys)):
        raw = json.loads(json.dumps(base))
        for key, value in zip(keys, values):
            set_dotted(raw, key, value)
        swept = dict(zip(keys, values))
        contents = _contents(raw["content"], raw.get("video") is not None)
        if isinstance(raw["style"], str):
            style_sets = [[s] for s in expand_glob(raw["style"], "style")]
        else:
            style_sets = [[m for s in raw["style"] for m in expand_glob(s, "style")]]
        for content, style in itertools.product(contents, style_sets):
            one = dict(raw, content=content, style=style)
            label = dict(swept)
            if len(contents) > 1:
                label["content"] = Path(content).stem
            if len(style_sets) > 1:
                label["style"] = Path(style[0]).stem
            run = from_dict(one)
            check_stage_sizes(run)
            # Each run records the memory it uses, not "by method".
            run.optimizer.history = history(run.optimizer)
            runs.append((label, run))
    return runs


def _contents(content: str, clip: bool) -> list[str]:
    """The content of each run: every match of a glob; for clips, the glob itself (one frame
    sequence) unless it matches video files, each a clip."""
    if not clip:
        return expand_glob(content, "content")
    if not is_glob(content):
        return [content]
    matches = expand_glob(content, "content")
    videos = [m for m in matches if is_video_file(m)]
    if videos and len(videos) < len(matches):
        raise ConfigError(f"content: '{content}' matches video files and other files; with "
                          "`video:` a glob is either one clip of frame images or a set of "
                          "video files, each a clip")
    return videos or [content]


def to_dict(cfg: Config) -> dict:
    """The config as plain data; without a `video:` section, no `video` key, so that an image
    run's config.yaml and run id are what they were before clips existed."""
    data = dataclasses.asdict(cfg)
    if data.get("video", ...) is None:
        del data["video"]
    return data


def to_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


_DIGESTS: dict[tuple, str] = {}  # (real path, size, mtime) -> sha256 of the bytes


def _file_digest(path: str) -> str:
    """The file's sha256, read once per process: a sweep of many runs over one 80 MB weights
    file hashes it once. An edit changes the size or the modification time, and so the key."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def clip_files(cfg: Config) -> list[str] | None:
    """A frame sequence's selected frame files, in order (video.frames taken as a slice);
    None for a video file, whose frames are inside it."""
    if cfg.video is None or not (is_glob(cfg.content) or os.path.isdir(cfg.content)):
        return None
    frames = cfg.video.frames
    return sequence_files(cfg.content)[frames.start:frames.stop:frames.step]


def _clip_digest(cfg: Config, data: dict) -> str:
    """A clip by its frames' bytes: a video file's, or each selected frame file's (then the
    selection is in the files, and its spelling counts for nothing)."""
    video = data["video"]
    video["first_iterations"] = first_iterations(cfg.video, cfg.optimizer)
    files = clip_files(cfg)
    if files is None:
        return _file_digest(cfg.content)
    video.pop("frames")
    digest = hashlib.sha256()
    for path in files:
        digest.update(_file_digest(path).encode())
    return digest.hexdigest()


def config_hash(cfg: Config) -> str:
    """A short hash of everything that decides the result's pixels.

    Input files count by their bytes, not their paths, so a run keeps its id when the folder
    moves to another machine, and gets a new one when an image is edited in place.
    """
    data = to_dict(cfg)
    for key in UNHASHED_KEYS:
        head, _, leaf = key.rpartition(".")
        holder = data.get(head) if head else data  # `video` is there only for a clip
        if holder is not None:
            holder.pop(leaf)
    if cfg.video is None:
        data["content"] = _file_digest(cfg.content)
    else:
        data["content"] = _clip_digest(cfg, data)
    data["style"] = [_file_digest(s) for s in style_list(cfg.style)]
    # What a None means has changed once (equal, then 1/C_l^2): hash what it means now.
    data["model"]["style_layer_weights"] = style_weights(cfg.model)
    data["optimizer"]["history"] = history(cfg.optimizer)  # None: what it means for the method
    _as_the_default_spelling(data, cfg)
    if cfg.init not in INIT_KINDS:
        data["init"] = _file_digest(cfg.init)
    if cfg.style_masks is not None:
        data["style_masks"] = [m and _file_digest(m) for m in cfg.style_masks]
    if cfg.content_mask is not None:
        data["content_mask"] = _file_digest(cfg.content_mask)
    if cfg.model.weights not in WEIGHT_KINDS:  # by content: two files may share a name
        data["model"]["weights"] = _file_digest(cfg.model.weights)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _as_the_default_spelling(data: dict, cfg: Config) -> None:
    """Values that make the same pixels as the defaults are hashed as the defaults: one run,
    one id, however it is spelled; and a config that leaves them unset keeps its id."""
    sizes = cfg.scales or [cfg.size]
    budgets = cfg.scale_iterations or [cfg.optimizer.iterations] * len(sizes)
    if len(sizes) == 1:  # `scales: [size]` is the one stage that `[]` means
        data["scales"] = []
    if len(set(budgets)) == 1:  # one budget for every stage: what optimizer.iterations says
        data["scale_iterations"] = None
        data["optimizer"]["iterations"] = budgets[0]
    else:  # a budget per stage: optimizer.iterations counts for nothing
        data["optimizer"]["iterations"] = OptimizerConfig().iterations
    for key, weights, count in (("style_blend", cfg.style_blend, len(style_list(cfg.style))),
                                ("content_layer_weights", cfg.model.content_layer_weights,
                                 len(cfg.model.content_layers))):
        # Equal weights, as the objective normalises them (exactly: [1, 1], not [0.1] * 3).
        if weights is not None and normalised(weights, count) == normalised(None, count):
            (data if key == "style_blend" else data["model"])[key] = None
    if cfg.optimizer.method == "adam":  # adam keeps no curvature pairs: history is unused
        data["optimizer"]["history"] = history(OptimizerConfig(method="adam"))


def _sequence_name(source: str) -> str:
    """A frame sequence named by its folder: `shots/take2/*.png` is take2."""
    path = Path(source)
    while path.name and is_glob(path.name):
        path = path.parent
    return path.name or "frames"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "run"


def run_id(cfg: Config, label: dict | None = None) -> str:
    """Readable and deterministic: the swept values (or the name) plus the config hash."""
    if label:
        parts = []
        for key, value in label.items():
            shown = value
            if key in PATH_KEYS and isinstance(value, (str, list)):  # file names, not paths
                shown = "+".join(Path(v).stem if isinstance(v, str) else str(v)
                                 for v in (value if isinstance(value, list) else [value]))
                if key == "content" and cfg.video is not None and clip_files(cfg) is not None:
                    shown = _sequence_name(value)
            parts.append(f"{key.rpartition('.')[2]}-{shown}")
        words = "_".join(parts)
    else:
        words = cfg.name
    return f"{slug(words)}-{config_hash(cfg)}"
