"""Which weights a step hands on (`train_common.keep`): the last (paper) or the best validated.

Works on the step's resumable state dict (saved in state.pt): "validations" (every validation, the
init's included), "best" (the row of the lowest val SAD so far, keep "best" only) and "best_model"
(its weights, on the main process only). The init counts as a candidate, so a step that never beats
it hands its init on unchanged and says so (`kept["improved_on_init"]` False).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn


def note_validation(state: dict[str, Any], val: dict[str, float], epoch: float, keep: str,
                    model: nn.Module, is_main: bool) -> None:
    """Append a validation row at state["iteration"]; with keep "best", remember a new lowest val SAD
    and (main process) a CPU copy of the model's weights."""
    row = {"iteration": state["iteration"], "epoch": epoch, "val_sad": val.get("val_sad", math.nan),
           "val_mse": val.get("val_mse", math.nan)}
    state["validations"].append(row)
    best = state["best"]
    if keep == "best" and math.isfinite(row["val_sad"]) and (best is None or row["val_sad"] < best["val_sad"]):
        state["best"] = row
        if is_main:
            state["best_model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def kept(state: dict[str, Any], keep: str) -> dict[str, Any]:
    """The validation row of the weights model.safetensors holds, with "improved_on_init"
    (True/False for keep "best"; None for keep "last", which does not choose)."""
    if keep == "best" and state["best"] is not None:
        return {**state["best"], "improved_on_init": state["best"]["iteration"] > 0}
    last = state["validations"][-1] if state["validations"] else {}
    return {**last, "improved_on_init": None}


def describe(step: str, state: dict[str, Any]) -> str:
    """One line for the log: which iteration a keep-"best" step kept, and against its init."""
    row = kept(state, "best")
    init = (state["initial_val"] or {}).get("val_sad", math.nan)
    verdict = "better than" if row["improved_on_init"] else "no better than"
    return f"{step} step: keeping the weights of iteration {row['iteration']} (val SAD {row['val_sad']:.4g}; {verdict} its init's {init:.4g})"
