"""Shared pytest setup: quiet framework logging and strict numerics for every test."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The same PyTorch decoding plan on every CPU: without this, float32 at 1-3 rows would run through MKL on Intel
# hosts and through the decoding layouts elsewhere (backends/torch/layout.py, MKL_ROWS); the tests of the
# Intel plan set layout.MKL_ROWS themselves (tests/test_torch_decode_cache.py).
os.environ.setdefault("BLIP_TORCH_MKL_ROWS", "0")
