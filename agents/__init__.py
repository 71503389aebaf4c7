"""Continual stable-baselines3 agents (SAC, PPO) on crl's strategy core."""
