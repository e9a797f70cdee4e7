"""Tools built on training and inference: the attention ablation and the benchmarks."""
