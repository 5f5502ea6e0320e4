"""Training: optimizer recipe (Muon + AdamW groups), schedule, mesh, train state, pure steps,
checkpoints and the host loop. `train.py` at the repository root is the entry point."""
