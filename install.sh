#!/usr/bin/env bash
# Installs SegQC and everything its tests and demo need into ./.venv (idempotent).
#   - Debian: mricron-data (Colin27 T1 + AAL/Brodmann atlases: the real sample data).
#             chromium (headless: the test that renders the batch report).
#   - PyPI:   the pinned torch stack and SegQC with all extras, editable.
# Pip downloads are cached in ~/.cache/pip, so a second run takes about two minutes.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=()
[ -f /usr/share/mricron/templates/ch2.nii.gz ] || APT_PACKAGES+=(mricron-data)
[ -x /usr/bin/chromium ] || APT_PACKAGES+=(chromium)
if [ "${#APT_PACKAGES[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT_PACKAGES[@]}"
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c .ci/constraints.txt -e ".[all]"
.venv/bin/python -c "import SegQCLib, torch, monai, SimpleITK, slicer; print('SegQC installed: torch', torch.__version__, '| monai', monai.__version__)"
