"""Paths in configs: `~`, `pkg:NAME/path` (a file shipped inside an installed package),
relative paths taken against the file that set them, and globs expanded into the files they
match."""

from __future__ import annotations

import glob as globlib
import importlib.util
import os
import re
from pathlib import Path

from pipeline.config.schema import INIT_KINDS, PATH_KEYS, WEIGHT_KINDS, ConfigError


def expand_path(value: str, relative_to: Path) -> str:
    """`~` expanded; `pkg:NAME/rel/path` is a file shipped inside an installed package;
    anything else relative is taken against `relative_to`."""
    if value.startswith("pkg:"):
        package, _, rest = value[4:].partition("/")
        try:
            spec = importlib.util.find_spec(package) if package else None
        except (ImportError, ValueError):  # 'a.b' with no package 'a', or a malformed name
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{value}: package '{package}' is not installed")
        return str(Path(next(iter(spec.submodule_search_locations))) / rest)
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (relative_to / path).resolve())


def is_path_value(key: str, value) -> bool:
    keywords = {"init": INIT_KINDS, "model.weights": WEIGHT_KINDS}.get(key, ())
    return isinstance(value, str) and value not in keywords


def resolve_paths(raw: dict, relative_to: Path, source: str) -> None:
    """Make the path values of one file's mapping absolute, in place (sweep values too)."""

    def fix(key, value):
        if isinstance(value, list):
            return [fix(key, v) for v in value]
        if not is_path_value(key, value):
            return value
        try:
            return expand_path(value, relative_to)
        except ConfigError as e:
            raise ConfigError(f"{source}: {key}: {e}") from None

    for key in PATH_KEYS:
        head, _, leaf = key.rpartition(".")
        holder = raw.get(head) if head else raw
        if isinstance(holder, dict) and leaf in holder:
            holder[leaf] = fix(key, holder[leaf])
    sweep = raw.get("sweep")
    if isinstance(sweep, dict):
        for key, values in sweep.items():
            if key in PATH_KEYS and isinstance(values, list):
                sweep[key] = [fix(key, v) for v in values]


def is_glob(path: str) -> bool:
    """A pattern to expand: glob characters, and not the name of a file that exists (an
    existing `trip[1].png` is that file; `trip[[]1].png` is the pattern that matches it)."""
    return any(ch in path for ch in "*?[") and not os.path.isfile(path)


def expand_glob(pattern: str, key: str) -> list[str]:
    """A path, or every file a glob matches (sorted); an error names the key if none."""
    if not is_glob(pattern):
        return [pattern]
    matches = sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
    if not matches:
        raise ConfigError(f"{key}: no file matches '{pattern}'")
    return matches


def natural_key(path: str):
    """frame9.png before frame10.png, as a numbered sequence means; zero-padded names sort
    the same either way."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", path)]


def sequence_files(source: str) -> list[str]:
    """The frames of a frame sequence in order: the files a glob matches, or every file in a
    folder, sorted naturally (a clip's frames, its run id and its probe all use this)."""
    pattern = os.path.join(source, "*") if os.path.isdir(source) else source
    return sorted((f for f in globlib.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(f)), key=natural_key)
