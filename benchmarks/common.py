"""What the benchmarks share: the demo's images and network at a size, ready to optimise,
and the optional JSON summary. Imported by the scripts beside it (their folder is first on
sys.path when run as `python benchmarks/bench_x.py`)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def demo_inputs(size: int, *overrides: str):
    """The demo config's run at `size` with random weights (and `overrides`, as --set):
    (cfg, content, styles, extractor, layer names), the images prepared at that size.
    Imports the framework, so only when called: bench_workers uses this module too."""
    from pipeline import config, images, jobs, model
    from pipeline.stylize import prepare

    (job,) = jobs.plan(config.load(ROOT / "configs" / "demo.yaml",
                                    [f"size={size}", "model.weights=random", *overrides]))
    cfg = job.cfg  # planned: style is a list of files only after planning
    content, styles = prepare(cfg, images.load_image(cfg.content),
                              [images.load_image(s) for s in cfg.style])
    extractor, names, _ = model.feature_extractor(cfg.model, cfg.seed)
    return cfg, content, styles, extractor, names


def write_json(path: Path | None, data) -> None:
    """`--json PATH`: the numbers printed, for a machine to read."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
