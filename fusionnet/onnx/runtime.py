"""Running an exported ONNX matting model with ONNX Runtime, behind the same `Matter` interface.

`OnnxMatter(path)` is a `fusionnet.inference.matter.Matter` whose network is an ONNX Runtime session: resizing,
reflection padding to the stride, cropping, guided-filter refinement and `MatteResult` are Matter's
own code; only `run_network` differs. The file is what `fusionnet export --format onnx` writes
(`fusionnet.onnx.export`): input "image" `(N,3,H,W)` float32 in [0,1] with H and W multiples of 32,
outputs "alpha", "fg_prob", "bg_prob" `(N,1,H,W)` float32 in [0,1].

Provider: CUDAExecutionProvider when onnxruntime has it and the device allows ("auto" or "cuda"),
else CPUExecutionProvider. Session: intra-op threads = torch's thread count (so `--threads`,
OMP_NUM_THREADS and the server's per-worker share apply alike), graph optimisation level "all".
The precision is the file's (fp32 or int8, fixed at export); a requested one is not applied.

onnxruntime is imported when a session is made, not with this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fusionnet.inference.loading import DEVICES
from fusionnet.inference.matter import DEFAULT_GUIDED_EPS, DEFAULT_GUIDED_RADIUS, DEFAULT_MAX_SIDE, Matter
from fusionnet.model.geometry import pad_to_multiple

ONNX_SUFFIX = ".onnx"
INPUT_NAME = "image"
OUTPUT_NAMES = ("alpha", "fg_prob", "bg_prob")
META_PREFIX = "fusionnet."
CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"


class OnnxModelError(ValueError):
    """The file is not a usable fusionnet ONNX model (unreadable, not ONNX, wrong inputs/outputs)."""


def is_onnx_model(spec: str | os.PathLike) -> bool:
    """Whether a model spec names an ONNX file (suffix .onnx, any case): that selects this backend."""
    return os.fspath(spec).lower().endswith(ONNX_SUFFIX)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's `fusionnet.*` metadata (opset, precision, config JSON, ...), prefix removed."""
    import onnx

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for anything unreadable
        raise OnnxModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    return {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}


def choose_provider(device: str = "auto") -> str:
    """CUDAExecutionProvider for device "auto"/"cuda" when installed, else CPUExecutionProvider."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    if device in ("auto", "cuda") and CUDA_PROVIDER in available:
        return CUDA_PROVIDER
    if device == "cuda":
        raise RuntimeError(
            f"device 'cuda' requested but this onnxruntime has no {CUDA_PROVIDER} (it has {', '.join(available)}); "
            "install onnxruntime-gpu or use --device cpu"
        )
    return CPU_PROVIDER


def create_session(path: str | os.PathLike, *, device: str = "auto", threads: int | None = None) -> tuple[Any, str]:
    """An InferenceSession for `path` and the provider it runs on; threads default torch's count."""
    import onnxruntime as ort

    provider = choose_provider(device)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1  # one chain of convolutions: parallelism is inside each op
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: warnings about unused initialisers are noise here
    providers = [provider] if provider == CPU_PROVIDER else [provider, CPU_PROVIDER]
    try:
        session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... classes
        raise OnnxModelError(f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc})") from exc
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT_NAME] or not set(OUTPUT_NAMES) <= set(outputs):
        raise OnnxModelError(
            f"{path}: not a fusionnet matting model: inputs {inputs} (want ['{INPUT_NAME}']), outputs {outputs} "
            f"(want {list(OUTPUT_NAMES)}); export one with `fusionnet export --format onnx`"
        )
    return session, session.get_providers()[0]


class OnnxMatter(Matter):
    """A Matter whose network is an ONNX Runtime session of an exported model file.

    Args:
        model_path: the `.onnx` file (`fusionnet export --format onnx`).
        device: "auto" (CUDA provider when installed), "cpu" or "cuda".
        max_side, refine, radius, eps: as Matter's.
        threads: ONNX Runtime intra-op threads (default: torch.get_num_threads()).
        precision: accepted for Matter's signature and ignored; `precision` is the file's (fp32/int8).

    Attributes beyond Matter's: `path`, `provider` (the ORT provider that runs), `metadata`, `config`
    (the LateFusionNet config the file was exported from). `device` is where the pre/post-processing
    tensors live (CPU: ONNX Runtime takes and returns numpy arrays).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        device: str = "auto",
        max_side: int = DEFAULT_MAX_SIDE,
        refine: bool = True,
        radius: int = DEFAULT_GUIDED_RADIUS,
        eps: float = DEFAULT_GUIDED_EPS,
        threads: int | None = None,
        precision: str = "auto",
    ):
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}")
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such model file")
        self.metadata = read_metadata(self.path)
        self.session, self.provider = create_session(self.path, device=device, threads=threads)
        self.device = torch.device("cpu")
        self.precision = self.metadata.get("precision", "fp32")
        self.requested_precision = precision
        self.precision_reason = "fixed when the ONNX file was exported"
        self.config: dict[str, Any] = json.loads(self.metadata.get("config", "{}"))
        self.max_side = max_side
        self.refine = refine
        self.radius = radius
        self.eps = eps
        self.stride = int(self.metadata.get("stride", 32))
        self.model = None  # no torch network: run_network below is the session
        self.int8_info = None  # Matter's torch-int8 calibration check; an int8 file was checked at export
        self._network = None

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.float32

    def describe(self) -> str:
        """The device line: `cpu (onnxruntime CPUExecutionProvider, int8 model.onnx)`."""
        where = "cuda" if self.provider == CUDA_PROVIDER else "cpu"
        return f"{where} (onnxruntime {self.provider}, {self.precision} {self.path.name})"

    @torch.inference_mode()
    def run_network(self, batch: Tensor) -> Tensor:
        """`(N,3,h,w)` float in [0,1], any h, w -> `(N,3,h,w)` float32 maps [alpha, fg_prob, bg_prob].

        Pads to the stride (reflection, as Matter), runs the session, crops the padding off.
        """
        height, width = batch.shape[-2:]
        x = pad_to_multiple(batch.to(torch.float32).cpu(), self.stride)
        feed = {INPUT_NAME: np.ascontiguousarray(x.numpy(), dtype=np.float32)}
        alpha, fg_prob, bg_prob = self.session.run(list(OUTPUT_NAMES), feed)
        maps = torch.from_numpy(np.concatenate([alpha, fg_prob, bg_prob], axis=1))[..., :height, :width]
        return maps.float().clamp_(0.0, 1.0).contiguous()
