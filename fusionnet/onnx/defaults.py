"""The ONNX export's defaults, importable without torch (for `fusionnet export --help`)."""

DEFAULT_OPSET = 20
MIN_OPSET = 18  # the dynamo exporter's lowest
DEFAULT_VERIFY_SIDE = 512
FP32_TOLERANCE = 1e-3  # max |d alpha| ORT fp32 vs PyTorch fp32: float rounding only (seen: ~1e-6)
INT8_TOLERANCE = 0.02  # mean |d alpha| ORT int8 vs PyTorch fp32 on the check image
DECODERS = ("model.fg_decoder", "model.bg_decoder")
# What int8 touches, by name: keyword arguments of onnx_quantize.quantize_onnx (benchmarks/bench_int8.py
# measures both; 2-core AMX host, make run's checkpoint, 4 real photos at 800 px): fast, every op, 3.16 s,
# mean |d alpha| 0.0067; accurate, only the encoder's and fusion's convolutions, 4.79 s, 0.0043 (ORT fp32 7.10 s).
INT8_SCHEMES = {"fast": {}, "accurate": {"op_types": ("Conv",), "exclude_scopes": DECODERS}}
DEFAULT_INT8_SCHEME = "accurate"
