"""The ONNX techniques, one per module: export.onnx (export), and the ONNX -> ONNX passes onnx.optimize,
onnx.quantize_dynamic, onnx.quantize_static, onnx.half and onnx.quantize_blockwise, each run in the frame
of graph_pass. Reading and writing graph files is studio.checkpoints.onnx_graph's."""
