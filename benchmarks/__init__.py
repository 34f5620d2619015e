"""Presets (benchmarks/presets/*.toml) and performance benchmarks."""
