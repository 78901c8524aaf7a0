"""Backends: one native implementation of BLIP and BLIP-2 per framework (torch, tf, jax)."""
