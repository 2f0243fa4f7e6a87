"""Print the figures the README quotes from a finished `make run`, and copy its example picture.

    python scripts/summarize_run.py            # after `make run`, from the project root
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("segmentation", "fusion", "joint")


def main() -> int:
    histories = {s: json.loads((ROOT / "models" / s / "history.json").read_text()) for s in STEPS}
    untrained = histories["segmentation"]["initial_val"]
    print("Validation (-25 band of val crops, mean per crop): SAD/1000, MSE")
    print(f"| model | val SAD | val MSE | iterations | train s | samples/s | data wait |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| untrained | {untrained['val_sad']:.3f} | {untrained['val_mse']:.4f} | | | | |")
    for step, h in histories.items():
        last = h["epochs"][-1]
        print(
            f"| after {step} | {last['val_sad']:.3f} | {last['val_mse']:.4f} | {h['iterations']} | "
            f"{h['train_s']:.0f} | {h['samples_per_s']:.2f} | {100 * h['data_wait_fraction']:.1f}% |"
        )
    table = (ROOT / "reports" / "table.md").read_text().split("## Provenance")[0]
    print()
    print(table.strip())
    pictures = sorted((ROOT / "reports" / "pictures").glob("best_1_*.png"))
    if pictures:
        target = ROOT / "docs" / "default-run-example.png"
        shutil.copyfile(pictures[0], target)
        print(f"\npicture: {pictures[0].relative_to(ROOT)} -> {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
