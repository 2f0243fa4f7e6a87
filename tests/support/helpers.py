"""Plain helpers shared by the tests (fixtures live in tests/conftest.py).

Import them as `from tests.support.helpers import free_port, wait_http, ...`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Real photos with ground-truth alpha, beside the checkout (never copied in); see its README.md.
SHARED_DATA = ROOT.parent / "shared" / "data"
ALPHAMATTING = SHARED_DATA / "alphamatting-dev"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll(check, timeout: float, what: str, proc: subprocess.Popen | None = None,
         first: float = 0.05, longest: float = 1.0):
    """Call `check()` until it returns something truthy (returned), with back-off from `first` to `longest` s.

    Fails early with the exit status if `proc` exits; TimeoutError naming `what` after `timeout` s.
    """
    deadline, wait = time.monotonic() + timeout, first
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(wait)
        wait = min(longest, wait * 1.5)


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll `url` (back-off 0.05 -> 1 s) until it answers 200; fail early if `proc` exits."""
    import urllib.error
    import urllib.request

    def answered() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    poll(answered, timeout, f"{url} answered 200", proc)


def stop_process(proc: subprocess.Popen, timeout: float = 20.0, group: bool = False) -> int | None:
    """SIGTERM (to its process group when `group`, i.e. started with start_new_session=True), wait
    `timeout` s, then SIGKILL. Returns the exit status; safe on a process that already exited."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM) if group else proc.terminate()
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
            proc.wait()
        except ProcessLookupError:
            proc.wait()
    return proc.returncode


# What a test run inherits from a surrounding pipeline run or DVC stage and would otherwise log into.
INHERITED_RUN_ENV = ("MLFLOW_RUN_ID", "FUSIONNET_PARENT_RUN_ID", "FUSIONNET_PIPELINE_RUN", "DVC_STAGE", "DVC_ROOT",
                     "FUSIONNET_PROJECT")


def isolate_mlflow(mp: pytest.MonkeyPatch, uri: str, *, experiment: str | None = None,
                   model_cache: Path | None = None) -> None:
    """Point MLflow at `uri` through `mp` (a MonkeyPatch): no run, parent run, pipeline run or DVC stage
    inherited; optionally the experiment fusionnet logs to and the resolver's model cache; no progress bars."""
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    for name in INHERITED_RUN_ENV:
        mp.delenv(name, raising=False)
    if experiment is not None:
        mp.setenv("FUSIONNET_MLFLOW_EXPERIMENT", experiment)
    if model_cache is not None:
        mp.setenv("FUSIONNET_MODEL_CACHE", str(model_cache))
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def require_shared_data(path: Path = ALPHAMATTING) -> Path:
    """`path` (under ../shared/data) if it is there, else skip the test saying what is missing."""
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared/data is absent on this machine)")
    return path


def tiny_net(seed: int = 0, narrow: bool = False, **overrides):
    """A random densenet121 LateFusionNet, pretrained=False, seeded with `seed`, in eval mode.

    narrow=True: 16-wide FPN, fusion and decoders (several times faster on CPU, not the paper's widths).
    """
    import torch

    from fusionnet.model import LateFusionNet

    kwargs = {"backbone": "densenet121", "pretrained": False}
    if narrow:
        kwargs.update(fpn_width=16, fusion_widths=(16,) * 5, decoder_max_width=16)
    torch.manual_seed(seed)
    return LateFusionNet(**{**kwargs, **overrides}).eval()


def tiny_train_params(epochs: int = 1, iters: int = 2, narrow: bool = False, **common) -> dict:
    """A params.yaml dict for CPU training in seconds: densenet121 from scratch, fp32, batch 2, one
    thread, `epochs` x `iters` iterations in each of the three steps; `common` overrides train_common."""
    step = {"epochs": epochs, "max_iters_per_epoch": iters, "base_lr": 5e-4, "max_lr": 1.5e-3, "half_cycle_epochs": 1}
    model = {"backbone": "densenet121", "pretrained": False, "input_norm": "imagenet"}
    if narrow:
        model.update(fpn_width=16, fusion_widths=[32, 16, 16, 8, 32], decoder_max_width=32)
    return {
        "seed": 0,
        "model": model,
        "train_common": {"device": "cpu", "precision": "fp32", "channels_last": False, "threads": 1, "batch_size": 2,
                         "num_workers": 0, "checkpoint_every": 1, "val_max_images": 1, "visual_count": 0, **common},
        "train_seg": dict(step), "train_fusion": dict(step), "train_joint": dict(step),
    }


def one_thread_env(**extra: str) -> dict[str, str]:
    """os.environ for a child process with one OpenMP thread (2 shared cores: oversubscription is ~10x slower)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "DO_NOT_TRACK": "true", **extra}
