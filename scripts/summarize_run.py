"""Print the figures the README quotes from a finished `make run`, copy its example picture and draw
the validation curve of each step.

    python scripts/summarize_run.py                     # after `make run`, from the project root
    python scripts/summarize_run.py --profile photos    # after `make run PROFILE=photos`
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("segmentation", "fusion", "joint")


def claims(metrics: dict) -> None:
    """The default profile's targets: beat constant 0.5 on the four -25 metrics (SAD by >= 30%), SAD-full < 1.5x SAD-25."""
    raw, const = metrics["raw"], metrics["constant_half"]
    print("\nOurs-raw against constant 0.5 (given the trimap), test composites:")
    for key in ("sad", "mse", "grad", "conn"):
        r, c = raw["band"][key], const["band"][key]
        print(f"  {key.upper()}-25: {r:.4f} vs {c:.4f} -> ratio {r / c:.3f} ({'beats' if r < c else 'LOSES'})")
    print(f"  SAD-full / SAD-25 = {raw['full']['sad']:.3f} / {raw['band']['sad']:.3f} = {raw['full']['sad'] / raw['band']['sad']:.3f}")


def val_curves(histories: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    offset, last = 0, (0, histories["segmentation"]["initial_val"]["val_sad"])
    for step, h in histories.items():
        xs = [last[0]] + [offset + e["iterations"] for e in h["epochs"]]
        ys = [last[1]] + [e["val_sad"] for e in h["epochs"]]
        ax.plot(xs, ys, marker="o", label=step)
        offset, last = offset + h["iterations"], (xs[-1], ys[-1])
    ax.set_xlabel("iteration (all steps)"), ax.set_ylabel("val SAD-25 per crop"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)


def main() -> int:
    profile = sys.argv[sys.argv.index("--profile") + 1] if "--profile" in sys.argv else "default"
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
    claims(json.loads((ROOT / "metrics" / "evaluate.json").read_text()))
    photos = ROOT / "metrics" / "photos.json"
    if photos.is_file():
        doc = json.loads(photos.read_text())
        print("\nreal photos:", json.dumps(doc.get("held_out", {}).get("scored")), json.dumps(doc.get("comparisons"), indent=1)[:3000])
    curves = ROOT / "docs" / f"{profile}-run-val-curves.png"
    val_curves(histories, curves)
    print(f"\nvalidation curves -> {curves.relative_to(ROOT)}")
    pictures = sorted((ROOT / "reports" / "pictures").glob("best_1_*.png"))
    if pictures:
        target = ROOT / "docs" / f"{profile}-run-example.png"
        shutil.copyfile(pictures[0], target)
        print(f"\npicture: {pictures[0].relative_to(ROOT)} -> {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
