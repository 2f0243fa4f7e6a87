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

from fusionnet.train.config import STEPS

ROOT = Path(__file__).resolve().parents[1]


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
    offset = 0
    for step, h in histories.items():
        points = h.get("validations") or [{"iteration": 0, **h["initial_val"]}] + h["epochs"]
        ax.plot([offset + v["iteration"] for v in points], [v["val_sad"] for v in points], marker="o", ms=3, label=step)
        kept = h.get("kept") or {}
        if "iteration" in kept:
            ax.plot([offset + kept["iteration"]], [kept["val_sad"]], marker="*", ms=11, color="black")
        offset += h["iterations"]
    ax.set_xlabel("iteration (all steps)"), ax.set_ylabel("val SAD-25 per image (* kept)"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)


def main() -> int:
    profile = sys.argv[sys.argv.index("--profile") + 1] if "--profile" in sys.argv else "default"
    histories = {s: json.loads((ROOT / "models" / s / "history.json").read_text()) for s in STEPS}
    untrained = histories["segmentation"]["initial_val"]
    print("Validation (-25 band of the val images, mean per image): SAD/1000, MSE; kept = the weights the step hands on")
    print("| model | val SAD | val MSE | kept at iteration | improves on the step before | iterations | train s | samples/s | data wait |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    print(f"| untrained | {untrained['val_sad']:.3f} | {untrained['val_mse']:.4f} | | | | | | |")
    before = untrained["val_sad"]
    for step, h in histories.items():
        kept = h.get("kept") or {**h["epochs"][-1], "iteration": h["iterations"]}
        better = "yes" if kept["val_sad"] < before else "NO"
        print(
            f"| after {step} | {kept['val_sad']:.3f} | {kept['val_mse']:.4f} | {kept['iteration']} of {h['iterations']} | "
            f"{better} ({before:.3f} -> {kept['val_sad']:.3f}) | {h['iterations']} | "
            f"{h['train_s']:.0f} | {h['samples_per_s']:.2f} | {100 * h['data_wait_fraction']:.1f}% |"
        )
        before = kept["val_sad"]
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
