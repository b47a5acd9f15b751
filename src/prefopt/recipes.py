"""What each command does, from a config to a result: ``train`` (DPO, ODPO and the whole loss
family), ``train_reward_model`` (Bradley–Terry), ``logps`` and ``validate_datasets``.

Both trainings share one path (``_run``): the output-directory plan, the accelerator (precision,
compile, engine checks and their refusals), data preparation, the run directory, the one
``Trainer``, restore-then-train. They differ only in the model, the collator and the objective.
Models and data may be given as paths in the config or as Python objects (a loaded model, a
tokenizer, a list of dicts or a ``datasets.Dataset``), which is what the public API
(``prefopt.train``) passes on.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from prefopt.config import TrainConfig, save_config
from prefopt.data.collate import RewardPairCollator
from prefopt.data.formats import Columns, load_pairs
from prefopt.data.prepare import apply_score_policy, prepare_dataset, prepare_train_eval, summary_line
from prefopt.errors import ConfigError
from prefopt.evaluation.model_card import write_model_card
from prefopt.io import write_jsonl_atomic, write_text_atomic
from prefopt.losses.combine import LossOptions
from prefopt.memory import return_freed_memory
from prefopt.modeling.attention import model_collator
from prefopt.modeling.load import finish_loading, freeze, frozen_copy, load_causal_lm, load_tokenizer
from prefopt.modeling.logprobs import score_pairs
from prefopt.modeling.peft import add_lora, is_peft_model, load_lora, merge_adapter, quantization_config
from prefopt.modeling.reward_model import ScalarRewardModel, load_reward_model
from prefopt.objectives.preference import PreferenceObjective
from prefopt.objectives.reference import (
    AdapterOffReference,
    AdapterSnapshotReference,
    AutocastReference,
    LiveReference,
)
from prefopt.objectives.reference_cache import cached_reference, store_rows
from prefopt.objectives.reward import RewardObjective, check_margin_scores
from prefopt.training.checkpoint import restore, write_errors
from prefopt.training.distributed import build_accelerator, engine_of, load_dtype, prepare_reference, together
from prefopt.training.metrics import resolve_trackers, run_summary
from prefopt.training.preflight import (
    RunPlan,
    agree_on_plan,
    check_model_paths,
    check_resume_data,
    check_resume_engine,
    plan_run,
)
from prefopt.training.run_dir import RunDirectory, abandon, contents, guarded
from prefopt.training.run_lock import RunLock
from prefopt.training.trainer import Trainer

# ------------------------------------------------------------------------------------------------
# Pieces shared by the commands


def _check_sources(cfg: TrainConfig, *, model, tokenizer, train_dataset) -> None:
    """Everything a run needs is given, as a path in the config or as an object."""
    if model is None and not cfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required (or pass a loaded model)")
    if train_dataset is None and not cfg.dataset:
        raise ConfigError("dataset is required (or pass the training rows)")
    if tokenizer is None and not (cfg.tokenizer_name_or_path or cfg.model_name_or_path):
        raise ConfigError("a model given as an object needs its tokenizer: pass tokenizer=... or set "
                          "tokenizer_name_or_path")
    if model is not None and cfg.merge_adapter_on_save and not cfg.model_name_or_path:
        raise ConfigError("merge_adapter_on_save merges from the base model's files: set model_name_or_path")


def _start(cfg: TrainConfig, *, model, tokenizer, train_dataset) -> tuple[RunPlan, Any, Any]:
    """Check every setting and path, then build the accelerator: before any data is read or any
    file written. Returns the plan, the accelerator and the tokenizer."""
    cfg.validate(require_paths=False)
    resolve_trackers(cfg.report_to)  # a tracker that is not installed: one line, before anything is read
    _check_sources(cfg, model=model, tokenizer=tokenizer, train_dataset=train_dataset)
    accelerator = build_accelerator(cfg)  # engine, mixed precision, torch.compile, and their refusals
    # Output-dir rule, model paths, checkpoint to resume. Settled across processes: the file system
    # can change between two processes' looks (a lock taken, a file written), and a refusal must
    # stop every process with one line, not leave some waiting for the others.
    with together(accelerator):
        plan = plan_run(cfg)
    plan = agree_on_plan(plan, accelerator)  # every process restores the checkpoint the main process chose
    with together(accelerator):
        check_resume_engine(plan, engine_of(accelerator), accelerator.num_processes)
    if cfg.return_freed_memory:
        return_freed_memory()  # lower peak RSS on CPU (memory.py)
    set_seed(cfg.seed)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    return plan, accelerator, tokenizer


def print_summaries(summaries: dict, accelerator) -> None:
    if accelerator.is_main_process:
        for role, s in summaries.items():
            print(f"prefopt: {summary_line(role, s)}", file=sys.stderr)


def start_output_dir(cfg: TrainConfig, plan: RunPlan, summaries: dict, accelerator
                     ) -> tuple[RunDirectory | None, RunLock | None]:
    """Take the directory's lock, move an earlier run aside if allowed (every input is checked and
    every model built by now), then write the resolved config and the data summary. The main
    process does the work; the others learn the outcome, so a refusal stops every process alike.
    A failed write puts the earlier run back and releases the lock."""
    output_dir = Path(cfg.output_dir)
    run_dir = lock = None
    with together(accelerator):
        if accelerator.is_main_process:
            try:
                with write_errors(output_dir, "the run's files (config.yaml, data_summary.json, the run record)"):
                    output_dir.mkdir(parents=True, exist_ok=True)
                    lock = RunLock(output_dir).acquire()
                    if plan.resume_from is None and not plan.overwrite and contents(output_dir):
                        raise ConfigError(f"output_dir {output_dir} was written to while this run was starting "
                                          f"(it now holds: {', '.join(contents(output_dir)[:4])}); choose another "
                                          "output_dir")
                    run_dir = RunDirectory(output_dir)
                    run_dir.begin(overwrite=plan.overwrite, resume=plan.resume_from is not None)
                    run_dir.wrote("config.yaml", "data_summary.json", "metrics.jsonl", "tensorboard", "runs",
                                  *(["merged"] if cfg.use_peft and cfg.merge_adapter_on_save else []))
                    save_config(cfg, output_dir / "config.yaml")
                    write_text_atomic(output_dir / "data_summary.json", json.dumps(summaries, indent=2) + "\n")
            except BaseException:
                abandon(run_dir, lock)
                raise
    return run_dir, lock


def _run(cfg: TrainConfig, plan: RunPlan, accelerator, *, model, train_pairs, eval_pairs, collator, objective,
         summaries: dict, save_model: Callable) -> tuple[dict[str, Any], Trainer]:
    """The one run: the ``Trainer`` (optimizer and schedule built, so they cannot fail later), the run
    directory, restore the planned checkpoint, train. An earlier run moved aside comes back if this
    one fails before its first checkpoint."""
    trainer = Trainer(cfg, model=model, train_data=train_pairs, eval_data=eval_pairs, collator=collator,
                      objective=objective, save_model=save_model, accelerator=accelerator)
    run_dir, lock = start_output_dir(cfg, plan, summaries, accelerator)
    trainer.run_dir = run_dir
    with guarded(run_dir, lock):
        if plan.resume_from is not None:
            restore(trainer, plan.resume_from)
        return trainer.train(), trainer


def finish_run(cfg: TrainConfig, trainer: Trainer, final: dict[str, Any], summaries: dict, *, kind: str,
               merged: Path | None = None) -> None:
    """After the final save: the model card next to the model (and the merged one), written by the
    main process (every process learns whether it failed), then the end-of-run summary on stdout."""
    acc = trainer.accelerator
    output_dir = Path(cfg.output_dir)
    with together(acc), write_errors(output_dir, "the model card (README.md, training_curves.png)",
                                     kept=f"the final model is saved in {output_dir}"):
        if acc.is_main_process:
            if trainer.run_dir is not None:
                trainer.run_dir.wrote("README.md", "training_curves.png")  # recorded before they exist
            write_model_card(output_dir, cfg, final=final, steps=trainer.step, summaries=summaries, kind=kind,
                             copies=[merged] if merged is not None else [])
    if not acc.is_main_process:
        return
    extra = {"merged model": merged} if merged is not None else None
    for line in run_summary(final, steps=trainer.step, seconds=trainer.wall_time, output_dir=output_dir,
                            what="reward model" if kind == "reward model" else "model", extra_dirs=extra):
        print(line, flush=True)


def build_models(cfg: TrainConfig, accelerator, options: LossOptions | None = None, *, live_reference: bool = True,
                 model=None, ref_model=None, adapter: str | None = None, adapter_reference: bool = False):
    """The policy to train and the ``reference(batch, *, per_token)`` callable, for every
    combination of engine, precision and adapter:

    - a reference model (``ref_model_name_or_path`` or ``ref_model``): that model, frozen, placed by
      ``prepare_reference``;
    - ``use_peft``: the policy's base weights with the adapter off (no second copy), or with
      ``adapter_reference`` a frozen snapshot of the starting ``adapter`` beside the trained one;
    - otherwise: a frozen copy of the initial policy, placed by ``prepare_reference``.

    ``model``/``ref_model`` are models given as objects (then used in place of the paths);
    ``adapter`` (``use_peft``) a saved adapter to continue training instead of a new one.
    """
    options = options or cfg.loss_options()
    dtype = load_dtype(cfg)
    extra = {}
    quant = quantization_config(cfg) if cfg.use_peft else None
    if quant is not None:
        extra = {"quantization_config": quant, "device_map": {"": accelerator.local_process_index}}

    attn = cfg.attention_kwargs()  # the policy and a loaded reference: the same attention kernel
    extra.update(attn)

    def load(name_or_path: str, **kwargs):
        return load_causal_lm(name_or_path, disable_dropout_=cfg.disable_dropout, dtype=dtype,
                              fused_activations=cfg.fused_activations, **kwargs)

    def given(obj):
        return finish_loading(obj, disable_dropout_=cfg.disable_dropout, fused_activations=cfg.fused_activations)

    policy = given(model) if model is not None else load(cfg.model_name_or_path, **extra)
    needs_reference = live_reference and options.needs_reference
    if not needs_reference:
        reference = None  # reference-free losses (SimPO and the like) or a precomputed reference
    elif ref_model is not None:
        reference = LiveReference(prepare_reference(freeze(given(ref_model)), accelerator))
    elif cfg.ref_model_name_or_path:
        reference = LiveReference(prepare_reference(load(cfg.ref_model_name_or_path, **attn), accelerator))
    elif cfg.use_peft:
        reference = None  # set below, once the adapter exists
    elif engine_of(accelerator) == "deepspeed" and model is None:
        # A deepcopy of a DeepSpeed-loaded policy shares its ZeRO bookkeeping (under ZeRO-3 the
        # reference forward then finds `NOT_AVAILABLE` parameters): load a second copy instead.
        reference = LiveReference(prepare_reference(load(cfg.model_name_or_path, **attn), accelerator))
    else:
        reference = LiveReference(prepare_reference(frozen_copy(policy), accelerator))
    _enable_gradient_checkpointing(cfg, policy)
    if cfg.use_peft:
        policy = add_lora(policy, cfg) if adapter is None else load_lora(policy, adapter)
        if reference is None and needs_reference:
            reference = (AdapterSnapshotReference(policy, adapter) if adapter_reference and adapter is not None
                         else AdapterOffReference(policy))
    if reference is not None and accelerator.mixed_precision != "no":
        reference = AutocastReference(reference, accelerator)
    return policy, reference


def _enable_gradient_checkpointing(cfg: TrainConfig, model) -> None:
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so it also works with frozen embeddings (LoRA).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False


# ------------------------------------------------------------------------------------------------
# The commands


def train(cfg: TrainConfig, *, model=None, tokenizer=None, ref_model=None, train_dataset=None,
          eval_dataset=None, adapter: str | None = None, adapter_reference: bool = False) -> dict[str, Any]:
    """``prefopt train``: DPO/ODPO/... on ``cfg``. Returns the last logged metrics (and the eval
    metrics of the end of training); the model, tokenizer, config and metrics land in ``output_dir``.

    ``model``, ``tokenizer``, ``ref_model``: objects instead of ``model_name_or_path``,
    ``tokenizer_name_or_path``, ``ref_model_name_or_path`` (the model is trained in place).
    ``train_dataset``, ``eval_dataset``: rows in memory (a list of dicts or a ``datasets.Dataset``)
    instead of ``dataset``, ``eval_dataset``; the same formats and checks as files.
    ``adapter`` (with ``use_peft``): a saved LoRA adapter of ``model_name_or_path`` to continue
    training instead of a new one; ``adapter_reference``: the reference is the policy as it starts
    (base + that adapter, frozen) instead of the base (``prefopt online``'s per-round reference)."""
    if adapter is not None and not cfg.use_peft:
        raise ConfigError("a starting adapter needs use_peft: true")
    plan, accelerator, tokenizer = _start(cfg, model=model, tokenizer=tokenizer, train_dataset=train_dataset)
    options = cfg.loss_options()
    # Every process reads the same data, so a bad row fails on all of them: settled, it is one line.
    with together(accelerator):
        train_pairs, eval_pairs, summaries = prepare_train_eval(cfg, tokenizer, train_data=train_dataset,
                                                                eval_data=eval_dataset)
        check_resume_data(cfg, plan, train_pairs)
    print_summaries(summaries, accelerator)

    # A precomputed reference replaces the live one: no second model is held for it.
    precompute = cfg.precompute_ref_log_probs and options.needs_reference
    policy, reference = build_models(cfg, accelerator, options, live_reference=not precompute, model=model,
                                     ref_model=ref_model, adapter=adapter, adapter_reference=adapter_reference)
    collator = model_collator(cfg.layout, train_pairs, cfg.per_device_train_batch_size, policy,
                              tokenizer.pad_token_id, cfg.pack_row_tokens, device_type=accelerator.device.type)
    if precompute:
        # A continued adapter: the reference is the base (adapter off) or the policy as it starts
        # (adapter on). Its values belong to this adapter, which the cache key (the model's files)
        # does not name: computed in memory, not stored.
        adapter_off = (adapter is not None and not adapter_reference and not cfg.ref_model_name_or_path
                       and ref_model is None)
        with policy.disable_adapter() if adapter_off else contextlib.nullcontext():
            reference, eval_pairs = cached_reference(cfg, policy, train_pairs, eval_pairs, collator, accelerator,
                                                     ref_model=ref_model, per_token=options.reference_per_token,
                                                     use_cache=adapter is None or bool(cfg.ref_model_name_or_path))

    def save_model(model, directory: Path, **kwargs) -> None:
        if is_peft_model(model):  # only the trained adapter, not a reference snapshot beside it
            kwargs["selected_adapters"] = [model.active_adapter]
        model.save_pretrained(directory, **kwargs)  # a PEFT model writes only its adapter
        tokenizer.save_pretrained(directory)

    final, trainer = _run(cfg, plan, accelerator, model=policy, train_pairs=train_pairs, eval_pairs=eval_pairs,
                          collator=collator, objective=PreferenceObjective(options, reference),
                          summaries=summaries, save_model=save_model)
    merged = None
    if cfg.use_peft and cfg.merge_adapter_on_save:
        # From the saved adapter files, on one process: the same for every engine.
        output_dir = Path(cfg.output_dir)
        merged = output_dir / "merged"
        with together(accelerator), write_errors(output_dir, "the merged model (merged/)",
                                                 kept=f"the adapter is saved in {output_dir}"):
            if accelerator.is_main_process:
                merge_adapter(cfg.model_name_or_path, output_dir, merged, dtype=load_dtype(cfg))
                tokenizer.save_pretrained(merged)
    finish_run(cfg, trainer, final, summaries, kind="policy", merged=merged)
    return final


def train_reward_model(cfg: TrainConfig, *, model=None, tokenizer=None, train_dataset=None,
                       eval_dataset=None) -> dict[str, Any]:
    """``prefopt reward train``: a Bradley–Terry reward model on ``cfg`` (the same keys as DPO
    training). Returns the last logged metrics; the model, tokenizer, config and metrics land in
    ``output_dir``. ``model`` is a ``ScalarRewardModel`` or a ``*ForSequenceClassification`` with
    one output, given as an object; the other keywords are as for ``train``."""
    if cfg.use_peft:
        raise ConfigError("use_peft is not supported for reward models: train the full model (use_peft: false)")
    plan, accelerator, tokenizer = _start(cfg, model=model, tokenizer=tokenizer, train_dataset=train_dataset)
    # ODPO's score policy does not apply: a reward model learns from every labelled pair.
    with together(accelerator):  # a bad row: one line, as in train
        train_pairs, eval_pairs, summaries = prepare_train_eval(cfg, tokenizer, train_data=train_dataset,
                                                                eval_data=eval_dataset, score_policy=False)
        check_resume_data(cfg, plan, train_pairs)
        negative = check_margin_scores(train_pairs, cfg, summaries["train"]["source"])
        if eval_pairs is not None:
            check_margin_scores(eval_pairs, cfg, summaries["eval"]["source"])
    print_summaries(summaries, accelerator)
    if negative and accelerator.is_main_process:
        print(f"prefopt: train: {negative} pairs have score_chosen < score_rejected; their margin is 0",
              file=sys.stderr)
    summaries["margin_clamped_to_zero"] = negative

    if model is None:
        model = load_reward_model(cfg.model_name_or_path, pad_token_id=tokenizer.pad_token_id,
                                  disable_dropout_=cfg.disable_dropout, fused_activations=cfg.fused_activations,
                                  dtype=load_dtype(cfg))
    elif not isinstance(model, ScalarRewardModel):
        model = ScalarRewardModel(finish_loading(model, disable_dropout_=cfg.disable_dropout,
                                                 fused_activations=cfg.fused_activations))
    _enable_gradient_checkpointing(cfg, model.hf)

    def save_model(wrapper: ScalarRewardModel, directory: Path, **kwargs) -> None:
        wrapper.hf.save_pretrained(directory, **kwargs)
        tokenizer.save_pretrained(directory)

    objective = RewardObjective(margin_from_scores=cfg.margin_from_scores, margin_scale=cfg.margin_scale)
    final, trainer = _run(cfg, plan, accelerator, model=model, train_pairs=train_pairs, eval_pairs=eval_pairs,
                          collator=RewardPairCollator(tokenizer.pad_token_id), objective=objective,
                          summaries=summaries, save_model=save_model)
    finish_run(cfg, trainer, final, summaries, kind="reward model")
    return final


def check_output_file(output: str | Path) -> None:
    """``--output`` names a file to write: not a directory, and in a directory that exists or can be made."""
    path = Path(output)
    if path.is_dir():
        raise ConfigError(f"--output {path} is a directory; give a file name")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--output {path}: {parent} is not a directory")


def logps(cfg: TrainConfig, output: str, batch_size: int = 8) -> int:
    """``prefopt logps``: per-pair log-probs of ``cfg.model_name_or_path`` with training's
    tokenization; also stored as the reference log-prob cache entry ``train`` would look up."""
    if not cfg.model_name_or_path or not cfg.dataset:
        raise ConfigError("prefopt logps needs --model and --dataset")
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {batch_size}")
    check_output_file(output)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    pairs, summary = prepare_dataset(cfg, cfg.dataset, cfg.dataset_split, tokenizer)
    print(f"prefopt: {summary_line('logps', summary)}", file=sys.stderr)
    model = load_causal_lm(cfg.model_name_or_path, disable_dropout_=True, fused_activations=cfg.fused_activations,
                           **cfg.attention_kwargs())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    collator = model_collator(cfg.layout, pairs, batch_size, model, tokenizer.pad_token_id, cfg.pack_row_tokens,
                              device_type=device.type)
    rows = score_pairs(model, pairs, collator, batch_size=batch_size, device=device)
    write_jsonl_atomic(output, rows)
    print(f"prefopt: wrote {len(rows)} pairs to {output}", file=sys.stderr)
    cached = store_rows(cfg, cfg.model_name_or_path, pairs, rows)
    print(f"prefopt: reference log-prob cache entry {cached}", file=sys.stderr)
    return len(rows)


def validate_datasets(cfg: TrainConfig, *, command: str = "validate") -> dict[str, dict[str, Any]]:
    """``prefopt validate``: read, check and (with a tokenizer) tokenize the datasets exactly as
    training would, without loading a model, into the tokenized-pair store training then opens.
    Summaries per role (``train``, ``eval``), as saved in a run's ``data_summary.json``; the first
    bad row stops it with the error training would give. ``prefopt prepare`` (``command``) is the
    same but needs the tokenizer: it builds the stores ahead of a (multi-node) launch."""
    if not cfg.dataset:
        raise ConfigError(f"prefopt {command} needs --dataset")
    cfg.validate(require_paths=False)  # the same key checks as training; a model is not needed to read data
    tokenizer_name = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    if command == "prepare" and not tokenizer_name:
        raise ConfigError("prefopt prepare tokenizes: set model_name_or_path or tokenizer_name_or_path")
    tokenizer = None
    if tokenizer_name:
        check_model_paths(cfg)
        tokenizer = load_tokenizer(tokenizer_name)
    summaries = {}
    for role, spec, split in (("train", cfg.dataset, cfg.dataset_split),
                              ("eval", cfg.eval_dataset, cfg.eval_dataset_split)):
        if not spec:
            continue
        if tokenizer is not None:
            summaries[role] = prepare_dataset(cfg, spec, split, tokenizer)[1]
            continue
        pairs, stats = load_pairs(spec, split=split, fmt=cfg.dataset_format, columns=Columns.from_config(cfg))
        pairs, nonpositive = apply_score_policy(pairs, cfg)
        summaries[role] = {**stats.as_dict(), "nonpositive_score_diff": nonpositive,
                           "nonpositive_policy": cfg.nonpositive_score_diff if nonpositive else None,
                           "tokenization": None, "pairs_after_scores": len(pairs)}
    return summaries
