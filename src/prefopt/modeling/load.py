"""Loading models and tokenizers, with errors a user can act on; freezing a model."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from prefopt.errors import PrefoptError
from prefopt.modeling.fused import fuse_activations


def looks_local(name: str | Path) -> bool:
    """A local path rather than a hub id: it starts with ``.``, ``/`` or ``~``, exists, has more
    than one ``/`` (hub ids have one), or its first component is a local directory (``runs/sft``
    when ``./runs`` exists)."""
    name = str(name)  # the Python API also passes Path objects
    if name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1:
        return True
    parts = Path(name).parts
    return len(parts) > 1 and Path(parts[0]).is_dir()


def check_local_path(name_or_path: str | Path) -> None:
    """A missing local model directory is named as such (not as a malformed hub repo id)."""
    if looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise PrefoptError(f"model path not found: {name_or_path}")


def load_tokenizer(name_or_path: str):
    check_local_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise PrefoptError(f"cannot load a tokenizer from {name_or_path!r}: {first_line(e)}") from None
    if tok.pad_token_id is None:
        # Pads are always masked out; any id works, EOS is the usual choice.
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise PrefoptError(f"tokenizer {name_or_path!r} has neither a pad nor an EOS token")
    return tok


def dropout_free_config(name_or_path: str):
    """The model's config with every dropout probability set to 0 (DPO's implicit reward is only
    meaningful when policy and reference are deterministic functions of their weights)."""
    config = AutoConfig.from_pretrained(name_or_path)
    for key, value in list(config.to_dict().items()):
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(config, key, 0.0)
    return config


def disable_dropout(model: torch.nn.Module) -> None:
    """Every ``nn.Dropout`` to p=0, and the dropout probabilities of the model's config (which some
    attention implementations read at call time)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        for key, value in list(config.to_dict().items()):
            if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
                setattr(config, key, 0.0)


def load_causal_lm(name_or_path: str, *, disable_dropout_: bool = True, dtype: torch.dtype | None = None,
                   fused_activations: bool = True, **from_pretrained_kwargs):
    """The causal LM at ``name_or_path``; dropout off and activations fused (modeling/fused.py) by default."""
    check_local_path(name_or_path)
    try:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        kwargs.update(from_pretrained_kwargs)  # e.g. quantization_config, device_map (QLoRA)
        if disable_dropout_:
            kwargs["config"] = dropout_free_config(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise PrefoptError(f"cannot load a causal LM from {name_or_path!r}: {first_line(e)}") from None
    return finish_loading(model, disable_dropout_=disable_dropout_, fused_activations=fused_activations)


def finish_loading(model: torch.nn.Module, *, disable_dropout_: bool, fused_activations: bool) -> torch.nn.Module:
    """What every loader does to a freshly loaded model: dropout off, activations fused (modeling/fused.py)."""
    if disable_dropout_:
        disable_dropout(model)
    if fused_activations:
        fuse_activations(model)
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The reference policy: a frozen copy of the initial policy, no gradients, eval mode."""
    ref = copy.deepcopy(model)
    return freeze(ref)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
