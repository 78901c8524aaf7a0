"""Checkpoint formats other than PyTorch safetensors, mapped to canonical names by the weight tables.

* ``hf_tf``: Hugging Face TensorFlow ``tf_model.h5`` (single Keras-layout file or transformers'
  shards), names from one rule applied to the table rows (``hf_tf_name``).
* ``flax_msgpack``: ``flax_model.msgpack`` (flax.serialization's encoding; nested param tree at
  the table's jax paths, or transformers' flat ``/``-keyed shards).
* ``original``: Salesforce BLIP and LAVIS BLIP-2 ``.pth`` state dicts renamed to canonical names,
  LAVIS q/v biases fused, position embeddings resized with PyTorch's bicubic kernel.

h5py and msgpack are imported lazily, inside the functions that need them, so ``blip_core``
keeps its import-time dependencies to numpy. Nothing here imports a deep-learning framework.
"""
from .flax_msgpack import (FLAX_WEIGHTS_INDEX_NAME, FLAX_WEIGHTS_NAME, FlaxWeights, flax_paths, open_flax_state, read_flax_state_dict,
                           read_flax_weights, write_flax_weights)
from .hf_tf import (TF_WEIGHTS_INDEX_NAME, TF_WEIGHTS_NAME, H5Weights, hf_tf_name, open_tf_state, open_tf_weights, read_tf_state_dict,
                    tf_model_name, tf_names, write_tf_weights)
from .original import load_original_state_dict, rename_original, resize_position_embedding

__all__ = ["FLAX_WEIGHTS_INDEX_NAME", "FLAX_WEIGHTS_NAME", "TF_WEIGHTS_INDEX_NAME", "TF_WEIGHTS_NAME", "FlaxWeights",
           "H5Weights", "flax_paths", "hf_tf_name", "load_original_state_dict", "open_flax_state", "open_tf_state", "open_tf_weights",
           "read_flax_state_dict", "read_flax_weights", "read_tf_state_dict", "rename_original",
           "resize_position_embedding", "tf_model_name", "tf_names", "write_flax_weights", "write_tf_weights"]
