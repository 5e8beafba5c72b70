"""The YAML configuration files as typed, validated objects."""
