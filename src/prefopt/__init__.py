"""prefopt: align causal language models with preference data (DPO, ODPO, Bradley-Terry).

The public Python API (the CLI calls the same functions)::

    import prefopt

    cfg = prefopt.TrainConfig(loss_type="odpo", beta=0.1, output_dir="runs/odpo", max_steps=100)
    metrics = prefopt.train(cfg, model=model, tokenizer=tokenizer, train_dataset=rows)

Names are loaded on first use, so ``import prefopt`` (and the ``prefopt`` command) starts fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "TrainConfig": "prefopt.config",
    "train": "prefopt.recipes",
    "train_reward_model": "prefopt.recipes",
    "validate_datasets": "prefopt.recipes",
    "preference_loss": "prefopt.losses.combine",
    "preference_loss_terms": "prefopt.losses.combine",
    "LossOptions": "prefopt.losses.combine",
    "register_loss": "prefopt.losses.preference",
    "LossInputs": "prefopt.losses.preference",
    "LOSSES": "prefopt.losses.preference",
    "odpo_offset": "prefopt.losses.offsets",
    "bt_loss": "prefopt.losses.bradley_terry",
    "load_pairs": "prefopt.data.formats",
    "PreferencePair": "prefopt.data.records",
    "load_causal_lm": "prefopt.modeling.load",
    "load_tokenizer": "prefopt.modeling.load",
    "load_reward_model": "prefopt.modeling.reward_model",
    "pair_logps": "prefopt.modeling.logprobs",
    "PrefoptError": "prefopt.errors",
    "ConfigError": "prefopt.errors",
    "DataError": "prefopt.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prefopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
