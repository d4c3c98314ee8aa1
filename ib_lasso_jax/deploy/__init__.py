"""Leaving JAX: StableHLO and ONNX export (``export``) and latency measured on the backend the
model will run on (``latency``; its per-layer table for latency targets in ``latency_table``)."""
