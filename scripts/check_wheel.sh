#!/usr/bin/env bash
# The packaging check, as a new user installs the package:
#   1. an sdist from the tree; it must hold every tracked source the build
#      and the tests read (headers, .cu, Triton kernels, CMake, tests);
#   2. a clean venv holding only the build requirements (torch at the
#      pinned version, taken from pip's cache or the local disk, not
#      downloaded again), where the wheel is built from that sdist;
#   3. the wheel installed there with its declared dependencies, then,
#      from outside the source tree: import, an op, `sparsesam --help`,
#      and a one-epoch `sparsesam train` that exports its model (the
#      path that once needed an undeclared safetensors).
# setuptools warnings (deprecated license form, ...) in either build fail it.
# Scratch space: $SPARSESAM_WHEEL_DIR (kept; reused venv) or a temporary
# folder (removed). MAX_JOBS stays low: the build runs beside other jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
VENV=$root/${SPARSESAM_VENV:-.venv}
export MAX_JOBS=${MAX_JOBS:-2}
if [ -n "${SPARSESAM_WHEEL_DIR:-}" ]; then
  scratch=$SPARSESAM_WHEEL_DIR; mkdir -p "$scratch"; rm -rf "$scratch/dist" "$scratch/run"
else
  scratch=$(mktemp -d -t sparsesam-wheel.XXXXXX)
  trap 'rm -rf "$scratch"' EXIT
fi
fail() { echo "check_wheel: $*" >&2; exit 1; }
no_setuptools_warnings() {  # $1: a build log
  if grep -nE "SetuptoolsDeprecationWarning|SetuptoolsWarning|_DeprecatedConfig|is deprecated" "$1"; then
    fail "setuptools warned while building (see above)"
  fi
}

# 1. The sdist (no isolation: setup.py imports torch, which .venv has).
"$VENV/bin/python" -m build --sdist --no-isolation --skip-dependency-check -o "$scratch/dist" . \
  > "$scratch/sdist.log" 2>&1 || { cat "$scratch/sdist.log"; fail "the sdist did not build"; }
no_setuptools_warnings "$scratch/sdist.log"
sdist=$(ls "$scratch"/dist/sparsesam-*.tar.gz)
echo "built $(basename "$sdist")"
tar tzf "$sdist" | sed 's|^[^/]*/||' > "$scratch/sdist-contents"
if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
  sources=$(git -C "$root" ls-files csrc triton_kernels cpp_tests tests sparsesam CMakeLists.txt setup.py \
            pyproject.toml README.md LICENSE)
else
  sources=$(find csrc triton_kernels cpp_tests tests sparsesam -type f \( -name '*.py' -o -name '*.h' \
            -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu' \) -not -path '*/__pycache__/*')
fi
for f in $sources; do
  grep -qxF "$f" "$scratch/sdist-contents" || fail "the sdist lacks $f"
done

# 2. A clean venv with the build requirements only; the wheel built from the sdist.
clean=$scratch/venv
torch_pin=$(grep -E '^torch==' requirements-dev.txt)
[ -x "$clean/bin/python" ] || "$VENV/bin/python" -m venv "$clean"
"$clean/bin/python" -m pip install -q "$torch_pin" "setuptools>=77" wheel ninja
"$clean/bin/python" -m pip wheel --no-build-isolation --no-deps -w "$scratch/dist" "$sdist" -v \
  > "$scratch/wheel.log" 2>&1 || { tail -n 60 "$scratch/wheel.log"; fail "no wheel from the sdist"; }
no_setuptools_warnings "$scratch/wheel.log"
wheel=$(ls "$scratch"/dist/sparsesam-*.whl)
echo "built $(basename "$wheel") from the sdist"
"$clean/bin/python" -c 'import sys, zipfile; print("\n".join(zipfile.ZipFile(sys.argv[1]).namelist()))' "$wheel" \
  > "$scratch/contents"
grep -q '^sparsesam/_C.*\.so$' "$scratch/contents" || fail "the wheel has no compiled library"
# Every package of the tree must be in the wheel (pyproject lists them by hand).
for init in $(find sparsesam -name __init__.py) triton_kernels/__init__.py; do
  inside=${init/#triton_kernels/sparsesam/triton_kernels}
  grep -qx "$inside" "$scratch/contents" || fail "the wheel lacks $inside"
done

# 3. Installed with its declared dependencies (torch is already there), used from outside the tree.
"$clean/bin/python" -m pip uninstall -q -y sparsesam 2>/dev/null || true
"$clean/bin/python" -m pip install -q "$wheel"
mkdir -p "$scratch/run" && cd "$scratch/run"
"$clean/bin/python" - <<'PY'
import torch, sparsesam
assert "/venv/" in sparsesam.__file__ and "site-packages" in sparsesam.__file__, sparsesam.__file__
x, w = torch.randn(4, 6), torch.randn(3, 6)
m = torch.rand(3, 6) > 0.5
torch.testing.assert_close(sparsesam.ops.masked_linear(x, w, m), x @ (w * m).t())
print("the wheel built from the sdist installs into a clean venv and runs:", sparsesam.__file__)
PY
"$clean/bin/sparsesam" --help > /dev/null || fail "sparsesam --help failed"
"$clean/bin/sparsesam" train --model smallcnn --width 0.5 --dataset synthetic --limit 128 --epochs 1 --out "$scratch/run/model" --no-progress \
  > "$scratch/train.log" 2>&1 || { tail -n 30 "$scratch/train.log"; fail "sparsesam train failed in the clean venv"; }
[ -f "$scratch/run/model/model.safetensors" ] || fail "sparsesam train wrote no model.safetensors"
echo "sparsesam --help and a one-epoch sparsesam train run in the clean venv"
