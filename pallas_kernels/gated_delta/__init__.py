"""Gated delta rule (ATMA_SPEC §4.4-4.5): sequential oracle, chunked XLA path, Pallas kernels.

The model imports only `pallas_kernels.gated_delta.api` (`gated_delta_rule`, `gated_delta_step`).
"""
