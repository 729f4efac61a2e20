#!/usr/bin/env bash
# Install mmsegmentation (with mmcv's compiled ops) into a virtual environment.
#
# Usage: tools/mmseg-setup.sh [VENV]        (default: /work/main/.venv)
#
# Why this script: mmcv 2.1.0 ships no wheel for recent torch, so its ops are built from the
# PyPI sdist. torch >= 2.14 headers need C++20 while mmcv's setup.py forces -std=c++17, so a
# compiler wrapper rewrites the flag. The wheel is built once into a cache folder
# (BENCH_WHEEL_CACHE, default ~/.cache/bench/wheels) keyed by python and torch versions, and
# reused on later runs (and in CI). Idempotent: an environment that already imports mmseg
# with mmcv ops is left alone.
set -euo pipefail

# The whole script is one function, parsed before any of it runs: bash reads a script as it
# executes it, so editing this file during a (long) build would otherwise make the running
# shell read garbage at a shifted offset.
main() {

VENV="${1:-/work/main/.venv}"
PY="$VENV/bin/python"
MMCV_VERSION="2.1.0"
MMENGINE_VERSION="0.10.7"
MMSEG_VERSION="1.2.2"
CACHE_ROOT="${BENCH_WHEEL_CACHE:-$HOME/.cache/bench/wheels}"
MAX_JOBS="${MAX_JOBS:-2}"

if [ ! -x "$PY" ]; then
    echo "mmseg-setup: no python at $PY (pass the virtual environment folder as argument)" >&2
    exit 2
fi

log() { echo "[mmseg-setup $(date -u +%H:%M:%S)] $*"; }

already_ok() {
    "$PY" - <<'PYEOF' 2>/dev/null
import mmcv, mmseg, mmengine
from mmcv.ops import nms  # noqa: F401  (fails without compiled ops)
assert mmcv.__version__ == "2.1.0", mmcv.__version__
assert mmseg.__version__ == "1.2.2", mmseg.__version__
PYEOF
}

if already_ok; then
    log "mmcv $MMCV_VERSION (ops), mmengine and mmsegmentation $MMSEG_VERSION already in $VENV"
    exit 0
fi

TAG="$("$PY" -c 'import sys, torch; v = sys.version_info; print("py%d%d-torch%s" % (v[0], v[1], torch.__version__.replace("+", "_")))')"
CACHE="$CACHE_ROOT/$TAG"
mkdir -p "$CACHE"

# The OpenMMLab packages are installed with --no-deps and their runtime needs listed here:
# their metadata asks for opencv-python(-headless), which would overwrite the cv2 of
# opencv-contrib-python-headless (we need cv2.ximgproc).
# (the same list as pyproject's `mmseg` extra)
RUNTIME_DEPS=(addict yapf rich termcolor regex ftfy prettytable packaging matplotlib scipy)
log "build tools: setuptools>=77,<80, wheel, ninja; mmengine==$MMENGINE_VERSION"
"$PY" -m pip install -q "setuptools>=77,<80" wheel ninja "${RUNTIME_DEPS[@]}"
"$PY" -m pip install -q --no-deps "mmengine==$MMENGINE_VERSION"

WHEEL="$(ls "$CACHE"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -n "$WHEEL" ]; then
    log "reusing cached wheel $WHEEL"
else
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    # Compiler wrapper: torch's headers need C++20, mmcv's setup.py passes -std=c++17.
    REAL_CXX="$(command -v "${CXX:-c++}")"
    cat > "$WORK/cxx20" <<WRAP
#!/usr/bin/env bash
args=()
for a in "\$@"; do
    if [ "\$a" = "-std=c++17" ] || [ "\$a" = "-std=c++14" ]; then a="-std=c++20"; fi
    args+=("\$a")
done
exec "$REAL_CXX" "\${args[@]}"
WRAP
    chmod +x "$WORK/cxx20"
    log "building mmcv $MMCV_VERSION wheel with ops (MAX_JOBS=$MAX_JOBS); this takes 15+ minutes"
    start=$(date +%s)
    CXX="$WORK/cxx20" CC="${CC:-cc}" MMCV_WITH_OPS=1 MAX_JOBS="$MAX_JOBS" \
        "$PY" -m pip wheel --no-build-isolation --no-deps --no-binary mmcv \
        -w "$WORK/dist" "mmcv==$MMCV_VERSION"
    built="$(ls "$WORK"/dist/mmcv-"$MMCV_VERSION"-*.whl | head -n 1)"
    cp "$built" "$CACHE/"
    WHEEL="$CACHE/$(basename "$built")"
    log "built $WHEEL in $(( $(date +%s) - start )) s"
fi

log "installing $WHEEL"
"$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL"
log "installing mmsegmentation==$MMSEG_VERSION"
"$PY" -m pip install -q --no-deps "mmsegmentation==$MMSEG_VERSION"

if already_ok; then
    log "done: mmseg $MMSEG_VERSION with mmcv $MMCV_VERSION ops in $VENV"
else
    echo "mmseg-setup: install finished but 'import mmseg; from mmcv.ops import nms' fails" >&2
    "$PY" -c "import mmseg; from mmcv.ops import nms" || true
    exit 1
fi
}

main "$@"
exit $?
