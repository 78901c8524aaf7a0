"""Weight tables: the one description of every parameter, read by loaders, savers and converters."""
from .spec import (BACKENDS, CONV2D, IDENTITY, LINEAR, TRANSFORMS, Transform, WeightSpec, backend_path,
                   expected_shapes, owned)
from .tables import ARCHITECTURES, TABLES, weight_table

__all__ = ["ARCHITECTURES", "BACKENDS", "CONV2D", "IDENTITY", "LINEAR", "TABLES", "TRANSFORMS", "Transform",
           "WeightSpec", "backend_path", "expected_shapes", "owned", "weight_table"]
