"""Training: the reference recipe on a sharded, pure train step.

Files (one concept each):
  schedule.py    constant-then-linear-cooldown lr multiplier (ATMA_SPEC §6.4)
  muon.py        bf16 Newton-Schulz and the per-leaf Muon update in torch orientation (§6.3)
  optimizer.py   group assignment (Muon / embed / head / scalar AdamW), clip, `AtmaOptimizer`
  mesh.py        (data, fsdp, tensor) mesh, batch checks, param shardings from logical axes
  state.py       `TrainState(step, params, opt_state, rng)`, abstract + sharded creation
  step.py        pure `train_step` (micro-batch scan, sum/mean CE + aux) and `eval_step`
  accumulate.py  micro-step gradient accumulation, summed over devices per micro-step or per step
  digest.py      per-array digests and finiteness of a sharded pytree (checkpoint integrity)
  checkpoint.py  orbax manager (state / data / config items), validation, digests, fallback to
                 the newest intact step, `load_checkpoint` / `load_model`
  divergence.py  `DivergenceError` and the stop / skip policy for non-finite steps
  distributed.py multi-process start with a bounded wait and a one-line timeout message
  metrics.py     flops/token, MFU peak table, metrics.jsonl (+ TensorBoard when installed)
  progress.py    tokens/s and MFU of device-synchronized windows, the labelled MFU peak
  prefetch.py    `DevicePrefetcher`: batches put on the devices a few steps ahead
  rundir.py      removal of a run directory that a failed start left behind
  loop.py        host loop: global batches, logs, evals, checkpoints, signals, divergence
`train.py` at the repository root is the command line.
"""
