"""The built-in techniques. Importing this package registers every block (see base.register)."""

from studio.techniques import (  # noqa: F401  (imported to register)
    awq,
    compile,
    distill,
    executorch_export,
    gptq,
    kv_cache,
    lora,
    nncf_quantize,
    openvino_export,
    precision,
    prune,
    qat,
    quantize,
    smoothquant,
    tensorrt,
)
from studio.techniques.onnx import (  # noqa: F401  (imported to register)
    blockwise,
    export,
    export_genai,
    half,
    optimize,
    quantize_dynamic,
    quantize_static,
    runtime,
    runtime_genai,
)
