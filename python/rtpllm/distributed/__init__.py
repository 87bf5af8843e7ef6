"""Tensor parallelism's plumbing: how tensors split across ranks, and the rank group's collectives."""
