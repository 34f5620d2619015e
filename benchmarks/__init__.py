"""Performance benchmarks (python -m benchmarks.NAME); presets live in attribution/presets/."""
