"""Scale-out plumbing around Accelerate: the Accelerator a config asks for, a check that the engine
the launcher requested (DDP, FSDP2, DeepSpeed) is the one actually running, and placing the frozen
reference model correctly for each engine, and failing together: a failure on one process is settled
on all of them (``together``), so none waits forever for a process that has gone.

The training loop itself (trainer.py) shards the data and scales the loss; nothing here changes the
mathematics, only where tensors live.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType

from prefopt.errors import ConfigError, PrefoptError, SharedFailure
from prefopt.modeling.peft import quantization_config


class _NoCpuFallbackNotice(logging.Filter):
    """Accelerate imports deepspeed whenever it is installed (``unwrap_model``, on every save), and
    deepspeed's import then prints "Setting accelerator to CPU..." on stdout on a machine without
    GPUs, in the middle of prefopt's output. The notice says nothing on a CPU run; every other
    message of DeepSpeed's logger is kept. A filter on the logger itself survives DeepSpeed's own
    setup of that logger when it is imported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


logging.getLogger("DeepSpeed").addFilter(_NoCpuFallbackNotice())

# What `accelerate launch --config_file X.yaml` puts in the environment of every process.
_ENGINE_ENV = {"fsdp": "ACCELERATE_USE_FSDP", "deepspeed": "ACCELERATE_USE_DEEPSPEED"}


def requested_engine() -> str | None:
    """``"fsdp"``, ``"deepspeed"`` or ``None`` (plain DDP / one process), from the launcher's env."""
    for engine, var in _ENGINE_ENV.items():
        if os.environ.get(var, "false").lower() in ("1", "true", "yes"):
            return engine
    return None


def mixed_precision(cfg) -> str:
    return "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"


def load_dtype(cfg) -> torch.dtype | None:
    """The dtype to load weights in (``None``: transformers' ``auto``, the checkpoint's own dtype)."""
    return {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        cfg.torch_dtype
    ]


def build_accelerator(cfg):
    """The run's Accelerator: CPU when there is no GPU, mixed precision and torch.compile from the
    config, and an error (not a silent fallback) when the requested engine is not the one running."""
    on_gpu = torch.cuda.is_available()
    if cfg.fp16 and not on_gpu:
        raise ConfigError("fp16 mixed precision needs a CUDA GPU (its loss scaler is CUDA-only); on CPU use bf16")
    if cfg.use_peft and cfg.load_in_4bit:
        quantization_config(cfg)  # fail before any data is read when QLoRA cannot run here
    kwargs = {"cpu": not on_gpu}
    if mixed_precision(cfg) != "no":  # else the launcher's setting (accelerate config) stands
        kwargs["mixed_precision"] = mixed_precision(cfg)
    if cfg.torch_compile:
        kwargs["dynamo_backend"] = "inductor"
    _forget_single_process_state()
    try:
        accelerator = Accelerator(**kwargs)
    except ImportError as e:  # e.g. a DeepSpeed config without the deepspeed package
        raise ConfigError(f"the Accelerate launch config needs a missing package: {e}") from None
    check_engine(accelerator)
    apply_tf32(cfg, on_gpu)
    notice = None if on_gpu else slow_cpu_precision(cfg)
    if notice and accelerator.is_main_process:
        print(f"prefopt: note: {notice}", file=sys.stderr)
    if engine_of(accelerator) == "deepspeed":
        configure_deepspeed(accelerator, cfg)
    return accelerator


def apply_tf32(cfg, on_gpu: bool) -> None:
    """``tf32``: TF32 matmuls and cuDNN convolutions on CUDA (None keeps torch's setting)."""
    if cfg.tf32 is not None and on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)


def slow_cpu_precision(cfg, capabilities: dict | None = None) -> str | None:
    """A one-line notice when bf16/fp16 is asked for on a CPU without instructions for it: torch
    then emulates the format through float32 conversions, several times slower than float32."""
    wanted = [name for name, on in (("bf16", cfg.bf16 or cfg.torch_dtype == "bfloat16"),
                                    ("fp16", cfg.fp16 or cfg.torch_dtype == "float16")) if on]
    if not wanted:
        return None
    if capabilities is None:
        try:
            capabilities = torch.cpu.get_capabilities()
        except (AttributeError, RuntimeError):  # older torch: no way to tell, so say nothing
            return None
    if capabilities.get("architecture") != "x86_64":
        return None  # the capability flags below are x86's
    fast = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
    slow = [w for w in wanted if not any(capabilities.get(flag) for flag in fast[w])]
    if not slow:
        return None
    flags = " or ".join(fast[slow[0]])
    return (f"{slow[0]} on this CPU ({capabilities.get('cpu_name', 'unknown')}) has no {flags} instructions: "
            f"torch emulates it, which is usually several times slower than float32 (bf16: false, "
            "torch_dtype: float32 for speed)")


def _forget_single_process_state() -> None:
    """Accelerate keeps one process-wide state and refuses a second Accelerator with another mixed
    precision. In one process (a notebook or a script that trains twice) nothing else shares that
    state, so each run starts from a fresh one; under a launcher the state is left alone."""
    if AcceleratorState._shared_state and not PartialState().use_distributed:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()


def engine_of(accelerator) -> str:
    """``"fsdp2"``, ``"fsdp1"``, ``"deepspeed"``, ``"ddp"`` or ``"single"``."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp2" if accelerator.is_fsdp2 else "fsdp1"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def check_engine(accelerator) -> None:
    """Accelerate falls back to plain (CPU) data parallelism when FSDP or DeepSpeed cannot run,
    e.g. on a machine without GPUs. A user who asked for sharding must not get a replicated run
    silently, so that is an error here."""
    wanted, running = requested_engine(), engine_of(accelerator)
    if wanted == "fsdp" and running == "fsdp1":
        raise ConfigError("prefopt supports FSDP2 only: set fsdp_version: 2 in the Accelerate config")
    if wanted == "fsdp" and running != "fsdp2" or wanted == "deepspeed" and running != "deepspeed":
        raise ConfigError(
            f"the launcher asked for {wanted} but Accelerate is running {running} "
            f"({accelerator.num_processes} process(es) on {accelerator.device}); "
            f"{wanted} through Accelerate needs CUDA GPUs"
        )


def configure_deepspeed(accelerator, cfg) -> None:
    """Fill the DeepSpeed config's ``auto`` values from prefopt's keys.

    prefopt owns accumulation: it pre-scales each micro-batch loss by ``P / global_pairs`` and
    marks the accumulation boundary itself, so DeepSpeed's own ``gradient_accumulation_steps``
    must be 1 (a larger value would divide the loss a second time).
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config

    def fill(key: str, value) -> None:
        if ds.get(key, "auto") == "auto":
            ds[key] = value

    if ds.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise ConfigError(
            "set gradient_accumulation_steps in the DeepSpeed config to auto (or 1) and use prefopt's "
            "gradient_accumulation_steps key instead"
        )
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError("remove the optimizer/scheduler blocks from the DeepSpeed config: prefopt builds its own")
    ds["gradient_accumulation_steps"] = 1
    fill("train_micro_batch_size_per_gpu", cfg.per_device_train_batch_size)
    fill("train_batch_size", cfg.per_device_train_batch_size * accelerator.num_processes)
    fill("gradient_clipping", cfg.max_grad_norm)
    if accelerator.state.deepspeed_plugin.zero_stage == 3:
        # prefopt always writes one full model: ZeRO-3 must gather the shards when saving.
        ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def is_sharded(accelerator) -> bool:
    """True when no single process holds the full weights (FSDP, DeepSpeed ZeRO-3), so saving the
    model needs every process to take part in gathering the state dict."""
    engine = engine_of(accelerator)
    if engine.startswith("fsdp"):
        return True
    return engine == "deepspeed" and accelerator.state.deepspeed_plugin.zero_stage == 3


def prepare_reference(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Place a frozen reference model for the running engine.

    - one process / DDP: moved to the device, replicated (it has no gradients, nothing to sync);
    - FSDP2: sharded with ``fully_shard`` like the policy (per decoder layer, then the root), so
      each process holds 1/P of its weights and gathers a layer at a time in forward;
    - DeepSpeed ZeRO-3: wrapped by ``deepspeed.initialize`` with parameter sharding and no
      optimizer; ZeRO-1/2 shard only optimizer state and gradients, which a frozen model does not
      have, so there it is replicated like DDP.
    """
    engine = engine_of(accelerator)
    model.eval()
    model.requires_grad_(False)
    if engine == "fsdp2":
        return _fully_shard_frozen(model, accelerator)
    if engine == "deepspeed" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return _deepspeed_frozen(model, accelerator)
    return model.to(accelerator.device)


def _fully_shard_frozen(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    kwargs = {
        "reshard_after_forward": True,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
    }
    if mesh is not None and accelerator.parallelism_config is not None:
        kwargs["mesh"] = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    model.to(accelerator.device)
    return fully_shard_layers(model, **kwargs)


def fully_shard_layers(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """``fully_shard`` every decoder layer (the classes in ``model._no_split_modules``), then the
    root. Works on CPU with gloo too, which is how the tests check it."""
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _deepspeed_frozen(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    import deepspeed  # optional: only a DeepSpeed launch gets here

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


# ------------------------------------------------------------------------------------------ failing together
def _describe(error: BaseException, rank: int) -> str:
    if isinstance(error, PrefoptError):
        return str(error)
    text = str(error).strip().splitlines()
    return f"process {rank} failed: {type(error).__name__}" + (f": {text[0]}" if text else "")


def settle(accelerator, error: Exception | None) -> None:
    """Every process learns whether any of them failed, and then all raise: the main process its own
    error (or the first other process's, as a ``PrefoptError``), the others ``SharedFailure``, which
    the CLI does not print. So one line is printed, every process exits with the same status, and
    none is left waiting in a collective for a process that has gone. One flag all-reduce when all
    went well; the messages are gathered only after a failure."""
    if accelerator is None or accelerator.num_processes == 1:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    flag = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return
    messages: list = [None] * accelerator.num_processes
    dist.all_gather_object(messages, None if error is None else _describe(error, accelerator.process_index))
    first = next(m for m in messages if m is not None)
    if not accelerator.is_main_process:
        raised = SharedFailure(first)
    else:
        raised = error if error is not None else PrefoptError(first)
    raised.settled = True  # every process raises now: exit_together may wait for all of them
    raise raised from (error if raised is not error else None)


def exit_together(error: BaseException, code: int) -> None:
    """After a failure ``settle`` shared among several processes, once this process has said what it
    has to say: wait (a minute at most) until every process is here, then all leave at once,
    without interpreter teardown. A launcher (torchrun) ends the processes still running when the
    first one exits, which would record SIGTERM for them instead of ``code``; leaving together (and
    answering a SIGTERM now with ``code``) makes every process's status ``code``. Nothing to do
    for a failure that was not settled."""
    if not getattr(error, "settled", False):
        return
    import datetime
    import signal

    import torch.distributed as dist

    signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    try:
        if dist.is_initialized():
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
    except Exception:  # noqa: BLE001 - a process that is already gone: leave anyway
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def together(accelerator) -> Iterator[None]:
    """Run a block that may fail on some processes only (a write on the main process, a file lock,
    a check of the file system) and settle the outcome on all of them (``settle``). The block must
    contain no collective of its own."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure is settled, and re-raised on this process
        error = e
    settle(accelerator, error)
