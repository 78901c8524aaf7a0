"""Checkpoint I/O for the spec layer, numpy in and numpy out (no framework imports).

* ``read_safetensors`` / ``write_safetensors``: the safetensors format, bfloat16 included
  (via ``ml_dtypes`` when present), atomic writes, corrupt files -> ``CheckpointError``.
* ``load_state_dict``: a Hugging Face directory or file: ``model.safetensors``, sharded
  ``model.safetensors.index.json``, or (opt-in) ``pytorch_model.bin`` through
  ``blip_core.safe_pickle``'s restricted unpickler.
* ``open_state_dict``: the same, as ``TensorRef``s read on demand (safetensors memory-mapped).
* ``save_state_dict``: single file or transformers-style shards + index, atomic for the set.
* ``check_state_dict`` / ``strip_tied`` / ``cast_state_dict``: strict matching to a weight table.
* ``checkpoint_info``: a header-only summary for ``blip info``.

Example::

    state = load_state_dict("hf_dir")                       # {name: np.ndarray}
    state = check_state_dict(state, table)                  # strict, ties filled, table order
    save_state_dict("out_dir", strip_tied(state, table), max_shard_size="2GB")
"""
from .errors import CheckpointError, StateDictMismatchError
from .files import (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME,
                    checkpoint_info, load_state_dict, open_state_dict, parse_size, plan_shards, resolve_checkpoint,
                    save_state_dict)
from .mapped import ArrayRef, MappedRef, ReaderRef, TensorRef, in_order
from .safetensors_io import read_safetensors, read_safetensors_header, write_safetensors
from .state import cast_state_dict, check_state_dict, strip_tied, tie_root

__all__ = [
    "CheckpointError", "StateDictMismatchError",
    "read_safetensors", "read_safetensors_header", "write_safetensors",
    "load_state_dict", "open_state_dict", "save_state_dict", "TensorRef", "ArrayRef", "MappedRef", "ReaderRef",
    "in_order", "checkpoint_info", "parse_size", "plan_shards",
    "resolve_checkpoint", "check_state_dict", "strip_tied", "cast_state_dict", "tie_root",
    "SAFE_WEIGHTS_NAME", "SAFE_WEIGHTS_INDEX_NAME", "WEIGHTS_NAME", "WEIGHTS_INDEX_NAME",
]
