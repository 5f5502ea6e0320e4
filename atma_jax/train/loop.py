"""The host training loop: data -> global arrays -> pure steps; logs, evals, checkpoints.

The device is never synced per step: each step's metrics are fetched after the NEXT step has
been dispatched (one step late). Evaluation and checkpoints happen every `train.eval_every` /
`train.checkpoint_every` steps and at the end. SIGTERM / SIGINT finish the current step, save a
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

from atma_jax.config import Config, ConfigError, to_json
from atma_jax.train import checkpoint as ckpt
from atma_jax.train.divergence import NonFiniteGuard
from atma_jax.train.mesh import batch_sharding, check_batch_divides, make_mesh
from atma_jax.summary import count_params
from atma_jax.train.metrics import MetricWriter, flops_per_token, mfu, peak_flops, peak_label
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
                           log=None)


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

  n_params = count_params(cfg.model)
  fpt = flops_per_token(n_params, cfg.model.num_layers, cfg.model.hidden_size, t.seq_len)
  peak = peak_flops()
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
    if peak is not None:
      bar.write(peak_label())

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
  pending = None  # (step, device metrics, dispatch time)
  last_t = None
  interrupted = False

  def flush(p, now):
    nonlocal last_t
    step, m_dev = p
    m = {k: float(v) for k, v in jax.device_get(m_dev).items()}
    skipped = guard.check(step, m)  # raises DivergenceError to stop
    m.pop("finite", None)
    dt = None if last_t is None else now - last_t
    last_t = now
    rec = {"step": step, **m}
    if skipped:
      rec["skipped_nonfinite"] = True
      if bar is not None:
        bar.write(f"step {step}: non-finite loss or gradient, update skipped "
                  f"({guard.skipped} so far)")
    if dt:
      rec["tokens_per_s"] = m["tokens"] / dt
      u = mfu(rec["tokens_per_s"], fpt, jax.device_count(), peak)
      if u is not None:
        rec["mfu"] = u
        rec["mfu_peak_flops"] = peak
    history["train_loss"].append((step, m["loss"]))
    if step % t.log_every == 0 or step == t.steps:
      writer.write(rec)
    if bar is not None:
      post = {"loss": f"{m['loss']:.3f}"}
      if "tokens_per_s" in rec:
        post["tok/s"] = f"{rec['tokens_per_s']:.0f}"
      if "mfu" in rec:
        post["mfu"] = f"{100 * rec['mfu']:.1f}%"
      bar.set_postfix(post, refresh=False)
      bar.update(1)

  def save(step, force=False):
    nonlocal pending
    if pending is not None:  # the metrics (finite flag) of the step about to be saved
      flush(pending, time.time())
      pending = None
    ckpt.save(mngr, step, state, data_it, cfg, force=force)

  t0 = time.time()
  with _StopFlag() as stop, _closing(mngr, writer, bar):
    if start == 0:
      v = evaluate(state, 0)
      if v is not None:
        history["val_loss"].append((0, v))
    step = start
    while step < t.steps:
      batch = to_global(next(data_it), bsh)
      state, metrics = train_step(state, batch)
      step += 1
      if pending is not None:
        flush(pending, time.time())
      pending = (step, metrics)
      if step % t.eval_every == 0 or step == t.steps:
        flush(pending, time.time())
        pending = None
        history["val_loss"].append((step, evaluate(state, step)))
      signalled = stop.requested
      if pcount > 1:  # all processes must agree; ask only every log_every steps
        signalled = _any_process(signalled) if step % t.log_every == 0 else False
      want_stop = signalled or (stop_after is not None and step >= stop_after)
      if want_stop and step < t.steps:
        interrupted = True
        break
      if t.checkpoint_every > 0 and step % t.checkpoint_every == 0 and step < t.steps:
        save(step)
    if pending is not None:
      flush(pending, time.time())
      pending = None
    if mngr.latest_step() != step:
      save(step, force=True)
  wall = time.time() - t0
  vals = [v for _, v in history["val_loss"] if v is not None]
  summary = {
      "steps": step, "interrupted": interrupted, "wall_s": wall, "num_params": n_params,
      "first_val_loss": vals[0] if vals else None, "last_val_loss": vals[-1] if vals else None,
      "last_train_loss": history["train_loss"][-1][1] if history["train_loss"] else None,
      "train_losses": history["train_loss"], "val_losses": history["val_loss"],
      "checkpoint": str(ckpt.checkpoint_dir(t.run_dir) / str(step)),
      "skipped_nonfinite": guard.skipped,
  }
  if is_main:
    log(f"{'interrupted' if interrupted else 'done'}: step {step}/{t.steps} in {wall:.1f}s; "
        f"val loss {summary['first_val_loss']} -> {summary['last_val_loss']}; checkpoint "
        f"{summary['checkpoint']}"
        + (f"; {guard.skipped} non-finite update(s) skipped" if guard.skipped else ""))
  return summary
