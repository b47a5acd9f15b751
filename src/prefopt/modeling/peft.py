"""LoRA and QLoRA through PEFT.

With an adapter, the reference policy needs no second copy of the weights: it *is* the base model,
i.e. the policy with the adapter switched off (``objectives.reference.AdapterOffReference``).
``peft`` and ``bitsandbytes`` are optional dependencies, imported where they are needed. The final save holds the
adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and, on request, the merged model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prefopt.errors import ConfigError


def _require_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("use_peft needs the `peft` package: pip install 'prefopt[peft]'") from None
    return peft


def target_modules(cfg) -> str | list[str]:
    """``lora_target_modules`` as PEFT wants it: the string ``all-linear`` or a list of names."""
    names = [n.strip() for n in cfg.lora_target_modules.split(",") if n.strip()]
    if not names:
        raise ConfigError("lora_target_modules is empty; name modules (q_proj,v_proj) or use all-linear")
    return "all-linear" if names == ["all-linear"] else names


def quantization_config(cfg):
    """QLoRA's 4-bit NF4 loading config, or ``None``. Raises a ConfigError where it cannot run."""
    if not cfg.load_in_4bit:
        return None
    if not torch.cuda.is_available():
        raise ConfigError("load_in_4bit (QLoRA) needs a CUDA GPU; bitsandbytes 4-bit kernels do not run on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("load_in_4bit (QLoRA) needs the `bitsandbytes` package: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def add_lora(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """Wrap ``model`` in a PEFT LoRA model; only the adapter's weights are trainable afterwards."""
    peft = _require_peft()
    if cfg.load_in_4bit:
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    config = peft.LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(cfg), task_type="CAUSAL_LM", bias="none",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module name the model does not have
        raise ConfigError(f"cannot add LoRA adapters: {str(e).splitlines()[0]}") from None


def load_lora(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """``model`` with the LoRA adapter saved in ``adapter_dir`` applied and trainable: continued
    training of an adapter (each round of ``prefopt online`` with ``use_peft`` starts from the
    adapter the previous round ended with)."""
    peft = _require_peft()
    return peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def is_adapter_dir(path: str | Path) -> bool:
    """A directory holding a saved PEFT adapter (not a full model)."""
    return (Path(path) / "adapter_config.json").is_file()


def merged_copy(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """``model`` with the adapter in ``adapter_dir`` folded into its weights: a plain model, as fast
    to sample from as the base (no LoRA branch in every forward)."""
    peft = _require_peft()
    return peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def merge_adapter(base_name_or_path: str, adapter_dir: str | Path, output_dir: str | Path, *, dtype=None) -> Path:
    """Load the base model on CPU, apply the adapter saved in ``adapter_dir``, fold it into the
    weights and save a plain ``transformers`` model to ``output_dir``. Done from the saved files,
    so it works the same after DDP, FSDP or DeepSpeed training (where the live weights are sharded)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_name_or_path, **({"dtype": dtype} if dtype else {}))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    output_dir = Path(output_dir)
    merged.save_pretrained(output_dir)
    return output_dir
