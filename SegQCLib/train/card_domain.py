"""Adds the training image's domain entry to the shipped brain cards (run once; keeps every other key)."""
import json
from pathlib import Path
from SegQCLib.data.sources import colin27
from SegQCLib.domain import domain_entry
from SegQCLib.models.atlas import AtlasQC

colin = colin27("aal").image
entry = domain_entry(colin, "Colin27 T1 (mricron-data ch2.nii.gz), SegQCLib.domain.domain_entry")
for name in ("sentinel-brain-mr", "nnqc-Brain", "atlas-brain-mr"):
    path = Path("Resources/Models") / f"{name}.json"
    card = json.loads(path.read_text())
    dom = dict(entry)
    dom["modality"] = "MR"
    if name == "atlas-brain-mr":
        dom["structures"] = AtlasQC().structures()
    card["domain"] = dom
    path.write_text(json.dumps(card, indent=2))
    print(name, {k: v for k, v in dom.items() if k != "structures"}, len(dom.get("structures", [])))
