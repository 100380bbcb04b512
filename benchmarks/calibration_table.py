"""The calibrated intervals of every installed model card, as measured by ``segqc calibrate``.

Run: .venv/bin/python benchmarks/calibration_table.py [--cards DIR] [> benchmarks/calibration.md]

Prints one Markdown table: per model, level (volume / slice / patch), metric and held-out split, the
empirical coverage of the nominal 90 % intervals on cases the calibration did not see (5-fold
cross-fitting by case) with the mean interval width, and the stricter coverage when whole structures
(or subjects) are held out, where the card has several. Nothing is recomputed: refit a card with
``segqc calibrate MODEL``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rows(card: dict) -> list[str]:
    entry = card["calibration"]
    out = []
    for level, by_metric in entry["measured_coverage"].items():
        for metric, by_unit in by_metric.items():
            cases = by_unit["case"]
            strict = by_unit.get("structure", {})
            for split, r in cases.items():
                if split == "all":
                    continue  # the pooled row: each split is shown
                held = strict.get(split)
                strict_text = f"{100 * held['coverage']:.1f} %" if held else "-"
                out.append(f"| {card['name']} | {level} | {metric} | {split} | {r['n']} | "
                           f"{100 * r['coverage']:.1f} % | {r['mean_width']:.3g} | {strict_text} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", type=Path, default=ROOT / "Resources" / "Models")
    args = parser.parse_args()
    print("| model | level | metric | held-out split | n | coverage (by case) | mean width | coverage (by structure) |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(args.cards.glob("*.json")):
        card = json.loads(path.read_text())
        if "calibration" in card:
            print("\n".join(rows(card)))


if __name__ == "__main__":
    main()
