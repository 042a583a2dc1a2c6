"""Neural style transfer (Gatys et al.) as a batch pipeline driven by YAML configs."""

__version__ = "0.1.0"
