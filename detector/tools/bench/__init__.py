"""Benchmarks behind `detector bench <name>`: each module has `main(opts)` printing a table, where `opts` is its
options class in `detector.options` (`BenchModelsOptions`, ...), checked by the CLI before the module is imported."""
