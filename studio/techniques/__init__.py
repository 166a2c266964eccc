"""The built-in techniques. Importing this package registers every block (see base.register)."""

from studio.techniques import (  # noqa: F401  (imported to register)
    awq,
    compile,
    distill,
    gptq,
    onnx_blockwise,
    onnx_export,
    onnx_passes,
    precision,
    prune,
    quantize,
    tensorrt,
)
