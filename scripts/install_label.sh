#!/usr/bin/env bash
# Install the MONAI Label serving extra into the active Python environment (run from anywhere in the repository).
#
#   scripts/install_label.sh          # serving: MONAI Label 0.8.5 + the "label" extra
#   scripts/install_label.sh --test   # also the app's test dependencies ("label-test": schemathesis)
#
# monailabel 0.8.5 declares requirements that would replace the CPU torch with torch 2.14 + torchvision + sam2 (GBs)
# and then fail to import with pydicom 3. So monailabel and pydicom-seg (which declares numpy<2 but works with
# numpy 2) are installed without their declared dependencies, and the runtime dependencies actually used come from
# the "label" extra, with pydicom<3, dicomweb-client<0.60 and pynetdicom<2.1.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="label"
case "${1:-}" in
    "") ;;
    --test) extras="label,label-test" ;;
    *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac

python -m pip install --quiet --no-deps "monailabel==0.8.5" "pydicom-seg==0.4.1"
echo "note: pip may now list monailabel's and pydicom-seg's declared requirements as unmet (sam2, ninja, numpymaxflow," \
    "numpy<2, jsonschema<4): expected, they are not needed for serving (docs/monai_label.md)"
python -m pip install --quiet -e ".[${extras}]"
# Fail here, not at server start, if an import-time dependency is missing.
python -c "import monailabel.interfaces.app, monailabel.client, her2_monai.label_app.server" >/dev/null
echo "MONAI Label extra installed ($(python -c 'import monailabel; print("monailabel", monailabel.__version__)'))"
