"""The comparison report of a sweep: one JSON, a markdown table, three PNGs, the commands.

Files (all in one folder, six in total, so a GPU machine that returns few files can send the
whole report back):
  report.json    every cell: axes, overrides, status (error tail if failed), training summary
                 (steps, tokens seen, tokens/s, losses) and its whole `eval.py` report.json
  report.md      tables by length (induction needle, §7.3 retrieval, clean and junk NLL) and the
                 checks of the primary cell
  retrieval.png  per cell: induction-needle and §7.3 retrieval token accuracy vs context length
  loss.png       per cell: clean NLL vs context length, and NLL by position in the longest one
  training.png   per cell: train and validation loss vs tokens seen
  commands.txt   the sweep command, the commit, and each cell's train / eval command
"""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from atma_jax.eval import scoring
from atma_jax.eval.plots import fmt_len, length_axis
from atma_jax.sweep.runner import REPO_ROOT

FILES = ("report.json", "report.md", "retrieval.png", "loss.png", "training.png", "commands.txt")
LOSS_TOLERANCE = 0.005  # nats: "non-increasing with length" allows this much rise per step
NEEDLE_TARGET = 0.90  # the reference's promoted cell: 92.5% per digit at 32x


# ----------------------------------------------------------------------------- collection


def train_summary(run_dir: Path) -> dict[str, Any]:
  """Steps, tokens seen, losses and throughput from `<run_dir>/metrics.jsonl` + config.json."""
  out: dict[str, Any] = {}
  cfg_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
  if not cfg_path.is_file() or not metrics_path.is_file():
    return out
  with open(cfg_path) as f:
    cfg = json.load(f)
  rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
  train = [r for r in rows if "loss" in r]
  val = [r for r in rows if "val_loss" in r]
  t = cfg["train"]
  tokens_per_step = t["global_batch"] * t["seq_len"]
  steps = max((r["step"] for r in rows), default=0)
  speeds = [r["tokens_per_s"] for r in train if "tokens_per_s" in r][1:]  # first: compile
  first = [r["first_step_s"] for r in train if "first_step_s" in r]
  out.update({
      "steps": steps, "target_steps": t["steps"], "tokens_per_step": tokens_per_step,
      "tokens_seen": steps * tokens_per_step, "seq_len": t["seq_len"],
      "final_train_loss": float(np.mean([r["loss"] for r in train[-3:]])) if train else None,
      "final_val_loss": val[-1]["val_loss"] if val else None,
      "tokens_per_s_median": float(np.median(speeds)) if speeds else None,
      # compile + first step of the (last) training process: the fixed cost a time plan needs
      "first_step_s": first[-1] if first else None,
      "train_curve": [[r["step"] * tokens_per_step, r["loss"]] for r in train],
      "val_curve": [[r["step"] * tokens_per_step, r["val_loss"]] for r in val],
  })
  try:
    from atma_jax.config import from_dict
    from atma_jax.summary import count_params
    out["num_params"] = count_params(from_dict(cfg).model)
  except Exception:  # noqa: BLE001 - the count is informative only
    pass
  return out


def eval_series(ev: dict) -> dict[str, dict[str, float]]:
  """Per-length series of one eval report: {series name: {str(length): value}}."""
  lengths = [str(n) for n in ev.get("lengths", [])]
  s: dict[str, dict[str, float]] = {}
  if "induction" in ev:
    s["needle_acc"] = {n: ev["induction"][n].get("token_acc", math.nan) for n in lengths}
    s["needle_nll"] = {n: ev["induction"][n].get("nll", math.nan) for n in lengths}
  if "retrieval" in ev:
    s["retrieval_acc"] = {n: scoring.mean_over([c for t in ev["retrieval"].values()
                                                for c in t[n].values()], "token_acc")
                          for n in lengths}
  for key, name in (("loss_by_length", "clean"), ("junk_loss_by_length", "junk")):
    if key in ev:
      for unit in ("nll", "bpb"):
        s[f"{name}_{unit}"] = {n: ev[key].get(n, {}).get(unit, math.nan) for n in lengths}
  return s


def collect(jobs, records: dict[str, dict], merged: dict[str, dict]) -> dict[str, dict]:
  """{cell name: entry}: this run's cells (record + train summary + eval report), then cells
  taken from earlier reports (`merged`, marked `from_earlier_report`; those not among `jobs`
  follow them)."""
  cells: dict[str, dict] = {}
  for job in jobs:
    if job.name in merged:
      cells[job.name] = dict(merged[job.name], from_earlier_report=True)
      continue
    rec = dict(records.get(job.name, {}))
    entry = {"cell": job.name, "id": job.cell.id, "axes": job.cell.axes(),
             "overrides": list(job.overrides), "status": rec.get("status", "pending"),
             "error": rec.get("error"), "train_seconds": rec.get("train_seconds"),
             "eval_seconds": rec.get("eval_seconds"),
             "stopped_by_deadline": rec.get("stopped_by_deadline", False),
             "train_cmd": rec.get("train_cmd", job.train_cmd()),
             "eval_cmd": rec.get("eval_cmd", job.eval_cmd()),
             "train": train_summary(job.run_dir)}
    if job.eval_report.is_file():
      with open(job.eval_report) as f:
        entry["eval"] = json.load(f)
      entry["series"] = eval_series(entry["eval"])
    cells[job.name] = entry
  for name, c in merged.items():
    cells.setdefault(name, dict(c, from_earlier_report=True))
  return cells


def load_merge(paths: list[str] | None) -> dict[str, dict]:
  """Finished cells of earlier report.json files (`--merge`, repeatable; a later file's cell
  replaces an earlier one's of the same name)."""
  cells: dict[str, dict] = {}
  for path in paths or []:
    with open(path) as f:
      data = json.load(f)
    cells.update({name: c for name, c in data.get("cells", {}).items()
                  if c.get("status") == "done"})
  return cells


# ----------------------------------------------------------------------------- checks


def _last(series: dict[str, float]) -> float:
  return series[max(series, key=int)] if series else math.nan


def checks(cells: dict[str, dict], primary: str) -> dict[str, Any]:
  """The issue's questions about the primary cell, answered from the numbers."""
  p = cells.get(primary, {})
  if p.get("status") != "done":
    return {"primary": primary, "note": f"primary cell {primary!r} has no evaluation"}
  ps = p["series"]
  out: dict[str, Any] = {"primary": primary}
  if "needle_acc" in ps:
    top = _last(ps["needle_acc"])
    # matched cells only: a cell with extra overrides (e.g. data.needle_mix) is not matched
    others = {n: _last(c["series"]["needle_acc"]) for n, c in cells.items()
              if n != primary and c.get("status") == "done" and "needle_acc" in c["series"]
              and not c.get("axes", {}).get("extra")}
    out["needle_acc_longest"] = top
    out["needle_acc_longest_ge_target"] = bool(top >= NEEDLE_TARGET)
    out["needle_target"] = NEEDLE_TARGET
    out["needle_acc_longest_others"] = others
    out["needle_above_every_other_cell"] = bool(others) and all(top > v for v in others.values())
  if "clean_nll" in ps:
    vals = [ps["clean_nll"][n] for n in sorted(ps["clean_nll"], key=int)]
    rises = [b - a for a, b in zip(vals, vals[1:])]
    out["clean_nll_by_length"] = vals
    out["clean_nll_max_rise"] = max(rises) if rises else 0.0
    out["clean_nll_non_increasing"] = all(r <= LOSS_TOLERANCE for r in rises)
    out["loss_tolerance"] = LOSS_TOLERANCE
  return out


# ----------------------------------------------------------------------------- writing


def _pct(v) -> str:
  return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _num(v, fmt=".3f") -> str:
  return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _by_length_table(cells, key, lengths, cell_fmt) -> list[str]:
  head = "| cell | " + " | ".join(fmt_len(n) for n in lengths) + " |"
  lines = [head, "|---|" + "---:|" * len(lengths)]
  for name, c in cells.items():
    s = c.get("series", {}).get(key)
    if not s:
      continue
    lines.append(f"| {name} | " + " | ".join(cell_fmt(s.get(str(n))) for n in lengths) + " |")
  return lines


def markdown(report: dict) -> str:
  cells, lengths = report["cells"], report["lengths"]
  train_len = report.get("train_seq_len")
  lines = [f"# Sweep `{report['grid']}`{' (smoke)' if report['smoke'] else ''}", ""]
  if report.get("notes"):
    lines += [report["notes"], ""]
  lines += [f"Commit `{report.get('commit', '?')}`, {report['created']}. Base preset "
            f"`{report['base']}`; lengths {', '.join(fmt_len(n) for n in lengths)} "
            f"(training length {train_len}); held-out corpus `{report['plan']['corpus']}`, "
            f"{report['plan']['trials']} trials per cell. Raw numbers: `report.json`; commands: "
            "`commands.txt`.", "",
            "## Cells", "",
            "| cell | status | params | steps | tokens seen | tok/s | train loss | val loss |"
            " needle 1x | needle max | retrieval max | clean NLL 1x | clean NLL max |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, c in cells.items():
    t, s = c.get("train", {}), c.get("series", {})
    status = c.get("status", "?")
    if c.get("stopped_by_deadline"):
      status += " (deadline)"
    first = lambda k: s.get(k, {}).get(str(lengths[0])) if s.get(k) else None  # noqa: E731
    params = t.get("num_params")
    lines.append(
        f"| {name} | {status} | {_num(params / 1e6, '.1f') + 'M' if params else '–'} | "
        f"{t.get('steps', '–')}/{t.get('target_steps', '–')} | "
        f"{_num(t.get('tokens_seen', 0) / 1e6, '.1f')}M | "
        f"{_num(t.get('tokens_per_s_median'), ',.0f')} | {_num(t.get('final_train_loss'))} | "
        f"{_num(t.get('final_val_loss'))} | {_pct(first('needle_acc'))} | "
        f"{_pct(_last(s.get('needle_acc', {})))} | {_pct(_last(s.get('retrieval_acc', {})))} | "
        f"{_num(first('clean_nll'))} | {_num(_last(s.get('clean_nll', {})))} |")
  for title, key, fmt in (
      ("Induction needle (§7.2, the Stage I metric): per-digit accuracy %", "needle_acc", _pct),
      ("Passkey / NIAH (§7.3): token accuracy %, mean over tasks, haystacks, depths",
       "retrieval_acc", _pct),
      (f"Clean NLL (nats/token) on held-out `{report['plan']['corpus']}` documents",
       "clean_nll", _num),
      ("Junk NLL (nats/token): the validation stream across documents", "junk_nll", _num),
      (f"Bits per byte, held-out `{report['plan']['corpus']}` documents (nats/token do not "
       "compare across corpora: their tokens differ in bytes)", "clean_bpb", _num),
      ("Bits per byte, the validation stream across documents", "junk_bpb", _num)):
    table = _by_length_table(cells, key, lengths, fmt)
    if len(table) > 2:
      lines += ["", f"## {title}", "", *table]
  ch = report.get("checks", {})
  if ch:
    lines += ["", f"## Checks on `{ch.get('primary')}`", ""]
    if "note" in ch:
      lines.append(f"- {ch['note']}")
    if "needle_acc_longest" in ch:
      lines.append(f"- induction needle at {fmt_len(lengths[-1])}: "
                   f"{_pct(ch['needle_acc_longest'])}% (target >= {100 * NEEDLE_TARGET:.0f}%): "
                   f"{'yes' if ch['needle_acc_longest_ge_target'] else 'no'}")
      others = ", ".join(f"{n} {_pct(v)}%" for n, v in ch["needle_acc_longest_others"].items())
      lines.append(f"- above every other matched cell ({others or 'none evaluated'}): "
                   f"{'yes' if ch['needle_above_every_other_cell'] else 'no'}")
    if "clean_nll_non_increasing" in ch:
      lines.append(f"- clean NLL non-increasing with length (rise <= {LOSS_TOLERANCE} nats per "
                   f"doubling): {'yes' if ch['clean_nll_non_increasing'] else 'no'} (largest "
                   f"rise {ch['clean_nll_max_rise']:+.3f})")
  failed = {n: c for n, c in cells.items() if c.get("status") not in ("done", "trained")}
  if failed:
    lines += ["", "## Cells without an evaluation", ""]
    for n, c in failed.items():
      err = c.get("error") or {}
      lines += [f"### {n}: {c.get('status')} ({err.get('stage', '?')}, exit "
                f"{err.get('exit_status', '?')})", "", "```",
                (err.get("tail") or err.get("message") or "").rstrip(), "```"]
  lines += ["", "![retrieval](retrieval.png)", "", "![loss](loss.png)", "",
            "![training](training.png)", ""]
  return "\n".join(lines)


def plots(report: dict, out_dir: Path) -> None:
  import matplotlib.pyplot as plt  # the Agg backend: atma_jax.eval.plots selected it

  cells, lengths, train_len = report["cells"], report["lengths"], report.get("train_seq_len")
  done = {n: c for n, c in cells.items() if c.get("series")}

  def series_plot(ax, key, scale, ylabel, title):
    for i, (name, c) in enumerate(done.items()):
      s = c["series"].get(key)
      if s:
        ns = sorted(s, key=int)
        ax.plot([int(n) for n in ns], [scale * s[n] for n in ns], marker="o", label=name,
                color=f"C{i}")
    length_axis(ax, lengths, train_len)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if done:
      ax.legend(fontsize=8)

  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4))
  series_plot(a, "needle_acc", 100, "per-digit accuracy (%)",
              "induction needle (§7.2): needle first, cue at the end")
  series_plot(b, "retrieval_acc", 100, "token accuracy (%)",
              "passkey / NIAH (§7.3): mean over tasks, haystacks, depths")
  for ax in (a, b):
    ax.set_ylim(-3, 103)
  fig.suptitle(f"{report['grid']}: retrieval vs length (training length {train_len}, dashed)")
  fig.tight_layout()
  fig.savefig(out_dir / "retrieval.png", dpi=110)
  plt.close(fig)

  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4))
  series_plot(a, "clean_nll", 1, "mean NLL (nats/token)",
              f"held-out {report['plan']['corpus']} documents: loss vs context length")
  for i, (name, c) in enumerate(done.items()):
    pos = c.get("eval", {}).get("loss_by_position") or {}
    if pos:
      his = [int(k.split("-")[1]) for k in pos]
      b.plot(his, list(pos.values()), marker="o", label=name, color=f"C{i}")
  length_axis(b, sorted({int(k.split('-')[1]) for c in done.values()
                           for k in (c.get('eval', {}).get('loss_by_position') or {})})
                or lengths, train_len)
  b.set_xlabel("position in the longest context (bucket upper edge)")
  b.set_ylabel("mean NLL (nats/token)")
  b.set_title("loss by position", fontsize=10)
  if done:
    b.legend(fontsize=8)
  fig.suptitle(f"{report['grid']}: loss vs length")
  fig.tight_layout()
  fig.savefig(out_dir / "loss.png", dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 4.4))
  for i, (name, c) in enumerate(cells.items()):
    t = c.get("train", {})
    if t.get("train_curve"):
      xs, ys = zip(*t["train_curve"])
      ax.plot(xs, ys, color=f"C{i}", alpha=0.5, lw=1)
    if t.get("val_curve"):
      xs, ys = zip(*t["val_curve"])
      ax.plot(xs, ys, color=f"C{i}", marker="o", label=f"{name} (val: markers)")
  ax.set_xlabel("tokens seen")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(f"{report['grid']}: training (lines) and validation (markers) loss", fontsize=10)
  ax.grid(alpha=0.3)
  if cells:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_dir / "training.png", dpi=110)
  plt.close(fig)


def _repo_relative(arg: str) -> str:
  """`<checkout>/train.py` -> `train.py`: the command as typed from the repository root."""
  root = f"{REPO_ROOT}{os.sep}"
  return os.path.relpath(arg, REPO_ROOT) if arg.startswith(root) else arg


def commands_text(report: dict) -> str:
  lines = [f"# sweep {report['grid']} at commit {report.get('commit', '?')}, {report['created']}",
           "$ " + shlex.join(report["command"]), ""]
  for name, c in report["cells"].items():
    lines.append(f"# {name}{' (from an earlier report)' if c.get('from_earlier_report') else ''}")
    for key in ("train_cmd", "eval_cmd"):
      if c.get(key):
        cmd = ["python"] + [_repo_relative(a) for a in c[key][1:]]
        lines.append("$ " + shlex.join(cmd))
    lines.append("")
  return "\n".join(lines)


def write(report: dict, out_dir: str | os.PathLike) -> list[Path]:
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "report.json", "w") as f:
    json.dump(report, f, indent=1)
  (out / "report.md").write_text(markdown(report))
  (out / "commands.txt").write_text(commands_text(report))
  plots(report, out)
  return [out / f for f in FILES]
