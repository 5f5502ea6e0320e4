"""Long-context evaluation (ATMA_SPEC §7): `python eval.py --checkpoint DIR`.

Files, one concept each: `needles` (passkey / NIAH / induction samples), `scoring` (teacher-forced
metrics, bits per byte), `forward` (jitted full-context passes, logits only where needed),
`suite` (loss by length / position, junk stream, retrieval grids, induction and its
needle-absent baseline), `junk` (validation-stream windows), `probe` (Polar internals per layer),
`plots` (PNG figures), `cli` (the command line), `testing` (a tiny checkpoint for tests).
"""
