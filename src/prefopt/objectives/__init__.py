"""Objectives: what one batch costs. ``PreferenceObjective`` (the DPO family, with one ``Reference``
of any kind) and ``RewardObjective`` (Bradley–Terry); the reference kinds and their disk cache."""
