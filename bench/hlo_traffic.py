"""Memory traffic of one decode step, read from an optimized HLO module's text (no jax needed).

  body_ops(hlo_text) -> [{"name", "opcode", "fused_ops", "shape", "out_bytes", "operand_bytes",
                          "bytes", "in_place", "touches", "op_name"}]  the while body's ops
  summarize(ops, top) -> {"naive_bytes_total", "by_touches", "in_place_scatter_full_buffer_bytes",
                          "top", "whole_state_copies"}

The decode loop (`atma_jax.generate.loop._block`) is one `lax.while_loop` in the entry
computation; its body is one decode step. Each top-level instruction of that body (a `call`'s,
e.g. a GPU command buffer's, inlined) is listed with the bytes it reads (its operands, whole)
and writes (its result): a naive count, which overstates a gather (only the gathered rows are
read) and an in-place scatter / dynamic-update-slice (only the updated rows are touched;
`in_place` marks them: a fusion whose root is one; XLA's cost analysis also counts a scatter's
whole operand and result: `in_place_scatter_full_buffer_bytes` is that count). `touches` names
what an op reads or writes by shape: the K/V cache ([B, S, G, d] or a transpose of it), the
gated-delta state ([B, H, d, d] fp32), the weights (a shape of a parameter), or "other".
Dimension glossary: B batch, S cache slots, G KV heads, H heads, d head dim.
"""

from __future__ import annotations

import collections
import math
import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
INSTRUCTION = re.compile(r"^\s+(ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
SKIP = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while"}
IN_PLACE_ROOTS = {"scatter", "dynamic-update-slice"}


def arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """[(dtype, dims)] of every array in a (possibly tuple) HLO shape."""
  return [(dt, tuple(int(d) for d in dims.split(",") if d))
          for dt, dims in ARRAY.findall(shape_text)]


def nbytes(shape_text: str) -> int:
  return sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in arrays(shape_text))


def parse(hlo_text: str) -> tuple[dict[str, list[dict]], str | None]:
  """({computation: [instruction]}, entry name); each instruction: name, shape, opcode,
  operands, calls, body, op_name, root."""
  comps, cur, entry = {}, None, None
  for line in hlo_text.splitlines():
    if not line.startswith((" ", "}")):
      m = COMPUTATION.match(line)
      if m:
        cur = m.group(2)
        comps[cur] = []
        entry = cur if m.group(1) else entry
      continue
    if line.startswith("}"):
      cur = None
      continue
    m = INSTRUCTION.match(line) if cur is not None else None
    if not m:
      continue
    rest = m.group(5)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    comps[cur].append({
        "name": m.group(2), "shape": m.group(3), "opcode": m.group(4),
        "operands": re.findall(r"%([\w.\-]+)", rest.split("), ")[0]),
        "calls": re.findall(r"calls=%([\w.\-]+)", rest),
        "to_apply": re.findall(r"to_apply=%([\w.\-]+)", rest),
        "body": re.findall(r"body=%([\w.\-]+)", rest),
        "op_name": op_name.group(1) if op_name else "", "root": bool(m.group(1))})
  return comps, entry


def _touches(shapes: list[str], kv_sizes: set, state_sizes: set, weight_shapes: set) -> str:
  """What the arrays of one op are, by element count / dims (first match wins)."""
  seen = [(dt, dims) for s in shapes for dt, dims in arrays(s)]
  if any(math.prod(d) in kv_sizes and len(d) >= 3 for _, d in seen):
    return "kv_cache"
  if any(dt == "f32" and math.prod(d) in state_sizes and len(d) >= 3 for dt, d in seen):
    return "memory_state"
  if any(d in weight_shapes for _, d in seen):
    return "weights"
  return "other"


def body_ops(hlo_text: str, *, kv_elems: set[int] = frozenset(),
             state_elems: set[int] = frozenset(),
             weight_shapes: set[tuple[int, ...]] = frozenset()) -> list[dict]:
  """The top-level ops of the entry's while body (one decode step), biggest first.
  `kv_elems` / `state_elems`: element counts of one layer's K (or V) cache and memory state;
  `weight_shapes`: the parameters' shapes (for `touches`)."""
  comps, entry = parse(hlo_text)
  loops = [i for i in comps.get(entry, []) if i["opcode"] == "while"]
  if not loops:
    raise ValueError("the entry computation has no while loop (not a decode block?)")
  body = max(loops, key=lambda i: len(comps.get(i["body"][0], [])))["body"][0]

  def flat(comp):  # the ops of `comp`, with each `call` (e.g. a GPU command buffer) inlined
    for ins in comps.get(comp, []):
      if ins["opcode"] == "call" and ins["to_apply"]:
        yield from flat(ins["to_apply"][0])
      else:
        yield ins

  instructions = list(flat(body))
  shape_of = {i["name"]: i["shape"] for i in instructions}
  out = []
  for ins in instructions:
    if ins["opcode"] in SKIP:
      continue
    fused = comps.get(ins["calls"][0], []) if ins["calls"] else []
    root = next((f["opcode"] for f in fused if f["root"]), ins["opcode"])
    operand_shapes = [shape_of.get(o, "") for o in ins["operands"]]
    out_b, in_b = nbytes(ins["shape"]), sum(nbytes(s) for s in operand_shapes)
    out.append({
        "name": ins["name"], "opcode": ins["opcode"],
        "fused_ops": sorted({f["opcode"] for f in fused} - SKIP),
        "shape": ins["shape"][:120], "out_bytes": out_b, "operand_bytes": in_b,
        "bytes": out_b + in_b, "root": root,
        "in_place": root in IN_PLACE_ROOTS or ins["opcode"] in IN_PLACE_ROOTS,
        "touches": _touches([ins["shape"]] + operand_shapes, set(kv_elems), set(state_elems),
                            set(weight_shapes)),
        "op_name": ins["op_name"]})
  return sorted(out, key=lambda r: -r["bytes"])


def summarize(ops: list[dict], top: int = 25) -> dict:
  """Naive bytes per `touches` class, the `top` biggest ops, and every copy / transpose of a
  K/V cache or memory state (ops whose fused computation is only copy / transpose)."""
  by = collections.defaultdict(lambda: {"ops": 0, "bytes": 0})
  for r in ops:
    by[r["touches"]]["ops"] += 1
    by[r["touches"]]["bytes"] += r["bytes"]
  copies = [r for r in ops if r["touches"] in ("kv_cache", "memory_state")
            and (r["opcode"] in ("copy", "transpose")
                 or (r["fused_ops"] and set(r["fused_ops"]) <= {"copy", "transpose"}))]
  # XLA's cost analysis counts a scatter as reading and writing its whole operand; done in
  # place (its result shares the operand's buffer) it touches only the updated rows
  scatter = sum(2 * r["out_bytes"] for r in ops if r["in_place"] and r["root"] == "scatter")
  return {"naive_bytes_total": sum(r["bytes"] for r in ops), "by_touches": dict(by),
          "in_place_scatter_full_buffer_bytes": scatter, "top": ops[:top],
          "whole_state_copies": copies}
