"""Evaluation: policies (samples, reward, KL, win rate, implicit-reward accuracy), rewarders
(reward models and implicit rewards: scoring datasets, calibration), scorers, plots."""
