"""Benchmarks of issue #7: each module runs on its own (`python benchmarks/<name>.py`), and
`python -m benchmarks --quick|--full` runs them together into one table set and one JSON file."""
