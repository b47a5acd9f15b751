"""The one training loop. It knows nothing of losses: an *objective* turns a batch into per-pair
losses and per-pair metrics, and the loop does the rest (batching, accumulation, clipping,
schedule, logging, evaluation, checkpoints) on top of Hugging Face Accelerate.

The data order is a pure function of ``(seed, epoch)`` (``data_order.Schedule``), so the training
position is fully described by the optimizer step, which is what makes checkpoints resumable.

Its public surface is what checkpointing (``checkpoint.save``/``restore``) and the non-finite guard
(``guard.check_step``) use: ``state_dict``/``load_state_dict`` (step, optimizer, scheduler, the
unlogged metrics window, skip count), ``gather_model_state``/``save_model``, ``save_engine_state``/
``load_engine_state`` (DeepSpeed's per-process ZeRO partitions), ``all_reduce_sum``.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from prefopt.data.collate import to_device
from prefopt.data.fingerprint import data_fingerprint as fingerprint_of_pairs
from prefopt.errors import PrefoptError, RunInterrupted
from prefopt.io import simulate_full_disk
from prefopt.memory import transient_heap
from prefopt.modeling.lm_head import accumulate_tied_grad_in_place
from prefopt.progress import progress_bar
from prefopt.training.checkpoint import TMP_PREFIX, fsync_tree, test_hook, write_errors
from prefopt.training.checkpoint import save as save_checkpoint
from prefopt.training.data_order import Schedule
from prefopt.training.distributed import engine_of, is_sharded, together
from prefopt.training.guard import StepHealth, check_step
from prefopt.training.metrics import MetricsLogger
from prefopt.training.optim import build_optimizer, build_scheduler
from prefopt.training.preemption import StopRequest
from prefopt.training.run_dir import move_files

Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``objective(model, batch) -> (losses [B], metrics {name: [B]})``: per-pair values."""


def total_steps(cfg, schedule: Schedule) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(schedule.steps_per_epoch * cfg.num_train_epochs))


def in_place_grads(cfg, accelerator, model) -> list:
    """The parameters whose gradient persists between steps (``TiedGradInPlace`` handles, see
    ``modeling.lm_head.accumulate_tied_grad_in_place``): only where one process owns the whole,
    uncompiled model, so no engine or compiler sees the sparse embedding gradient."""
    if accelerator.num_processes > 1 or getattr(cfg, "torch_compile", False):
        return []
    if getattr(accelerator.state, "deepspeed_plugin", None) or getattr(accelerator.state, "fsdp_plugin", None):
        return []
    handle = accumulate_tied_grad_in_place(model)
    return [handle] if handle is not None else []


class Trainer:
    def __init__(
        self,
        cfg,
        *,
        model: torch.nn.Module,
        train_data: Sequence,
        collator: Callable[[list], dict[str, torch.Tensor]],
        objective: Objective,
        eval_data: Sequence | None = None,
        save_model: Callable[[torch.nn.Module, Path], None] | None = None,
        accelerator=None,
        extra_modules: Sequence[torch.nn.Module] = (),
    ):
        self.cfg = cfg
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.train_data, self.eval_data = train_data, eval_data
        self.collator, self.objective = collator, objective
        self.save_model_fn = save_model
        acc = self.accelerator
        self.schedule = Schedule(
            len(train_data), cfg.per_device_train_batch_size, acc.num_processes,
            cfg.gradient_accumulation_steps, cfg.seed, cfg.shuffle,
        )
        if self.schedule.micro_batches_per_epoch == 0:
            raise PrefoptError(
                f"{len(train_data)} training pairs cannot fill one batch of "
                f"{self.schedule.global_micro_batch} across {acc.num_processes} processes"
            )
        self.total_steps = total_steps(cfg, self.schedule)
        optimizer = build_optimizer(cfg, model.parameters())
        scheduler = build_scheduler(cfg, optimizer, self.total_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.scheduler = scheduler
        self.in_place_grads = in_place_grads(cfg, acc, self.model)
        for module in extra_modules:
            module.to(acc.device)
        self.output_dir = Path(cfg.output_dir)
        self.logger = MetricsLogger(self.output_dir, report_to=cfg.report_to, enabled=acc.is_main_process,
                                    run_name=getattr(cfg, "run_name", None),
                                    logging_dir=getattr(cfg, "logging_dir", None))
        self.wall_time = 0.0  # seconds spent in train() (this process, this session)
        self.step = 0
        # The unlogged metrics window lives here so a checkpoint can carry it.
        self.window: dict[str, Any] = {"sums": defaultdict(float), "pairs": 0, "tokens": 0}
        self.skipped_steps = 0
        self.run_dir = None  # run_dir.RunDirectory of the main process: records what the run writes
        self.stop = StopRequest()

    def zero_grad(self) -> None:
        """Free the gradients, except the persistent ones (``in_place_grads``), zeroed in place."""
        self.optimizer.zero_grad(set_to_none=True)
        for handle in self.in_place_grads:
            handle.zero()

    # ------------------------------------------------------------------ running a batch
    def _forward(self, indices: list[int], data: Sequence) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        batch = to_device(self.collator([data[i] for i in indices]), self.accelerator.device)
        # Accelerate autocasts only the prepared model's forward; the selective LM head calls the
        # body and the head directly, so the whole objective runs under the same autocast.
        with self.accelerator.autocast():
            losses, metrics = self.objective(self.model, batch)
        return losses, metrics, int(batch["num_tokens"])

    def all_reduce_sum(self, sums: dict[str, float], counts: float = 0.0) -> tuple[dict[str, float], float]:
        """``sums`` and ``counts`` added up over every process (the same answer on each)."""
        keys = sorted(sums)
        packed = torch.tensor([sums[k] for k in keys] + [counts], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            packed = self.accelerator.reduce(packed, reduction="sum")
        values = packed.tolist()
        return dict(zip(keys, values[:-1])), values[-1]

    def train_step(self) -> tuple[dict[str, float], int, int]:
        """One optimizer step. Returns (metric sums over this process's pairs, pairs, tokens)."""
        acc, sched = self.accelerator, self.schedule
        micro_batches = sched.step_micro_batches(self.step)
        global_pairs = sum(len(m) for m in micro_batches)
        self.model.train()
        sums: dict[str, float] = defaultdict(float)
        pairs = tokens = 0
        health = StepHealth()
        for i, micro in enumerate(micro_batches):
            shard = sched.shard(micro, acc.process_index)
            last = i == len(micro_batches) - 1
            # The loss is the mean over the pairs of the whole (global) step, however they are split
            # into micro-batches and processes; DDP averages gradients, hence the num_processes factor.
            scale = acc.num_processes / global_pairs
            context = acc.no_sync(self.model) if not last else contextlib.nullcontext()
            # DeepSpeed steps inside backward at an accumulation boundary: mark only the last one.
            acc.gradient_state._set_sync_gradients(last)
            with context:
                losses, metrics, n_tokens = self._forward(shard, self.train_data)
                with transient_heap():  # memory.py: reuses the heap the backward's temporaries left
                    acc.backward(losses.sum() * scale)
            health.observe(losses, [getattr(self.train_data[j], "index", j) for j in shard])
            sums["loss"] += losses.detach().sum().item()
            for k, v in metrics.items():
                sums[k] += v.detach().double().sum().item()
            pairs += len(shard)
            tokens += n_tokens
        if self.cfg.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        else:
            grad_norm = _grad_norm(self.model.parameters())
        # DeepSpeed clips inside its engine and may report no norm: log NaN then, and judge the
        # step by its loss alone (the guard must not stop a healthy run for a missing number).
        reported = grad_norm is not None
        grad_norm = float(grad_norm) if reported else float("nan")
        sums["grad_norm"] = grad_norm * pairs  # averaged per pair like the rest
        if check_step(self, health, sums["loss"], grad_norm if reported else 0.0):  # non-finite: skip (or raise)
            self.zero_grad()
            self.scheduler.step()
            self.step += 1
            self.skipped_steps += 1
            return {}, 0, 0
        self.optimizer.step()
        self.scheduler.step()
        self.zero_grad()
        self.step += 1
        return sums, pairs, tokens

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_data:
            return {}
        acc = self.accelerator
        self.model.eval()
        b = self.cfg.per_device_eval_batch_size
        n = len(self.eval_data)
        sums: dict[str, float] = defaultdict(float)
        pairs = 0
        starts = range(0, n, b * acc.num_processes)
        # Its own bar (left behind when done), so a long evaluation is never a frozen training bar.
        bar = progress_bar(starts, desc=f"eval {n} pairs", unit="batch", dynamic_ncols=True, leave=False,
                   disable=not (acc.is_main_process and self.cfg.progress_bar))
        # Each process scores a contiguous stripe of every global eval batch; nothing is dropped.
        for start in bar:
            lo = start + acc.process_index * b
            shard = list(range(lo, min(lo + b, n)))
            if not shard:
                if acc.num_processes > 1:
                    # Under FSDP / ZeRO-3 every forward gathers weights collectively: a process with
                    # no pairs left runs one discarded forward so the others do not wait forever.
                    self._forward([0], self.eval_data)
                continue
            with transient_heap():  # no gradients: stack-like temporaries (memory.py)
                losses, metrics, _ = self._forward(shard, self.eval_data)
            sums["loss"] += losses.sum().item()
            for k, v in metrics.items():
                sums[k] += v.double().sum().item()
            pairs += len(shard)
        sums, total = self.all_reduce_sum(dict(sums), pairs)
        return {f"eval/{k}": v / max(total, 1) for k, v in sums.items()}

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, float]:
        self.stop.install()
        try:
            return self._train()
        finally:  # the model leaves with plain autograd (lm_head.TiedGradInPlace)
            self.stop.uninstall()
            for handle in self.in_place_grads:
                handle.release()
            self.in_place_grads = []
            self.logger.close()  # trackers end their run (W&B, MLflow) also when training failed

    def _train(self) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        began = time.perf_counter()
        with together(acc):  # a tracker that cannot start (main process only) stops every process
            self.logger.start(cfg.to_dict() if hasattr(cfg, "to_dict") else None)
        bar = progress_bar(
            total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
            disable=not (acc.is_main_process and cfg.progress_bar),
        )
        window = self.window
        window_start = time.perf_counter()
        last_row: dict[str, float] = {}
        while self.step < self.total_steps:
            lr = self.scheduler.get_last_lr()[0]
            sums, pairs, tokens = self.train_step()
            for k, v in sums.items():
                window["sums"][k] += v
            window["pairs"] += pairs
            window["tokens"] += tokens
            if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                reduced, total_pairs = self.all_reduce_sum(dict(window["sums"]), window["pairs"])
                total_tokens = self.all_reduce_sum({"tokens": window["tokens"]}, 0)[0]["tokens"]
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                row = {"step": self.step, "epoch": round(self.step / self.schedule.steps_per_epoch, 4)}
                row.update({k: v / max(total_pairs, 1) for k, v in reduced.items()})
                row["learning_rate"] = lr
                if cfg.log_throughput:  # wall-clock: the only values that differ between two runs
                    row["tokens_per_second"] = total_tokens / elapsed
                    row["pairs_per_second"] = total_pairs / elapsed
                if cfg.on_nonfinite == "skip":
                    row["skipped_steps"] = self.skipped_steps
                self.log_row(row)
                last_row = row
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", acc=f"{row.get('rewards/accuracies', row.get('accuracy', float('nan'))):.2f}")
                window.update(sums=defaultdict(float), pairs=0, tokens=0)
                window_start = time.perf_counter()
            bar.update(1)  # after the postfix: a log line (progress.LineProgress) shows this step's loss
            paused = time.perf_counter()
            if cfg.eval_steps > 0 and self.step % cfg.eval_steps == 0 and self.step < self.total_steps:
                self.log_eval()
            saved = None
            if cfg.save_steps > 0 and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                saved = self.save_checkpoint()
            # Throughput is training's: time spent evaluating and checkpointing is left out.
            window_start += time.perf_counter() - paused
            test_hook("step", self.step)
            if self.step < self.total_steps and self.stop_requested():
                bar.close()
                self.stop_for_signal(saved)
        bar.close()
        if self.skipped_steps and acc.is_main_process:
            print(f"prefopt: skipped {self.skipped_steps} steps with a non-finite loss or gradient", file=sys.stderr)
        final = dict(last_row)
        if self.eval_data:
            final.update(self.log_eval())
        self.save_final()
        self.logger.close()
        self.wall_time = time.perf_counter() - began
        return final

    def stop_requested(self) -> bool:
        """A signal asked to stop, on any process: all of them agree (the largest signal number of
        any process is all-reduced each step), so every process stops after the same step."""
        signum = float(self.stop.signum or 0)
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            flag = torch.tensor([signum], dtype=torch.float64, device=self.accelerator.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = flag.item()
            if signum and self.stop.signum is None:
                self.stop.signum = int(signum)
        return signum > 0

    def stop_for_signal(self, saved: Path | None) -> None:
        """Checkpoint the step just finished (unless it was saved already) and raise ``RunInterrupted``."""
        checkpoint = saved if saved is not None else self.save_checkpoint()
        self.logger.close()
        name = signal.Signals(self.stop.signum).name
        raise RunInterrupted(f"stopped by {name} after step {self.step} of {self.total_steps}; checkpoint "
                             f"{checkpoint} written; resume by running the same command with --resume",
                             int(self.stop.signum))

    def log_row(self, row: dict[str, Any]) -> None:
        """One row to metrics.jsonl and the trackers (main process). A failed write is one line naming
        the device and the last intact checkpoint, on every process alike; the rows before it stay."""
        with together(self.accelerator), write_errors(self.output_dir, "metrics.jsonl"):
            self.logger.log(row)

    def log_eval(self) -> dict[str, float]:
        began = time.perf_counter()
        row = self.evaluate()
        if row and self.cfg.log_throughput:  # wall-clock, like tokens_per_second (TRL's eval_runtime)
            row["eval/runtime"] = time.perf_counter() - began
            row["eval/pairs"] = len(self.eval_data)
        if row:
            self.log_row({"step": self.step, **row})
        return row

    # ------------------------------------------------------------------ state and saving
    def state_dict(self, optimizer_state: dict | None = None) -> dict[str, Any]:
        """Everything but the model and the RNGs that a resumed run needs to continue exactly.
        ``optimizer_state``: the full state from ``gather_optimizer_state`` when it is sharded."""
        window = self.window
        deepspeed = engine_of(self.accelerator) == "deepspeed"
        if deepspeed:  # each process's ZeRO partition is in the engine's own files (save_engine_state)
            optimizer_state = None
        elif optimizer_state is None:
            optimizer_state = self.optimizer.state_dict()
        return {
            "step": self.step,
            "optimizer": optimizer_state,
            "deepspeed_tag": self.engine_tag if deepspeed else None,
            "scheduler": self.scheduler.state_dict(),
            "window": {"sums": dict(window["sums"]), "pairs": window["pairs"], "tokens": window["tokens"]},
            "skipped_steps": self.skipped_steps,
            "num_processes": self.accelerator.num_processes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Everything ``state_dict`` saved. Under DeepSpeed the optimizer is not in ``state``: it was
        restored with the weights by ``load_engine_state``."""
        engine = engine_of(self.accelerator)
        if engine == "deepspeed":
            pass
        elif engine == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            # The full state, keyed by parameter name; each process keeps its own shard of it.
            set_optimizer_state_dict(self.model, self.optimizer.optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LambdaLR warns that its lambdas are not saved: they are rebuilt
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        window = state.get("window")
        if window is not None:
            self.window.update(sums=defaultdict(float, window["sums"]), pairs=window["pairs"], tokens=window["tokens"])

    @property
    def engine_tag(self) -> str:
        """The folder DeepSpeed's own checkpoint of this step goes in (Hugging Face Trainer's name)."""
        return f"global_step{self.step}"

    def save_engine_state(self, directory: Path) -> None:
        """Under DeepSpeed, every process writes its ZeRO partition of the optimizer (fp32 master
        weights and moments; under ZeRO-3 the weights' partition too) with the engine's own
        ``save_checkpoint`` into ``directory/global_stepSTEP/``, beside the ``latest`` and
        ``zero_to_fp32.py`` files DeepSpeed users know. A collective: every process calls it. No-op
        for the other engines, whose optimizer state goes into ``training_state.pt``.

        ``save_checkpoint`` has collectives between its writes (barriers, the tag check), so a write
        that failed on one process and raised there would leave the others waiting in the next one
        for good. Its writes therefore go through ``_GuardedWrites``: a failed write is remembered,
        the process's later writes are skipped, every process gets through every collective, and
        the first failure is raised only once ``save_checkpoint`` has returned (the caller settles
        it across processes). ``latest`` is written here rather than by DeepSpeed, for the same
        reason (DeepSpeed writes it with a plain ``open`` before its last barrier)."""
        if engine_of(self.accelerator) != "deepspeed":
            return
        engine = self.model
        guard = _GuardedWrites(engine.checkpoint_engine, f"partition{self.accelerator.process_index}", self.step)
        engine.checkpoint_engine = guard
        engine._copy_recovery_script = guard.guarded(engine._copy_recovery_script)  # zero_to_fp32.py
        try:
            engine.save_checkpoint(str(directory), tag=self.engine_tag, client_state={}, save_latest=False)
        finally:
            engine.checkpoint_engine = guard.inner
            del engine._copy_recovery_script
        if guard.error is not None:
            raise guard.error
        if self.accelerator.is_main_process:
            (directory / "latest").write_text(self.engine_tag)

    def load_engine_state(self, directory: Path, tag: str) -> None:
        """Under DeepSpeed: each process loads its own ZeRO partition (and the weights) from the
        engine's files in ``directory/tag``. The checkpoint must come from as many processes: ZeRO
        partitions are per process."""
        load_path, _ = self.model.load_checkpoint(str(directory), tag=tag, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise PrefoptError(f"{directory / tag}: DeepSpeed could not load this checkpoint")

    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def gather_model_state(self) -> dict | None:
        """The full state dict when the weights are sharded (FSDP, ZeRO-3), else ``None``. Every
        process must call this (it is a collective), before the main process writes."""
        return self.accelerator.get_state_dict(self.model) if is_sharded(self.accelerator) else None

    def gather_optimizer_state(self) -> dict | None:
        """Under FSDP2, the full optimizer state keyed by parameter name (a collective: every process
        calls it; the main process receives it, on CPU). Elsewhere ``None``: the main process's own
        ``optimizer.state_dict()`` is already the whole state (DDP replicates it)."""
        if engine_of(self.accelerator) != "fsdp2":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, full: dict[str, torch.Tensor]) -> None:
        """Under FSDP2: full weights (as saved) into the sharded model, each process keeping its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        model = self.unwrapped_model()
        names = set(model.state_dict())
        unexpected = sorted(set(full) - names)
        if unexpected:
            raise PrefoptError(f"the checkpoint's weights do not fit this model (e.g. {unexpected[0]!r})")
        for name in sorted(names - set(full)):  # tied weights are saved once, under their twin's name
            twin = _tied_twin(model, name)
            if twin is None or twin not in full:
                raise PrefoptError(f"the checkpoint lacks weights of this model (e.g. {name!r})")
            full[name] = full[twin]
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))

    def save_model(self, directory: Path, state_dict: dict | None = None) -> None:
        """Write the model as the run saves it (``save_model`` of the constructor, else
        ``save_pretrained``). Main process only; ``state_dict`` from ``gather_model_state``."""
        model = self.unwrapped_model()
        kwargs = {"state_dict": state_dict} if state_dict is not None else {}
        if self.save_model_fn is not None:
            self.save_model_fn(model, directory, **kwargs)
        else:
            model.save_pretrained(directory, **kwargs)

    @property
    def data_fingerprint(self) -> str | None:
        """The training pairs' fingerprint (``data.fingerprint``), recorded in every checkpoint so a
        resumed run can check it trains on the same data. Once, at the first save; a store knows it
        from its build, pairs in memory are hashed."""
        if not hasattr(self, "_data_fingerprint"):
            try:
                self._data_fingerprint = fingerprint_of_pairs(self.train_data)
            except (AttributeError, TypeError):  # rows that are not tokenized pairs: nothing to record
                self._data_fingerprint = None
        return self._data_fingerprint

    def save_checkpoint(self) -> Path:
        """``checkpoint-STEP/``: model, optimizer, scheduler, step and RNG states. Written into a
        temporary directory and renamed, so a checkpoint that exists is complete (checkpoint.py)."""
        return save_checkpoint(self)

    def save_final(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        state_dict = self.gather_model_state()
        # Written whole into a staging folder, flushed, then each file renamed into place: like a
        # checkpoint, a model file at the top of output_dir is never half written.
        staging = self.output_dir / f"{TMP_PREFIX}final-model"
        with together(acc), write_errors(self.output_dir, "the final model", cleanup=staging):
            if acc.is_main_process:
                if self.run_dir is not None:
                    self.run_dir.wrote(staging.name)
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
                self.save_model(staging, state_dict)
                simulate_full_disk("final")
                fsync_tree(staging)
                if self.run_dir is not None:
                    self.run_dir.install_model(staging)
                    self.run_dir.commit()
                else:
                    move_files(staging, self.output_dir)


def _tied_twin(model: torch.nn.Module, name: str) -> str | None:
    """The saved name of a weight tied to ``name`` (the input embeddings for a tied LM head)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and out.weight is inp.weight:
        for n, p in model.named_parameters(remove_duplicate=False):
            if p is inp.weight and n != name:
                return n
    return None


def _grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class _GuardedWrites:
    """DeepSpeed's checkpoint engine (``torch.save`` and ``makedirs``), remembering the first failed
    write instead of raising it and skipping the writes after it (see ``Trainer.save_engine_state``).
    ``test_point`` is this process's ``PREFOPT_TEST_ENOSPC`` name (``partitionR:STEP``)."""

    def __init__(self, inner, test_point: str, step: int):
        self.inner, self.test_point, self.step = inner, test_point, step
        self.error: Exception | None = None

    def guarded(self, write: Callable) -> Callable:
        def call(*args, **kwargs):
            if self.error is not None:
                return None
            try:
                simulate_full_disk(self.test_point, self.step)
                return write(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as a RuntimeError
                self.error = e
                return None
        return call

    def save(self, state_dict, path: str):
        return self.guarded(self.inner.save)(state_dict, path)

    def makedirs(self, path, exist_ok: bool = False):
        return self.guarded(self.inner.makedirs)(path, exist_ok=exist_ok)

    def __getattr__(self, name: str):  # create, commit, is_decoupled, ...: the engine's own
        return getattr(self.inner, name)
