"""crl: continual learning for RL agents and supervised benchmarks on one strategy core."""

__version__ = "0.1.0"
