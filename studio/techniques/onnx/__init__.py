"""The ONNX techniques, one per module: export.onnx and export.onnx_genai (export), the ONNX -> ONNX passes
onnx.optimize, onnx.quantize_dynamic, onnx.quantize_static, onnx.half and onnx.quantize_blockwise, and the
runtime records runtime.onnxruntime and runtime.onnxruntime_genai, each run in the frame of graph_pass.
Reading and writing graph files is studio.checkpoints.onnx_graph's."""
