"""Inference with a trained model: open it (`loading`), prepare it at a precision (`network`),
choose the precision by measurement (`precision`, `int8`), matte images (`matter`) and draw the outputs
(`render`). Geometry shared with int8 and ONNX is in `geometry`.

    from fusionnet.inference.loading import load_model
    from fusionnet.inference.matter import Matter
    result = Matter(load_model("model.safetensors"), precision="auto")(rgb)   # result.alpha: (H,W) in [0,1]
"""
