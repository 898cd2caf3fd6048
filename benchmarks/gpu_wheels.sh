#!/usr/bin/env bash
# Collect into .whl/ (git-ignored) the wheels a bare GPU box lacks (its image has torch, lightning, torchmetrics,
# transformers, scikit-image, but Python 3.12 without diffusers/hydra/kornia/lpips/pyiqa); gpu_check.sh
# installs them into /tmp/site when it finds the folder. Run here, from the repository root, before the check.
set -euo pipefail
mkdir -p .whl
platform="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64"
platform="$platform --platform manylinux2014_x86_64"
for pkg in diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 kornia==0.9.0 kornia-rs==0.2.0 lpips==0.1.4 \
           pyiqa==0.1.16 addict yapf facexlib filterpy ftfy; do
  python3 -m pip download -q --no-deps --only-binary=:all: $platform -d .whl "$pkg"
done
# published as source only: build the (pure-Python) wheels here
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 openai-clip
ls .whl
