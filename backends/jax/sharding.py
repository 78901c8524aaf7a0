"""Tensor-parallel placement of a model's params over a ``jax.sharding.Mesh``.

The rule of which parameter is split along which dimension is the spec layer's (``blip_core.sharding``:
Megatron-style column / row splits of attention and feed-forward layers, vocabulary-split embeddings and LM
heads, the rest replicated); here it only becomes ``NamedSharding``s. Params are committed to their
shardings and every compiled function of the model (forward, feature getters, the one ``generate``
program) takes them as arguments, so XLA's SPMD partitioner runs the whole program over the mesh and
inserts the collectives; nothing else changes.

The mesh's axes are used as ``Auto`` axes (see ``auto_axes``). Example (4 devices, tensor-parallel over all
of them)::

    mesh = jax.make_mesh((4,), ("model",))
    model = Blip2ForConditionalGeneration.from_pretrained("dir", mesh=mesh)   # each shard straight to its device
    ids = model.generate(pixel_values=px, max_new_tokens=20)                 # one program over 4 devices
"""
from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from blip_core.checkpoint import in_order
from blip_core.sharding import MODEL_AXIS, partition_specs
from blip_core.weights import weight_table


def param_shardings(arch: str, config, mesh: Mesh, axis: str = MODEL_AXIS) -> dict:
    """``{jax param path: NamedSharding}`` of architecture ``arch`` over ``mesh``'s axis ``axis``."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has axes {tuple(mesh.axis_names)}, not the tensor-parallel axis {axis!r}; "
                         f"name one of its axes {axis!r} or pass axis=")
    specs, _ = partition_specs(weight_table(arch, config), "jax", int(mesh.shape[axis]), axis)
    mesh = auto_axes(mesh)
    return {path: NamedSharding(mesh, PartitionSpec(*spec)) for path, spec in specs.items()}


def auto_axes(mesh: Mesh) -> Mesh:
    """The same devices and axis names with every axis ``Auto``: the model code carries no sharding
    annotations, so the partitioner propagates the params' shardings (``jax.make_mesh`` makes ``Explicit``
    axes by default, under which every reshape of a split activation would need one)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def place(flat: dict, shardings: dict, leaf_dtype=None) -> dict:
    """``{path: array}`` -> nested params, each leaf put onto its sharding (cast to ``leaf_dtype(path)`` first
    when given)."""
    missing = sorted("/".join(p) for p in flat if p not in shardings)
    if missing:
        raise ValueError(f"no sharding rule for params {missing[:5]} (the weight table does not list them)")
    out = {}
    for path, arr in flat.items():
        dtype = None if leaf_dtype is None else np.dtype(leaf_dtype(path))
        if dtype is not None and np.dtype(arr.dtype) != dtype:
            arr = arr.astype(dtype) if isinstance(arr, jax.Array) else np.asarray(arr).astype(dtype)
        out[path] = jax.device_put(arr, shardings[path])
    return traverse_util.unflatten_dict(out)


def load_sharded(items: list, shardings: dict, leaf_dtype) -> dict:
    """``{path: array}`` over the mesh from ``blip_core.pretrained.load_items`` rows, one tensor at a time: laid
    out on the host (a transposed view of the mapped file), split into its shards by ``jax.device_put``, cast
    there to ``leaf_dtype(path)``, then its mapped pages released (as ``backends.jax.loading.load_params``)."""
    out = {}
    for path, ref, perm in in_order(items, ref=lambda item: item[1]):
        if path not in shardings:
            raise ValueError(f"no sharding rule for param {'/'.join(path)} (the weight table does not list it)")
        host = ref.view()
        x = jax.device_put(host if perm is None else np.transpose(host, perm), shardings[path])
        want = np.dtype(leaf_dtype(path))
        out[path] = x if x.dtype == want else x.astype(want)
        out[path].block_until_ready()    # the host data must be read before its pages are dropped
        ref.release()
    return out


def shard_params(params: dict, arch: str, config, mesh: Mesh, axis: str = MODEL_AXIS) -> dict:
    """A model's nested ``params`` re-placed over ``mesh`` (see ``param_shardings``)."""
    return place(traverse_util.flatten_dict(params), param_shardings(arch, config, mesh, axis))
