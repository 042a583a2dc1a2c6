"""A run's configuration, one idea per module:

- schema: the typed dataclasses (the one source of defaults) and shared constants;
- paths: `~`, `pkg:` and relative paths, globs;
- checks: a merged mapping to a validated Config, or one ConfigError naming the key;
- files: YAML reading with `base:` inheritance and `--set` overrides (`load`);
- plan: expansion of sweeps and globs into single runs, hashing and run ids.

`from pipeline import config` gives the names other rooms use.
"""

from pipeline.config.checks import check_stage_sizes, from_dict, is_video_file
from pipeline.config.files import apply_override, load, load_raw, parse_yaml
from pipeline.config.paths import (
    expand_glob,
    expand_path,
    is_glob,
    natural_key,
    sequence_files,
)
from pipeline.config.plan import (
    clip_files,
    config_hash,
    expand,
    run_id,
    slug,
    to_dict,
    to_yaml,
)
from pipeline.config.schema import (
    BLOCK_CHANNELS,
    BLOCK_CONVS,
    COLOR_MODES,
    DEFAULT_HISTORY,
    FLOW_METHODS,
    INIT_KINDS,
    MAX_SIZE,
    METHODS,
    NETWORKS,
    PATH_KEYS,
    POOLINGS,
    PRECISIONS,
    TILE_MODES,
    UNHASHED_KEYS,
    VGG19_CONV_LAYERS,
    VIDEO_EXTENSIONS,
    VIDEO_INITS,
    WEIGHT_KINDS,
    Config,
    ConfigError,
    FramesConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    VideoConfig,
    conv_layers,
    deepest_block,
    dotted_keys,
    first_iterations,
    get_dotted,
    history,
    layer_channels,
    long_side_shape,
    nearest_multiple,
    normalised,
    section,
    set_dotted,
    style_list,
    style_size,
    style_weights,
    tile_stride,
    unknown_key,
)
