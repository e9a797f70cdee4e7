"""Benchmarks behind `detector bench <name>`: each module has `main(options: dict[str, str])` printing a table."""
