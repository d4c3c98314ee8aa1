"""Leaving JAX: StableHLO and ONNX export (``export``) and latency measured on the backend the
model will run on (``latency``)."""
