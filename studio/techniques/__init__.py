"""The built-in techniques. Importing this package registers every block (see base.register)."""

from studio.techniques import (  # noqa: F401  (imported to register)
    compile,
    distill,
    executorch_export,
    precision,
    prune,
    quantize,
    tensorrt,
)
from studio.techniques.onnx import (  # noqa: F401  (imported to register)
    blockwise,
    export,
    half,
    optimize,
    quantize_dynamic,
    quantize_static,
)
