"""Data layer: CIFAR loading, long-tailed subsampling, class groups and splits (numpy only)."""
