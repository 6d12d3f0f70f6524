#!/usr/bin/env bash
# Build a wheel and install it into a second, empty virtual environment; then
# import it from outside the source tree and run an op, so the check proves
# the wheel carries the compiled library (nothing is picked up from the tree).
# The second venv borrows torch from .venv through a .pth file instead of
# installing it again (gigabytes): what is checked is sparsesam's wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(pwd)/${SPARSESAM_VENV:-.venv}
scratch=$(mktemp -d -t sparsesam-wheel.XXXXXX)
trap 'rm -rf "$scratch"' EXIT

MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w "$scratch/dist" .
wheel=$(ls "$scratch"/dist/sparsesam-*.whl)
echo "built $(basename "$wheel")"
"$VENV/bin/python" -c 'import sys, zipfile; print("\n".join(zipfile.ZipFile(sys.argv[1]).namelist()))' "$wheel" > "$scratch/contents"
grep -q '^sparsesam/_C.*\.so$' "$scratch/contents" || { echo "the wheel has no compiled library" >&2; exit 1; }
# Every package of the tree must be in the wheel (pyproject lists them by hand).
for init in $(find sparsesam -name __init__.py) triton_kernels/__init__.py; do
  inside=${init/#triton_kernels/sparsesam/triton_kernels}
  grep -qx "$inside" "$scratch/contents" || { echo "the wheel lacks $inside" >&2; exit 1; }
done

"$VENV/bin/python" -m venv "$scratch/venv"
site=$("$scratch/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/borrowed-torch.pth"
"$scratch/venv/bin/python" -m pip install -q --no-deps "$wheel"
cd "$scratch"
"$scratch/venv/bin/python" - <<'PY'
import torch, sparsesam
assert "/venv/" in sparsesam.__file__ and "site-packages" in sparsesam.__file__, sparsesam.__file__
x, w = torch.randn(4, 6), torch.randn(3, 6)
m = torch.rand(3, 6) > 0.5
torch.testing.assert_close(sparsesam.ops.masked_linear(x, w, m), x @ (w * m).t())
print("wheel installs into a fresh venv and runs:", sparsesam.__file__)
PY
