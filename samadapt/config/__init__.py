"""The run configuration: ``RunConfig`` and its sections, YAML presets (``presets/``), overrides and checks."""
