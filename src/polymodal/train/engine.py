"""The one training loop. Every recipe is a model, a `loss_fn(model, batch) -> loss` (or `(loss, metrics)`), a
resumable batch stream and a config; the loop does the rest.

AdamW with decoupled weight decay (Loshchilov & Hutter, 2019) on parameter groups that spare norms, biases and
position tables (nanoGPT's `configure_optimizers` split); linear warmup then cosine decay (Loshchilov & Hutter,
SGDR, 2017); gradient accumulation; global-norm clipping; bf16/fp16 autocast; optional `torch.compile`;
activation checkpointing (`torch.utils.checkpoint`); freezing by name prefix; DDP or FSDP2 under torchrun.

A step whose loss or gradient norm is not finite is not applied (no optimizer or scheduler step), is logged, and
counted; checkpoints are only written from finite parameters (see checkpointing.py for atomicity). SIGINT and
SIGTERM stop the run at the next step boundary, after a checkpoint of that step (`TrainingInterrupted`). The JSON
files a run writes hold no NaN or Infinity (not JSON): a non-finite number is written as null.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from polymodal.train.checkpointing import CheckpointDir, _fault, set_rng_state
from polymodal.train.config import ConfigError, TrainConfig
from polymodal.train.distributed import World, mean_across, wrap


@dataclass
class Task:
    """What a recipe hands the loop. `loss_fn` gets the model as the loop runs it (possibly a DDP wrapper: call
    `model(...)`, whose forward DDP synchronizes, not other methods). `data` has `next_batch()`, `state_dict()`
    and `load_state_dict()`; `evaluate(model) -> dict` runs once at the end (main process); `export(model,
    out_dir)` saves the result."""

    model: nn.Module
    loss_fn: Callable
    data: object
    evaluate: Callable[[nn.Module], dict] | None = None
    export: Callable[[nn.Module, Path], None] | None = None
    after_step: Callable[[nn.Module], None] | None = None  # e.g. CLIP's clamp of its temperature


# ------------------------------------------------------------------------------------- model set-up


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> int:
    """Turn off gradients of parameters named `prefix` or under `prefix.`; returns how many were frozen."""
    names = dict(model.named_parameters())
    count = 0
    for prefix in prefixes:
        hits = [p for n, p in names.items() if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"freeze: no parameter is named {prefix!r} or lies under it "
                              f"(top-level names: {', '.join(tops)})")
        for p in hits:
            p.requires_grad_(False)
        count += len(hits)
    return count


def _checkpoint_forward(module: nn.Module) -> None:
    inner = module.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        # non-reentrant: supports keyword arguments and inputs that do not require grad
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward  # an instance attribute: parameter names and state-dict keys are unchanged


def enable_activation_checkpointing(model: nn.Module, names: tuple[str, ...]) -> None:
    """Recompute the activations of the named submodules in backward instead of storing them. A module that
    has its own `gradient_checkpointing` attribute gets it set; a ModuleList gets each of its children
    wrapped (one checkpoint per transformer block)."""
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"checkpointing: the model has no submodule {name!r}") from None
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
        elif isinstance(module, nn.ModuleList):
            for child in module:
                _checkpoint_forward(child)
        else:
            _checkpoint_forward(module)


def _no_decay(name: str, module: nn.Module, p: Tensor) -> bool:
    norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or \
        type(module).__name__.endswith("Norm")
    return p.ndim < 2 or norm or "position" in name or "pos_embed" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on matrices (linear, conv, token embeddings), none on biases, norm
    weights, scalars and position tables (decaying those only pulls them to zero; nanoGPT, timm)."""
    decay, no_decay, seen = [], [], set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:  # a tied weight (OPT's lm_head) is one parameter, once
                seen.add(id(p))
                (no_decay if _no_decay(f"{mname}.{pname}", module, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """lr multiplier: linear from 1/(warmup+1) to 1 over `warmup` steps, then cosine down to `min_ratio`.
    A callable object (not a lambda) so LambdaLR's state_dict stores it."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def to_device(batch, device: torch.device):
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ------------------------------------------------------------------------------------ run directory


def finite_json(value):
    """`value` with every NaN or infinite float replaced by None: JSON has no NaN or Infinity, and Python's
    `json` would write them as invalid tokens that other readers reject."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dump_json(value, **kwargs) -> str:
    return json.dumps(finite_json(value), allow_nan=False, **kwargs)


def _stored_results(out: Path, steps: int) -> dict | None:
    """A finished run's results.json, when it is readable and reports `steps` steps."""
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and results.get("steps") == steps else None


def check_run_dir(out: str | Path, config: TrainConfig, resume: bool, *, quiet: bool = False) -> dict | None:
    """What `out` allows, decided from file names before any data or model is loaded: a fresh run into a
    directory that holds checkpoints, or a resume past `max_steps`, raises ConfigError; a resume of a run that
    already finished `max_steps` and wrote its results returns those results (nothing is left to do; a note
    on stderr says so unless `quiet`)."""
    out = Path(out)
    latest = CheckpointDir(out / "checkpoints").latest()
    if latest is None:
        return None
    if not resume:
        raise ConfigError(f"{out} already holds checkpoints (newest: {latest.name}); pass --resume to continue, "
                          "or choose another --out")
    step = int(latest.name[5:])
    if step > config.max_steps:
        raise ConfigError(f"{out} is at step {step}, past max_steps={config.max_steps}; resume with max_steps of "
                          f"at least {step}, or choose another --out")
    stored = _stored_results(out, config.max_steps) if step == config.max_steps else None
    if stored is not None and not quiet:
        print(f"{out}: all {config.max_steps} steps are done; reporting its stored results", file=sys.stderr)
    return stored


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run at a step boundary; `checkpoint` holds that step."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"{self.signal_name} after step {step}: checkpoint {checkpoint}")


class _StopSignals:
    """While active, SIGINT and SIGTERM only record that a stop was asked for; the loop saves and stops at the
    end of the current step. A repeated signal changes nothing (torchrun forwards the terminal's Ctrl-C to
    processes that got it already), so the save always completes. Signal handlers can only be set from the
    main thread; elsewhere signals keep their usual effect."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:
                signal.signal(sig, handler)

    def agreed(self, world: World) -> int:
        """The signal that asked for a stop, on any process (0: none); every process gets the same answer, so
        all of them save the same step."""
        if not world.distributed:
            return self.signum
        flag = torch.tensor(float(self.signum), device=world.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag)


# ------------------------------------------------------------------------------------------- logging


class _Log:
    """Human lines (stderr and OUT/train.log) and metrics (OUT/metrics.jsonl, TensorBoard when installed)."""

    def __init__(self, out: Path, main: bool, resume_step: int | None, quiet: bool = False):
        self.main, self.out, self.quiet = main, out, quiet
        self.tb = None
        if not main:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out / "metrics.jsonl"
        # on resume, forget what was logged after the checkpoint: those steps run again. A line cut off by a
        # crash, or one without a step, cannot be placed: it is dropped, and said so
        kept, dropped = [], 0
        if resume_step is not None and self.metrics_path.is_file():
            for line in self.metrics_path.read_text(errors="replace").splitlines():
                if not line.strip():
                    continue
                step = _logged_step(line)
                if step is None:
                    dropped += 1
                elif step <= resume_step:
                    kept.append(line + "\n")
        self.metrics_path.write_text("".join(kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self.tb = None
        if dropped:
            self.say(f"{self.metrics_path}: dropped {dropped} unreadable line(s) (cut off, or without a step)")

    def say(self, message: str) -> None:
        if not self.main:
            return
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)
        with open(self.out / "train.log", "a") as f:
            f.write(message + "\n")

    def metrics(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(dump_json(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _logged_step(line: str) -> int | None:
    """The step of one metrics.jsonl line, or None when the line is not a JSON object with an integer step."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if type(step) is int else None


# ---------------------------------------------------------------------------------------------- loop


def _finite_params(model: nn.Module, world: World) -> bool:
    """Whether every parameter is finite, agreed by all processes (FSDP2: each checks its own shards)."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in model.parameters()]
    ok = torch.tensor(float(all(bool(torch.isfinite(p).all()) for p in local)), device=world.device)
    return bool(mean_across(world, ok) == 1.0)


def _split(out) -> tuple[Tensor, dict]:
    return (out[0], dict(out[1])) if isinstance(out, tuple) else (out, {})


def fit(task: Task, config: TrainConfig, out: str | Path, *, world: World | None = None,
        resume: bool = False, quiet: bool = False) -> dict:
    """Train `task` for `config.max_steps` optimizer steps; checkpoints in `out/checkpoints/`. With
    `resume`, continue exactly from the newest checkpoint that reads back whole (a run that already finished
    returns its stored results). Returns a summary (also written to `out/results.json`, with the evaluation
    when the task has one): `final_loss` is the loss of the last step, `smoothed_loss` the progress bar's
    moving average of the step losses (weight 0.1 on the newest), `seconds` the training time over every
    session of the run. SIGINT/SIGTERM save a checkpoint at the end of the current step and raise
    `TrainingInterrupted`. quiet: the run's notes (checkpoints, evaluation) go to `out/train.log` only, not
    to stderr: for a caller that reports the run itself (the demo). The progress bar stays (on a terminal)."""
    world = world or World()
    out = Path(out)
    stored = check_run_dir(out, config, resume, quiet=not world.main)
    if stored is not None:
        return stored
    if config.batch_size % (config.grad_accum * world.size):
        raise ConfigError(f"batch_size {config.batch_size} must split evenly into grad_accum {config.grad_accum} "
                          f"micro-steps over {world.size} processes")
    ckpts = CheckpointDir(out / "checkpoints", keep_last=config.keep_last)

    # FSDP2 shards the parameters over processes; the end-of-run evaluation and export get a whole copy, kept on
    # the host meanwhile (a plain forward on the sharded model would be a collective call)
    whole = copy.deepcopy(task.model) if world.distributed and config.strategy == "fsdp" and world.main else None
    raw = task.model.to(world.device)
    freeze(raw, config.freeze)
    enable_activation_checkpointing(raw, config.checkpointing)
    model = wrap(raw, world, config.strategy)
    fsdp = world.distributed and config.strategy == "fsdp"
    ddp = world.distributed and not fsdp
    if config.compile:
        model.compile()  # in place: parameter names and checkpoint keys stay those of the plain model
    params = [p for p in raw.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("every parameter is frozen: nothing to train")
    opt = torch.optim.AdamW(param_groups(raw, config.weight_decay), lr=config.lr)
    schedule = WarmupCosine(config.warmup, config.max_steps, config.min_lr_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    scaler = torch.amp.GradScaler(world.device.type, enabled=config.precision == "fp16")
    amp = contextlib.nullcontext() if config.precision == "fp32" else torch.autocast(
        world.device.type, dtype=torch.bfloat16 if config.precision == "bf16" else torch.float16)

    start, skipped, seconds_before = 0, 0, 0.0
    last_loss, smooth = float("nan"), None
    latest, state, rng, rejected = None, None, None, []
    if resume:
        latest, state, rng, rejected = ckpts.load_newest(world.rank, lambda ok: _all(world, ok))
        if latest is None and rejected:
            raise ConfigError(f"--resume: none of the {len(rejected)} checkpoints in {ckpts.root} reads back whole "
                              f"(newest: {rejected[0][1]}); delete {ckpts.root} to start over, or train into "
                              "another --out")
    if state is not None:  # applied before anything in `out` changes: a state that does not fit leaves it as it was
        start, skipped = state["step"], state["skipped"]
        seconds_before = float(state.get("seconds", 0.0))
        last_loss, smooth = float(state.get("loss", float("nan"))), state.get("smoothed_loss")
        try:
            _load_model_and_optimizer(raw, opt, state, fsdp)
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            task.data.load_state_dict(state["data"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"{latest} does not fit this run ({first}); resume with the settings it was "
                              f"written with ({out / 'config.json'})") from None
        # load_state_dict restored the saved schedule's shape; the current config's wins (a resume may extend
        # max_steps), which is the same function when the config is unchanged
        sched.lr_lambdas[0] = schedule
        if rng is not None:
            set_rng_state(rng)
    log = _Log(out, world.main, resume_step=start if state is not None else None, quiet=quiet)
    for path, reason in rejected:  # every process has read them: rank 0 can move them
        aside = ckpts.set_aside(path) if world.main else path
        log.say(f"--resume: {reason}; that checkpoint is set aside as {aside}, and an older one is used")
    if state is not None:
        log.say(f"resumed from {latest} (step {start})")
    elif resume:
        log.say(f"--resume: no complete checkpoint in {ckpts.root}; starting from step 0")
    if world.main:
        ckpts.clean_leftovers()
        (out / "config.json").write_text(dump_json(asdict(config), indent=2))
        if config.warmup_steps is None and config.warmup < config.default_warmup:
            log.say(f"warm-up: {config.warmup} steps ({config.WARMUP_FRACTION:.0%} of max_steps, less than the "
                    f"recipe's {config.default_warmup} for its default length; set warmup_steps to choose)")

    from tqdm import tqdm

    bar = tqdm(total=config.max_steps, initial=start, disable=True if not world.main else None, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    barrier = (lambda: torch.distributed.barrier()) if world.distributed else (lambda: None)
    t0, seconds = time.perf_counter(), seconds_before

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - t0

    def save(step: int) -> Path:
        if not _finite_params(raw, world):  # never write a NaN checkpoint, never replace a good one with it
            raise RuntimeError(f"step {step}: parameters are not finite; no checkpoint written "
                               f"(the last good one is {ckpts.latest()})")
        state = _full_state(raw, opt, fsdp)
        if world.main:
            state.update(step=step, skipped=skipped, scheduler=sched.state_dict(), scaler=scaler.state_dict(),
                         data=task.data.state_dict(), loss=last_loss, smoothed_loss=smooth, seconds=seconds)
        path = ckpts.save(step, state if world.main else None, world.rank, barrier)
        log.say(f"step {step}: checkpoint {path}")
        return path

    with _StopSignals() as stop:
        for step in range(start + 1, config.max_steps + 1):
            _fault("step", step)
            model.train()
            loss_sum = torch.zeros((), device=world.device)
            sums: dict[str, float] = {}
            for micro in range(config.grad_accum):
                batch = to_device(task.data.next_batch(), world.device)
                last = micro == config.grad_accum - 1
                sync = model.no_sync() if ddp and not last else contextlib.nullcontext()
                with sync:
                    with amp:
                        loss, metrics = _split(task.loss_fn(model, batch))
                    scaler.scale(loss.float() / config.grad_accum).backward()
                loss_sum += loss.detach().float() / config.grad_accum
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / config.grad_accum
            loss_value = mean_across(world, loss_sum)
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad if config.clip_grad > 0 else float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            finite_loss, finite_grad = bool(torch.isfinite(loss_value)), bool(torch.isfinite(norm))
            if finite_loss and finite_grad:
                scaler.step(opt)
                scaler.update()
                sched.step()
                if task.after_step is not None:
                    with torch.no_grad():
                        task.after_step(raw)
            else:
                skipped += 1
                what = f"loss is {float(loss_value)}" if not finite_loss else f"gradient norm is {float(norm)}"
                log.say(f"step {step}: {what}; the update was not applied (skipped steps so far: {skipped})")
                if scaler.is_enabled():
                    scaler.update()  # fp16: lower the scale, as a skipped scaler step would
            opt.zero_grad(set_to_none=True)

            seconds = elapsed()  # training time up to this step's end (what its checkpoint and the summary say)
            last_loss = float(loss_value)
            if finite_loss:
                smooth = last_loss if smooth is None else 0.9 * smooth + 0.1 * last_loss
            bar.update(1)
            if step % config.log_every == 0 or step == config.max_steps:
                record = {"step": step, "loss": last_loss, "lr": sched.get_last_lr()[0], "grad_norm": float(norm)}
                for k in sorted(sums):
                    record[k] = float(mean_across(world, torch.tensor(sums[k], device=world.device)))
                record["elapsed_s"] = round(seconds, 3)
                log.metrics(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", smoothed=f"{smooth if smooth is not None else last_loss:.4f}",
                                lr=f"{record['lr']:.2e}")
            scheduled = step % config.save_every == 0 or step == config.max_steps
            path = save(step) if scheduled else None
            signum = stop.agreed(world)
            if signum:
                path = path or save(step)
                bar.close()
                log.say(f"{signal.Signals(signum).name}: stopped after step {step}; checkpoint {path}")
                log.close()
                raise TrainingInterrupted(signum, step, path)
    bar.close()

    summary = {"steps": config.max_steps, "final_loss": last_loss, "smoothed_loss": smooth,
               "skipped_steps": skipped, "seconds": round(seconds, 2)}
    final = raw
    if fsdp:
        full = _full_state(raw, None, fsdp=True)["model"]  # collective
        if world.main:
            whole.load_state_dict(full)
            final = whole.to(world.device)
    if world.main:
        final.eval()
        if task.evaluate is not None:
            summary["eval"] = task.evaluate(final)
            log.say("evaluation: " + dump_json(summary["eval"]))
        if task.export is not None:
            task.export(final, out / "model")
            summary["model"] = str(out / "model")
        summary = finite_json(summary)
        (out / "results.json").write_text(dump_json(summary, indent=2))
    log.close()
    return finite_json(summary)


def _all(world: World, ok: bool) -> bool:
    """Whether `ok` holds on every process."""
    return bool(mean_across(world, torch.tensor(float(ok), device=world.device)) == 1.0)


def _full_state(raw: nn.Module, opt, fsdp: bool) -> dict:
    """Model and optimizer state as whole tensors on CPU (FSDP2: gathered; a collective call)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"model": get_model_state_dict(raw, options=options),
                "optimizer": get_optimizer_state_dict(raw, opt, options=options) if opt is not None else None}
    return {"model": {k: v.detach().cpu() for k, v in raw.state_dict().items()}, "optimizer": opt.state_dict()}


def _load_model_and_optimizer(raw: nn.Module, opt, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(raw, state["model"], options=options)
        set_optimizer_state_dict(raw, opt, state["optimizer"], options=options)
        return
    raw.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
