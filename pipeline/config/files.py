"""Reading config files: YAML with duplicate keys refused and 1e4 read as a number, `base:`
inheritance, paths made absolute against the file that set them, and `--set` overrides."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from pipeline.config.checks import from_dict
from pipeline.config.paths import expand_path, resolve_paths
from pipeline.config.schema import (
    PATH_KEYS,
    Config,
    ConfigError,
    dotted_keys,
    get_dotted,
    set_dotted,
    unknown_key,
)


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads 1e4 as a number.

    PyYAML silently keeps the last of two equal keys, and its YAML 1.1 float pattern needs a
    dot, so `style_weight: 1e4` would arrive as the string '1e4'.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key ([a, b]: 1): SafeLoader's own error says so
            continue
        if duplicate:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key '{key}'")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}{where}: invalid YAML: {problem}") from None


def _read_file(path: Path, chain: tuple[Path, ...]) -> dict:
    """One file's mapping with `base:` merged in and its paths made absolute."""
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise ConfigError(f"{path}: base: inheritance cycle ({cycle})")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    raw.pop("provenance", None)  # written into a run's config.yaml by the tool; not a setting
    resolve_paths(raw, path.parent, str(path))
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: must be the path of another config file")
    try:
        base_path = expand_path(base, path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: base: {e}") from None
    parent = _read_file(Path(base_path), chain + (path,))
    return _deep_merge(parent, raw)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "sweep":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(raw: dict, assignment: str) -> None:
    """`--set loss.style_weight=1e4`: the value is read as YAML, paths against the cwd."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE, e.g. loss.style_weight=1e4")
    known = dotted_keys()
    if key not in known:
        raise ConfigError(f"--set {key}: {unknown_key(key, known)}")
    value = parse_yaml(text, f"--set {key}")
    if key in PATH_KEYS or key == "sweep":  # `--set sweep={content: [...]}` holds paths too
        wrapper: dict = {}
        set_dotted(wrapper, key, value)
        resolve_paths(wrapper, Path.cwd(), "--set")
        value = get_dotted(wrapper, key)
    set_dotted(raw, key, value)


def load_raw(path, overrides=()) -> dict:
    """The merged mapping of a config file, its bases and `--set` overrides (not validated)."""
    raw = _read_file(Path(os.path.expanduser(str(path))).resolve(), ())
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


def load(path, overrides=()) -> Config:
    """A validated Config (globs and sweep not yet expanded)."""
    raw = load_raw(path, overrides)  # its errors already name their file or --set
    try:
        cfg = from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    # A relative output_dir left at its default was set by no file: it means the working
    # directory's. Absolute, a run's saved config.yaml points back at the same folder.
    cfg.output_dir = os.path.abspath(cfg.output_dir)
    return cfg
