"""Supervised continual-learning benchmarks (split / permuted / rotated MNIST)."""
