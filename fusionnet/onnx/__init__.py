"""ONNX export (`export`), ONNX Runtime inference (`runtime`) and static int8 quantisation (`quantize`)."""
