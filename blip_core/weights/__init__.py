"""Weight tables: the one description of every parameter, read by loaders, savers, converters and seeded init."""
from .init import Init, init_rules, iter_random_weights, random_weights
from .spec import (BACKENDS, CONV2D, IDENTITY, LINEAR, TRANSFORMS, Transform, WeightSpec, backend_params, backend_path,
                   backend_perm,
                   canonical_state, expected_shapes, owned)
from .tables import ARCHITECTURES, TABLES, weight_table

__all__ = ["ARCHITECTURES", "BACKENDS", "CONV2D", "IDENTITY", "Init", "LINEAR", "TABLES", "TRANSFORMS", "Transform",
           "WeightSpec", "backend_params", "backend_path", "backend_perm", "canonical_state", "expected_shapes", "init_rules",
           "iter_random_weights", "owned", "random_weights", "weight_table"]
