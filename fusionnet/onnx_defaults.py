"""The ONNX export's defaults, importable without torch (for `fusionnet export --help`)."""

DEFAULT_OPSET = 20
MIN_OPSET = 18  # the dynamo exporter's lowest
DEFAULT_VERIFY_SIDE = 512
FP32_TOLERANCE = 1e-3  # max |d alpha| ORT fp32 vs PyTorch fp32: float rounding only (seen: ~1e-6)
INT8_TOLERANCE = 0.02  # mean |d alpha| ORT int8 vs PyTorch fp32 on the check image
