"""PNG plots of an evaluation report (`report.json` of `eval.py`).

- `loss.png`: mean NLL vs context length on clean held-out documents (bits per byte annotated)
  and on the junk validation stream, and NLL by position bucket inside the longest context;
  the training length is marked.
- `retrieval.png`: one length x depth heatmap per task x haystack (token accuracy %, exact
  five-token accuracy % underneath); `retrieval_generated.png` the same for the values
  generated greedily (per-digit accuracy %, exact %).
- `retrieval_by_length.png`: token accuracy (mean over depths) vs length per table (dashed:
  generated per-digit accuracy) and the induction needle; next to it the induction value NLL
  against the needle-absent baseline.
- `probe.png`: Polar n_eff, magnitude and null mass per global layer vs length.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from atma_jax.eval import scoring  # noqa: E402


def fmt_len(n: int) -> str:
  n = int(n)
  return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _title(report: dict[str, Any]) -> str:
  mem = "" if report.get("memory", True) else ", memory removed"
  return f"{report.get('model_name', 'model')}{mem}"


def length_axis(ax, lengths, train_len):
  """A log2 context-length x axis ticked at `lengths` (1K, 2K, ...), the training length dashed."""
  ax.set_xscale("log", base=2)
  ax.set_xticks(lengths, [fmt_len(n) for n in lengths])
  ax.minorticks_off()
  if train_len:
    ax.axvline(train_len, color="grey", ls="--", lw=1)
  ax.grid(alpha=0.3)


def _ok(series: dict[str, dict]) -> list[str]:
  return [n for n in series if "nll" in series[n]]


def plot_loss(report: dict[str, Any], path: str) -> str:
  series = report.get("loss_by_length") or {}
  junk = report.get("junk_loss_by_length") or {}
  lengths = [int(n) for n in report["lengths"]]
  train_len = report.get("train_seq_len")
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
  for table, label, color, marker, dy in (
      (series, f"clean: held-out {report.get('corpus', '')} documents", "C0", "o", 7),
      (junk, "junk: validation stream across documents", "C3", "s", -12)):
    ok = _ok(table)
    xs, nll = [int(n) for n in ok], [table[n]["nll"] for n in ok]
    if not ok:
      continue
    ax.plot(xs, nll, marker=marker, color=color, label=label)
    for n, x, y in zip(ok, xs, nll):
      ax.annotate(f"{table[n]['bpb']:.2f}", (x, y), textcoords="offset points", xytext=(0, dy),
                  ha="center", fontsize=7, color=color)
  length_axis(ax, lengths, train_len)
  ax.margins(x=0.08, y=0.15)
  ax.legend(fontsize=8, title="numbers: bits per byte", title_fontsize=7)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("mean NLL (nats/token)")
  ax.set_title("loss vs context length"
               + (f" (train {fmt_len(train_len)}, dashed)" if train_len else ""), fontsize=10)
  pos = report.get("loss_by_position") or {}
  if pos:
    spans = [tuple(int(x) for x in k.split("-")) for k in pos]
    bx.plot([hi for _, hi in spans], list(pos.values()), marker="o", color="C2")
    bx.set_xscale("log", base=2)
    bx.set_xticks([hi for _, hi in spans], [fmt_len(hi) for _, hi in spans])
    bx.minorticks_off()
    if train_len:
      bx.axvline(train_len, color="grey", ls="--", lw=1, label="train length")
      bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    bx.set_xlabel("position in the context (bucket upper edge)")
    bx.set_ylabel("mean NLL (nats/token)")
    bx.set_title(f"clean documents: loss by position inside {fmt_len(spans[-1][1])} tokens",
                 fontsize=10)
  else:
    bx.axis("off")
  fig.suptitle(_title(report), fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _heatmap(ax, table: dict[str, dict[str, dict[str, float]]], title: str,
             acc_key: str = "token_acc"):
  lengths = sorted(table, key=int)
  depths = sorted({d for row in table.values() for d in row}, key=float)
  acc = np.full((len(depths), len(lengths)), np.nan)
  exact = np.full_like(acc, np.nan)
  for j, n in enumerate(lengths):
    for i, d in enumerate(depths):
      cell = table[n].get(d, {})
      acc[i, j] = 100.0 * cell.get(acc_key, np.nan)
      exact[i, j] = 100.0 * cell.get("exact", np.nan)
  im = ax.imshow(acc, vmin=0, vmax=100, cmap="viridis", aspect="auto")
  for i in range(len(depths)):
    for j in range(len(lengths)):
      if np.isnan(acc[i, j]):
        ax.text(j, i, "OOM", ha="center", va="center", color="red", fontsize=8)
        continue
      color = "white" if acc[i, j] < 60 else "black"
      ax.text(j, i - 0.12, f"{acc[i, j]:.0f}", ha="center", va="center", color=color,
              fontsize=9, weight="bold")
      ax.text(j, i + 0.22, f"({exact[i, j]:.0f})", ha="center", va="center", color=color,
              fontsize=7)
  ax.set_xticks(range(len(lengths)), [fmt_len(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{float(d):.2f}" for d in depths])
  ax.set_title(title, fontsize=10)
  return im


def plot_retrieval(report: dict[str, Any], path: str, key: str = "retrieval") -> str:
  """Heatmaps of `report[key]`: "retrieval" (teacher-forced token accuracy) or
  "retrieval_generated" (greedy generation, per-digit accuracy)."""
  acc_key, what = (("digit_acc", "generated digit accuracy") if key == "retrieval_generated"
                   else ("token_acc", "token accuracy"))
  tables = report[key]
  names = list(tables)
  cols = 2 if len(names) > 1 else 1
  rows = -(-len(names) // cols)
  n_len = len(next(iter(tables.values())))
  fig, axes = plt.subplots(rows, cols, figsize=(cols * (0.9 * n_len + 1.6) + 1.2, rows * 2.6 + 0.5),
                           squeeze=False, layout="constrained")
  im = None
  for ax, name in zip(axes.flat, names):
    im = _heatmap(ax, tables[name], name.replace("_", " / "), acc_key)
  for ax in axes[-1]:
    ax.set_xlabel("context length")
  for ax in axes[:, 0]:
    ax.set_ylabel("needle depth")
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.suptitle(f"{_title(report)}: retrieval {what} % (exact 5-token %), "
               f"{report.get('trials')} trials per cell", fontsize=10)
  fig.colorbar(im, ax=axes, shrink=0.8, pad=0.02, label=f"{what} (%)")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_retrieval_by_length(report: dict[str, Any], path: str) -> str:
  base = report.get("induction_baseline")
  ind = report.get("induction")
  two = bool(ind and base and "nll" in base)
  fig, axes = plt.subplots(1, 2 if two else 1, figsize=(12, 4.2) if two else (6.4, 4.2),
                           squeeze=False)
  ax = axes[0, 0]
  lengths = [int(n) for n in report["lengths"]]
  for i, (name, table) in enumerate(report.get("retrieval", {}).items()):
    accs = [100 * scoring.mean_over(list(table[str(n)].values()), "token_acc") for n in lengths]
    ax.plot(lengths, accs, marker="o", color=f"C{i}", label=name.replace("_", " / "))
  for i, (name, table) in enumerate(report.get("retrieval_generated", {}).items()):
    accs = [100 * scoring.mean_over(list(table[str(n)].values()), "digit_acc") for n in lengths]
    ax.plot(lengths, accs, marker="x", ls="--", color=f"C{i}",
            label=name.replace("_", " / ") + " (generated)")
  if ind:
    ax.plot(lengths, [100 * ind[str(n)].get("token_acc", np.nan) for n in lengths], marker="^",
            color="black", ls="--", label="induction needle")
  if base and "token_acc" in base:
    ax.axhline(100 * base["token_acc"], color="grey", ls=":", label="no needle (prior)")
  length_axis(ax, lengths, report.get("train_seq_len"))
  ax.set_ylim(-3, 103)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("token accuracy (%), mean over depths")
  ax.set_title(f"{_title(report)}: retrieval vs context length", fontsize=10)
  ax.legend(fontsize=8)
  if two:
    bx = axes[0, 1]
    bx.plot(lengths, [ind[str(n)].get("nll", np.nan) for n in lengths], marker="^",
            color="black", ls="--", label="induction needle (needle, then the cue)")
    bx.axhline(base["nll"], color="grey", ls=":",
               label=f"no needle: prior on the value ({base['nll']:.2f})")
    length_axis(bx, lengths, report.get("train_seq_len"))
    bx.margins(y=0.3)
    bx.set_xlabel("context length (tokens)")
    bx.set_ylabel("value NLL (nats/token), 5 digits")
    bx.set_title("induction: below the grey line = the needle helped", fontsize=10)
    bx.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_probe(report: dict[str, Any], path: str) -> str:
  probe = report["probe"]
  lengths = sorted(int(n) for n in probe)
  layers = list(probe[str(lengths[0])])
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  labels = {"n_eff": "effective keys n_eff = 1/p2", "mag": "magnitude mag",
            "w_null": "null-sink mass w_N"}
  for ax, stat in zip(axes, ("n_eff", "mag", "w_null")):
    for layer in layers:
      ax.plot(lengths, [probe[str(n)][layer][stat] for n in lengths], marker="o",
              label=f"layer {layer}")
    length_axis(ax, lengths, report.get("train_seq_len"))
    if stat == "n_eff":
      ax.set_yscale("log")
    ax.set_xlabel("context length")
    ax.set_title(labels[stat] + " (mean over positions, heads)", fontsize=9)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"{_title(report)}: Polar internals", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_all(report: dict[str, Any], out_dir: str) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  if report.get("loss_by_length") or report.get("junk_loss_by_length"):
    paths.append(plot_loss(report, os.path.join(out_dir, "loss.png")))
  if report.get("retrieval"):
    paths.append(plot_retrieval(report, os.path.join(out_dir, "retrieval.png")))
  if report.get("retrieval_generated"):
    paths.append(plot_retrieval(report, os.path.join(out_dir, "retrieval_generated.png"),
                                "retrieval_generated"))
  if report.get("retrieval") or report.get("retrieval_generated") or report.get("induction"):
    paths.append(plot_retrieval_by_length(report, os.path.join(out_dir,
                                                                "retrieval_by_length.png")))
  if report.get("probe"):
    paths.append(plot_probe(report, os.path.join(out_dir, "probe.png")))
  return paths
