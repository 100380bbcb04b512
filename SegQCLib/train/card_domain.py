"""Write the ``domain`` entry of the shipped brain model cards: the training image's intensity profile.

``python -m SegQCLib.train.card_domain [CARD ...]`` (default: the three shipped brain cards) measures
Colin27's T1 (``mricron-data`` ch2.nii.gz, the image all three were trained or built on) with
:func:`SegQCLib.domain.domain_entry` and puts it, with ``modality`` MR and, for the atlas model, the
structures its atlases hold, under the card's ``domain`` key; every other key is kept. Run it again
after anything rewrites a card from an older copy (e.g. a calibration written from a card read
before).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

BRAIN_CARDS = ("sentinel-brain-mr", "nnqc-Brain", "atlas-brain-mr")


def write_card_domains(cards: list[Path]) -> None:
    from ..data.sources import colin27
    from ..domain import domain_entry
    from ..models.atlas import MODEL_NAME, AtlasQC

    entry = domain_entry(colin27("aal").image, "Colin27 T1 (mricron-data ch2.nii.gz), SegQCLib.domain.domain_entry")
    for path in cards:
        card = json.loads(path.read_text())
        domain = {**entry, "modality": "MR"}
        if card.get("name") == MODEL_NAME:
            domain["structures"] = AtlasQC().structures()
        card["domain"] = domain
        path.write_text(json.dumps(card, indent=2))
        print(f"{path}: domain {json.dumps({k: v for k, v in domain.items() if k != 'structures'})}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    shipped = Path(__file__).resolve().parents[2] / "Resources" / "Models"
    write_card_domains([Path(a) for a in args] or [shipped / f"{name}.json" for name in BRAIN_CARDS])


if __name__ == "__main__":
    main()
