"""`python eval.py --checkpoint DIR`: length-extrapolation report of a trained checkpoint.

Evaluates at a ladder of context lengths, by default the training length x 1, 2, 4, ..., 32,
with the training window removed (ATMA_SPEC §3.3, §7):
  loss       mean NLL and bits per byte on held-out long documents (nested prefixes), and NLL by
             position bucket inside the longest context
  junk       the same on consecutive windows of the validation stream, crossing documents
             (§7.2 junk_ppl analogue); a length the split cannot fill is skipped with a note
  retrieval  passkey and NIAH (§7.3), synthetic and real-text haystacks, several depths and
             trials, five teacher-forced target tokens: token and exact five-token accuracy
  retrieval_gen  the same samples scored by greedy generation of the five value tokens after
             the cue (prefill + decode with caches): per-digit and exact accuracy (opt-in, or
             --generate; it costs about as much again as `retrieval`)
  induction  the §7.2 induction needle (needle first, cue `length - 40` tokens later), and its
             needle-absent baseline (the model's prior on the value, once per trial)
  probe      Polar internals per global layer and length (n_eff, mag, null mass)
`--no-mem` removes the memory branch. Writes `report.json` and PNG plots to `--out`, prints a
short table. Compiled programs are kept in JAX's persistent compilation cache (--compile-cache,
default $ATMA_COMPILE_CACHE or ~/.cache/atma_jax/jax_cache; atma_jax/compile_cache.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from atma_jax import compile_cache
from atma_jax.errors import UsageError, check_writable_dir, cli_boundary

TASKS = ("loss", "junk", "retrieval", "retrieval_gen", "induction", "probe")
DEFAULT_TASKS = ("loss", "junk", "retrieval", "induction")
LADDER = (1, 2, 4, 8, 16, 32)
MIN_LENGTH = 64  # the retrieval scaffold (EOT, needle, cue) needs ~30 tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True,
                 help="run directory (its newest intact checkpoint) or a checkpoints/<step> "
                 "directory")
  p.add_argument("--step", type=int, default=None,
                 help="evaluate checkpoints/<STEP> of the run directory (default: the newest)")
  p.add_argument("--lengths", default=None,
                 help="comma-separated context lengths (default: train length x 1,2,4,...,32)")
  p.add_argument("--out", default=None, help="output directory (default: <run>/eval[_nomem])")
  p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                 help=f"comma-separated subset of {','.join(TASKS)}")
  p.add_argument("--depths", default=None, help="needle depths in [0, 1] (default: config)")
  p.add_argument("--trials", type=int, default=None, help="retrieval samples per cell")
  p.add_argument("--docs", type=int, default=None, help="held-out documents for the loss")
  p.add_argument("--corpus", default="code",
                 help="held-out long documents: code (always available), austen or kjv")
  p.add_argument("--no-mem", action="store_true", help="remove the memory branch (diagnostic)")
  p.add_argument("--probe", action="store_true", help="add the Polar probe to --tasks")
  p.add_argument("--generate", action="store_true",
                 help="add retrieval_gen (retrieval scored by greedy generation) to --tasks")
  p.add_argument("--tokens-per-call", type=int, default=65536,
                 help="batch short sequences up to this many tokens per forward")
  p.add_argument("--impl", choices=("auto", "pallas", "xla"), default=None,
                 help="kernel backend (default: the checkpoint's model.kernel_impl)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--compile-cache", default="auto", metavar="DIR|off|auto",
                 help="JAX's persistent compilation cache (default auto: $ATMA_COMPILE_CACHE or "
                 "~/.cache/atma_jax/jax_cache)")
  return p.parse_args(argv)


def parse_lengths(text: str) -> list[int]:
  try:
    vals = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
  except ValueError:
    raise UsageError(f"--lengths must be comma-separated integers (e.g. 2048,4096), got "
                     f"{text!r}") from None
  if not vals:
    raise UsageError("--lengths is empty; give at least one context length")
  bad = [v for v in vals if v < MIN_LENGTH]
  if bad:
    raise UsageError(f"--lengths {bad}: every length must be >= {MIN_LENGTH} tokens (the needle "
                     "scaffold alone takes ~30)")
  return sorted(set(vals))


def parse_depths(text: str) -> list[float]:
  try:
    vals = [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise UsageError(f"--depths must be comma-separated numbers in [0, 1], got {text!r}") from None
  if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
    raise UsageError(f"--depths {text!r}: give at least one depth, each in [0, 1]")
  return vals


def parse_tasks(text: str, probe: bool, generate: bool = False) -> list[str]:
  tasks = [t.strip() for t in text.split(",") if t.strip()]
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown or not tasks:
    raise UsageError(f"unknown --tasks {unknown}; choose from {','.join(TASKS)}")
  for flag, task in ((probe, "probe"), (generate, "retrieval_gen")):
    if flag and task not in tasks:
      tasks.append(task)
  return tasks


def check_args(args: argparse.Namespace) -> dict:
  """Every cheap check, before anything heavy is imported or loaded."""
  from atma_jax.data.eval_docs import KINDS

  out = {"tasks": parse_tasks(args.tasks, args.probe, args.generate),
         "lengths": parse_lengths(args.lengths) if args.lengths is not None else None,
         "depths": parse_depths(args.depths) if args.depths is not None else None}
  for name in ("trials", "docs", "tokens_per_call"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
  if args.corpus not in KINDS:
    raise UsageError(f"--corpus {args.corpus!r} is unknown; choose one of {', '.join(KINDS)}")
  if not os.path.exists(args.checkpoint):
    raise UsageError(f"checkpoint path {args.checkpoint!r} does not exist; pass the run "
                     "directory written by train.py (e.g. runs/tiny) or one of its "
                     "checkpoints/<step> folders")
  return out


@cli_boundary
def main(argv: list[str] | None = None) -> int:
  return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
  checked = check_args(args)
  tasks = checked["tasks"]

  from atma_jax.train import checkpoint as ckpt

  # config and integrity only: no arrays are read yet (a CheckpointError names the problem)
  step_dir = ckpt.resolve_step_dir(args.checkpoint, step=args.step)
  cfg = ckpt.read_config(step_dir)
  run_dir = step_dir.parent.parent
  out_dir = args.out or os.path.join(run_dir, "eval_nomem" if args.no_mem else "eval")
  check_writable_dir(out_dir, "--out")  # before the evaluation, not after it
  compile_cache.configure(args.compile_cache, "--compile-cache",
                          log=lambda line: print(line, file=sys.stderr))
  lengths = checked["lengths"] or [cfg.train.seq_len * m for m in LADDER]
  if "probe" in tasks and cfg.model.attn_type != "polar":
    raise UsageError(f"--probe reports Polar internals, but this checkpoint's attn_type is "
                     f"{cfg.model.attn_type!r}; drop --probe")
  if args.no_mem and not cfg.model.mem_enabled:
    print("note: --no-mem has no effect, this model has no memory branch", file=sys.stderr)
  depths = checked["depths"] or list(cfg.eval.depths)
  trials = args.trials or cfg.eval.trials
  num_docs = args.docs or cfg.eval.num_docs

  from atma_jax.data import eval_docs
  from atma_jax.data.tokenizer import load_gpt2_tokenizer

  tok = load_gpt2_tokenizer()
  longest = max(lengths)
  try:
    docs = eval_docs.long_documents(args.corpus, longest, tok, limit=num_docs,
                                    cache_dir=cfg.data.cache_dir)
  except Exception as e:  # noqa: BLE001 - missing package or too short: a user-facing problem
    raise UsageError(f"held-out {args.corpus!r} documents of {longest:,} tokens: {e}") from None
  if len(docs) < num_docs:
    print(f"note: only {len(docs)} held-out {args.corpus!r} document(s) reach {longest:,} tokens "
          f"(asked for {num_docs}); the loss uses those", file=sys.stderr)
  junk, junk_skipped = {}, {}
  if "junk" in tasks:  # cheap (cached token shards), so before any array is loaded
    junk, junk_skipped = _junk_windows(cfg, lengths, num_docs, only=tasks == ["junk"])
  haystacks = [[tok.eot_id] + list(d) for d in docs]  # needle gaps start with the doc's EOT

  # Heavy part: arrays, compilation, forwards.
  from tqdm import tqdm

  from atma_jax.eval import plots, probe, suite
  from atma_jax.eval.forward import Forward

  # a step that fails its integrity check falls back to an older one unless it was named
  loaded = ckpt.load_checkpoint(step_dir, older_ok=args.step is None and not
                                ckpt.is_step_dir(args.checkpoint))
  if loaded.step_dir != step_dir:
    step_dir, cfg = loaded.step_dir, loaded.cfg
  params = loaded.params
  model_cfg = cfg.model if args.impl is None else dataclasses.replace(cfg.model,
                                                                      kernel_impl=args.impl)
  fwd = Forward(model_cfg, params, mem=not args.no_mem, logits_chunk=cfg.eval.logits_chunk,
                tokens_per_call=args.tokens_per_call)
  os.makedirs(out_dir, exist_ok=True)

  tables = [(f"{kind}_{hay_name}", kind, hay) for kind in ("passkey", "niah")
            for hay_name, hay in (("synthetic", None), (args.corpus, docs[0]))]
  units = {"loss": len(lengths) * len(docs), "junk": len(junk) * num_docs,
           "retrieval": len(tables) * len(lengths) * len(depths) * trials,
           "retrieval_gen": len(tables) * len(lengths) * len(depths) * trials,
           "induction": (len(lengths) + 1) * trials, "probe": len(lengths) * len(docs)}
  bar = tqdm(total=sum(units[t] for t in tasks), desc="eval", unit="seq", dynamic_ncols=True,
             disable=args.no_progress)
  tick = bar.update
  t0 = time.time()
  report = {"checkpoint": str(step_dir), "step": int(step_dir.name), "model_name": cfg.name,
            "train_seq_len": cfg.train.seq_len, "train_window": cfg.model.attn_window,
            "lengths": lengths, "depths": depths, "trials": trials, "memory": not args.no_mem,
            "corpus": args.corpus, "num_docs": len(docs), "tasks": tasks,
            "junk_source": f"validation split of data.source={cfg.data.source}",
            "kernel_impl": model_cfg.kernel_impl, "notes": []}

  if "loss" in tasks:
    table, nll_ND = suite.loss_by_length(fwd, docs, lengths, tok.eot_id,
                                         lambda ids: eval_docs.byte_count(ids, tok), tick)
    report["loss_by_length"] = table
    if nll_ND is not None:
      report["loss_by_position"] = suite.loss_by_position(nll_ND,
                                                          max(1, cfg.train.seq_len // 8))
  if "junk" in tasks:
    table = suite.junk_loss_by_length(fwd, junk, lambda ids: eval_docs.byte_count(ids, tok), tick)
    table.update({str(n): {"skipped": why} for n, why in junk_skipped.items()})
    report["junk_loss_by_length"] = {str(n): table[str(n)] for n in lengths}
    report["notes"] += [f"junk at {n}: skipped ({why})" for n, why in junk_skipped.items()]
  if "retrieval" in tasks:
    report["retrieval"] = {name: suite.retrieval_grid(fwd, tok, kind, lengths, depths, trials,
                                                      cfg.eval.seed, hay, tick)
                           for name, kind, hay in tables}
  if "retrieval_gen" in tasks:
    from atma_jax.generate import Generator
    gen = Generator(fwd.cfg, fwd.graphdef, params, mem=not args.no_mem)
    report["retrieval_generated"] = {
        name: suite.retrieval_generated_grid(gen, tok, kind, lengths, depths, trials,
                                             cfg.eval.seed, hay, tick, args.tokens_per_call)
        for name, kind, hay in tables}
  if "induction" in tasks:
    report["induction"] = suite.induction_by_length(fwd, tok, lengths, trials, cfg.eval.seed,
                                                    haystacks, tick)
    report["induction_baseline"] = suite.induction_baseline(fwd, tok, lengths, trials,
                                                            cfg.eval.seed, haystacks, tick)
  if "probe" in tasks:
    report["probe"] = probe.polar_probe(fwd, haystacks, lengths, tick)
  bar.close()
  report["seconds"] = round(time.time() - t0, 2)

  path = os.path.join(out_dir, "report.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  pngs = plots.write_all(report, out_dir)
  print(summary_table(report))
  print(f"wrote {path} and {len(pngs)} plot(s) to {out_dir}")
  return 0


def _junk_windows(cfg, lengths: list[int], num_docs: int, only: bool):
  """`({length: windows}, {length: why skipped})`: a length whose windows the validation split
  cannot fill is skipped with a note (the other tasks still run); an error if nothing is left
  and junk is the only task."""
  from atma_jax.eval.junk import JunkError, junk_windows

  windows, skipped = {}, {}
  for n in lengths:
    try:
      windows[n] = junk_windows(cfg, n, num_docs)
    except JunkError as e:
      skipped[n] = str(e)
  if skipped and not windows and only:
    raise UsageError(skipped[min(skipped)])
  if skipped:
    print(f"note: junk task skipped at length(s) {sorted(skipped)}: {skipped[min(skipped)]}",
          file=sys.stderr)
  return windows, skipped


def summary_table(report: dict) -> str:
  """The terminal table: one column per length."""
  from atma_jax.eval import scoring
  from atma_jax.eval.plots import fmt_len

  lengths = [str(n) for n in report["lengths"]]
  width = 30
  head = f"{'':<{width}}" + "".join(f"{fmt_len(int(n)):>8}" for n in lengths)
  lines = [head, "-" * len(head)]

  def row(label, values, fmt):
    cells = "".join(f"{'-':>8}" if v is None or v != v else f"{v:>8{fmt}}" for v in values)
    lines.append(f"{label:<{width}}" + cells)

  if "loss_by_length" in report:
    t = report["loss_by_length"]
    row(f"nll {report['corpus']} (nats)", [t.get(n, {}).get("nll") for n in lengths], ".3f")
    row(f"bpb {report['corpus']}", [t.get(n, {}).get("bpb") for n in lengths], ".3f")
  if "junk_loss_by_length" in report:
    t = report["junk_loss_by_length"]
    row("nll junk val stream", [t.get(n, {}).get("nll") for n in lengths], ".3f")
    row("bpb junk val stream", [t.get(n, {}).get("bpb") for n in lengths], ".3f")
  for name, table in report.get("retrieval", {}).items():
    for metric, tag in (("token_acc", "tok%"), ("exact", "exact%")):
      row(f"{name} {tag}", [100 * scoring.mean_over(list(table[n].values()), metric)
                            for n in lengths], ".1f")
  for name, table in report.get("retrieval_generated", {}).items():
    for metric, tag in (("digit_acc", "gen digit%"), ("exact", "gen exact%")):
      row(f"{name} {tag}", [100 * scoring.mean_over(list(table[n].values()), metric)
                            for n in lengths], ".1f")
  if "induction" in report:
    ind = report["induction"]
    row("induction tok%", [100 * ind[n].get("token_acc", float("nan")) for n in lengths], ".1f")
    row("induction nll", [ind[n].get("nll", float("nan")) for n in lengths], ".3f")
  base = report.get("induction_baseline")
  if base:
    lines.append(f"no-needle baseline (prior on the value, {base.get('trials', 0)} trials, gap "
                 f"{base.get('distance')}): nll {base.get('nll', float('nan')):.3f}, "
                 f"tok% {100 * base.get('token_acc', float('nan')):.1f}")
  for layer in (report.get("probe", {}).get(lengths[0], {}) if "probe" in report else {}):
    row(f"n_eff layer {layer}", [report["probe"][n][layer]["n_eff"] for n in lengths], ".1f")
    row(f"w_null layer {layer}", [report["probe"][n][layer]["w_null"] for n in lengths], ".3f")
  pos = report.get("loss_by_position")
  if pos:
    lines.append("nll by position: " + "  ".join(f"{k}: {v:.3f}" for k, v in pos.items()))
  lines += [f"note: {n}" for n in report.get("notes", [])]
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
