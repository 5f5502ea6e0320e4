"""Polar attention core op: materialized oracle (`reference`), streaming XLA backend
(`xla_streaming`), Pallas GPU/TPU kernels, and the one custom-VJP op with dispatch (`api`).

The model imports only `api`: `attention_stats`, `polar_core`, `softmax_attention`.
"""
