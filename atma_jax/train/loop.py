"""The host training loop: data -> global arrays -> pure steps; logs, evals, checkpoints.

Batches reach the devices `train.prefetch` steps ahead of the step (prefetch.py). The host never
waits on the device per step: the metrics of every `train.log_every` steps are read in one
transfer after the NEXT step has been dispatched (one step late), which also closes a
device-synchronized throughput window (progress.py). Evaluation and checkpoints happen every
`train.eval_every` / `train.checkpoint_every` steps and at the end; they end the current window
(their time is not counted as training). SIGTERM / SIGINT finish the current step, save a
checkpoint and return cleanly. A non-finite step stops the run or is skipped (divergence.py);
before a checkpoint the metrics of the step being saved are read, so only finite states are
written. Resuming picks `resume_step` or the newest intact checkpoint (checkpoint.py), moves any
newer step aside and drops the metrics.jsonl rows after it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from atma_jax import compile_cache
from atma_jax.config import Config, ConfigError, to_json
from atma_jax.train import checkpoint as ckpt
from atma_jax.train.divergence import NonFiniteGuard
from atma_jax.train.mesh import batch_sharding, check_batch_divides, make_mesh
from atma_jax.summary import count_params
from atma_jax.train import progress as progress_lib
from atma_jax.train.metrics import MetricWriter, flops_per_token
from atma_jax.train.prefetch import DevicePrefetcher
from atma_jax.train.state import init_state, setup_state
from atma_jax.train.step import make_eval_step, make_train_step, model_losses


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Process-local rows -> one global array per key (rows ordered by process)."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
  return out


class _StopFlag:
  """Set by SIGTERM / SIGINT; the loop checks it between steps."""

  def __init__(self):
    self.requested = False
    self._prev = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._prev[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    for sig, h in self._prev.items():
      signal.signal(sig, h)


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


@contextlib.contextmanager
def _closing(mngr, writer, bar):
  """Whatever ends the loop (a divergence too), a save in flight completes before returning."""
  try:
    yield
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    if bar is not None:
      bar.close()


def _set_aside_newer(run_dir, step: int, is_main: bool, log) -> None:
  """Moves checkpoints newer than the resumed `step` out of the manager's way (kept on disk)."""
  if is_main:
    moved = ckpt.set_aside_newer(run_dir, step)
    if moved:
      log(f"moved the checkpoints after step {step} aside, kept in "
          f"{', '.join(str(p) for p in moved)}")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("atma_set_aside_newer")


def default_data_fn(cfg, process_index, process_count):
  from atma_jax.data.pipeline import make_train_iterator
  return make_train_iterator(cfg, process_index=process_index, process_count=process_count,
                             log=None)


def default_eval_data_fn(cfg, process_index, process_count):
  from atma_jax.data.pipeline import make_eval_batches
  return make_eval_batches(cfg, process_index=process_index, process_count=process_count,
                           clamp=True, log=None)


def run(cfg: Config, *, resume: bool = False, resume_step: int | None = None, model_fn=None,
        losses_fn: Callable = model_losses, data_fn: Callable = default_data_fn,
        eval_data_fn: Callable | None = default_eval_data_fn, stop_after: int | None = None,
        progress: bool = True, log=print) -> dict[str, Any]:
  """Trains `cfg` (with `resume`: from the newest intact checkpoint, or `resume_step`); returns
  a summary. Raises DivergenceError on a non-finite step (train.on_nonfinite="stop").

  `stop_after`: leave the loop (saving a checkpoint) once the state reaches that step, as if
  interrupted; used by the resume tests.
  """
  resume = resume or resume_step is not None
  t, pidx, pcount = cfg.train, jax.process_index(), jax.process_count()
  is_main = pidx == 0
  cfg.validate()  # cadences, batch sizes (a config built by hand may skip resolve())
  mesh = make_mesh(cfg.mesh)
  check_batch_divides(mesh, t)
  if t.global_batch % pcount:
    raise ConfigError(f"train.global_batch={t.global_batch} must be divisible by the "
                      f"{pcount} processes (each reads its own rows).")
  setup = setup_state(cfg, mesh, model_fn)
  for note in setup.notes:
    log(f"[sharding] {note}")
  # The data is opened (shards checked) before anything is written: a run that fails on its
  # input leaves no run directory behind.
  data_it = data_fn(cfg, pidx, pcount)
  raw_eval = (list(eval_data_fn(cfg, pidx, pcount))
              if eval_data_fn is not None and t.eval_batches > 0 else [])
  mngr = ckpt.make_manager(t.run_dir, keep=t.keep_checkpoints, async_save=t.async_checkpoint)
  latest = mngr.latest_step()
  if latest is not None and not resume:
    raise ConfigError(f"{ckpt.checkpoint_dir(t.run_dir)} already has checkpoints (latest step "
                      f"{latest}); pass --resume to continue that run or set train.run_dir to a "
                      "new directory.")
  if resume_step is not None and latest is None:
    raise ckpt.CheckpointError(f"--step {resume_step}: no checkpoints under "
                               f"{ckpt.checkpoint_dir(t.run_dir)}.")
  if resume and latest is not None:
    restored, state = ckpt.restore_intact(mngr, setup.abstract, data_it, cfg, step=resume_step,
                                          warn=log)
    if restored != latest:
      _set_aside_newer(t.run_dir, restored, is_main, log)
      mngr.reload()
    log(f"resumed from {ckpt.checkpoint_dir(t.run_dir)}/{restored}")
  else:
    if resume:
      log(f"--resume: no checkpoint under {ckpt.checkpoint_dir(t.run_dir)}; starting fresh")
    state = init_state(cfg, setup, model_fn)
  if is_main:
    os.makedirs(t.run_dir, exist_ok=True)
    with open(os.path.join(t.run_dir, "config.json"), "w") as f:
      f.write(to_json(cfg))

  bsh = batch_sharding(mesh)
  train_step = make_train_step(cfg, setup, mesh, losses_fn=losses_fn)
  eval_step = make_eval_step(cfg, setup, mesh, losses_fn=losses_fn)
  eval_batches = [to_global(b, bsh) for b in raw_eval]
  if is_main and 0 < len(eval_batches) < t.eval_batches:
    log(f"[eval] the validation split holds {len(eval_batches)} batches of {t.micro_batch} x "
        f"{t.seq_len} tokens; evaluating on those {len(eval_batches)} "
        f"(train.eval_batches={t.eval_batches})")

  n_params = count_params(cfg.model)
  fpt = flops_per_token(n_params, cfg.model.num_layers, cfg.model.hidden_size, t.seq_len)
  peak = progress_lib.resolve_peak(t.mfu_peak)
  start = int(jax.device_get(state.step))
  # rows after the resumed step were logged by the run that is being replaced (kill, fallback)
  writer = MetricWriter(t.run_dir, enabled=is_main, keep_through=start if start else -1)
  guard = NonFiniteGuard(t.on_nonfinite, lambda: (
      None if mngr.latest_step() is None
      else str(ckpt.checkpoint_dir(t.run_dir) / str(mngr.latest_step()))))
  bar = None
  if progress and is_main:
    from tqdm import tqdm
    bar = tqdm(total=t.steps, initial=start, desc=cfg.name, dynamic_ncols=True)
    bar.write(peak.label)

  def evaluate(st, step):
    if not eval_batches:
      return None
    tot = jax.device_get([eval_step(st, b) for b in eval_batches])  # one transfer
    loss_sum = sum(float(m["loss_sum"]) for m in tot)
    toks = sum(int(m["tokens"]) for m in tot)
    val = loss_sum / toks
    writer.write({"step": step, "val_loss": val, "val_tokens": toks})
    if bar is not None:
      bar.write(f"step {step}: val_loss {val:.4f}")
    return val

  history: dict[str, list] = {"train_loss": [], "val_loss": []}
  windows: list[dict[str, Any]] = []
  pending: list = []  # (step, device metrics) dispatched and not yet read
  interrupted = False

  def flush(upto: int, clock: progress_lib.WindowClock) -> None:
    """Reads the metrics of the pending steps <= `upto` (waits for step `upto` to finish),
    applies the non-finite policy to each, and closes the throughput window there."""
    nonlocal pending
    done = [p for p in pending if p[0] <= upto]
    if not done:
      return
    pending = pending[len(done):]
    ms = [{k: float(v) for k, v in m.items()}
          for m in jax.device_get([m for _, m in done])]  # one transfer
    seconds = clock.lap()
    last_step = done[-1][0]
    last_skipped = False
    for (step_i, _), m in zip(done, ms):
      skipped = guard.check(step_i, m)  # raises DivergenceError to stop
      history["train_loss"].append((step_i, m["loss"]))
      if skipped:
        if bar is not None:
          bar.write(f"step {step_i}: non-finite loss or gradient, update skipped "
                    f"({guard.skipped} so far)")
        if step_i == last_step:
          last_skipped = True
        else:
          writer.write({"step": step_i, "loss": m["loss"], "skipped_nonfinite": True})
    m = {k: v for k, v in ms[-1].items() if k != "finite"}
    rec = {"step": last_step, **m}
    if last_skipped:
      rec["skipped_nonfinite"] = True
    if last_step == start + 1:  # the first step of this process: compile + run
      rates = None
      compiles = compile_log.since(first_mark)
      rec["first_step_s"] = seconds
      first_compile.update(compile_cache.summarize(compiles))
      rec["first_step_compile"] = first_compile
      if is_main:
        (bar.write if bar is not None else log)(
            f"step {last_step}: {seconds:.1f} s (compile + run); "
            f"{compile_cache.describe(compiles, compile_cache.active_dir())}")
    else:
      rates = progress_lib.window_rates(
          len(done), sum(int(x["tokens"]) for x in ms), seconds, flops_per_token=fpt,
          num_devices=jax.device_count(), peak=peak)
      rec.update(rates)
    windows.append({"step": last_step, **({"first_step_s": seconds} if rates is None
                                           else rates)})
    writer.write(rec)
    if bar is not None:
      bar.set_postfix(progress_lib.postfix(m["loss"], rates), refresh=False)
      bar.update(len(done))

  feed = DevicePrefetcher(data_it, lambda b: to_global(b, bsh), depth=t.prefetch)
  clock = progress_lib.WindowClock()
  compile_log = compile_cache.CompileLog.get()
  first_compile: dict[str, Any] = {}  # what compiling the first step did (summarize)

  def save(step, force=False):
    flush(step, clock)  # the metrics (finite flag) of the step about to be saved
    ckpt.save(mngr, step, state, feed, cfg, force=force)

  t0 = time.time()
  with _StopFlag() as stop, _closing(mngr, writer, bar), feed:
    if start == 0:
      v = evaluate(state, 0)
      if v is not None:
        history["val_loss"].append((0, v))
    step = start
    clock.restart()
    first_mark = compile_log.mark()
    while step < t.steps:
      state, metrics = train_step(state, next(feed))
      step += 1
      pending.append((step, metrics))
      # a log window that ended at the previous step is read now that this step is queued
      if step - 1 > start and (step - 1) % t.log_every == 0:
        flush(step - 1, clock)
      signalled = stop.requested
      if pcount > 1:  # all processes must agree; ask only every log_every steps
        signalled = _any_process(signalled) if step % t.log_every == 0 else False
      want_stop = signalled or (stop_after is not None and step >= stop_after)
      is_eval = step % t.eval_every == 0 or step == t.steps
      is_ckpt = t.checkpoint_every > 0 and step % t.checkpoint_every == 0 and step < t.steps
      if is_eval or is_ckpt or (want_stop and step < t.steps) or step == start + 1:
        flush(step, clock)  # the first step (compile) or a pause: the window ends here
      if is_eval:
        history["val_loss"].append((step, evaluate(state, step)))
      if want_stop and step < t.steps:
        interrupted = True
        break
      if is_ckpt:
        save(step)
      if is_eval or is_ckpt:
        clock.restart()
    flush(step, clock)
    feed.close()  # (also on an exception: the with block)
    if mngr.latest_step() != step:
      save(step, force=True)
  wall = time.time() - t0
  vals = [v for _, v in history["val_loss"] if v is not None]
  summary = {
      "steps": step, "interrupted": interrupted, "wall_s": wall, "num_params": n_params,
      "throughput_windows": windows, "throughput": progress_lib.steady_rate(windows),
      "mfu_peak": peak.label,
      "first_val_loss": vals[0] if vals else None, "last_val_loss": vals[-1] if vals else None,
      "last_train_loss": history["train_loss"][-1][1] if history["train_loss"] else None,
      "train_losses": history["train_loss"], "val_losses": history["val_loss"],
      "checkpoint": str(ckpt.checkpoint_dir(t.run_dir) / str(step)),
      "skipped_nonfinite": guard.skipped, "first_step_compile": first_compile or None,
  }
  if is_main:
    log(f"{'interrupted' if interrupted else 'done'}: step {step}/{t.steps} in {wall:.1f}s; "
        f"val loss {summary['first_val_loss']} -> {summary['last_val_loss']}; checkpoint "
        f"{summary['checkpoint']}"
        + (f"; {guard.skipped} non-finite update(s) skipped" if guard.skipped else ""))
  return summary
