#!/usr/bin/env bash
# The package as a user gets it: build the sdist and, from it, the wheel (python -m build), check that
# every data file under shardlib/ is in the wheel, install the wheel into a fresh virtual environment
# and run examples/ there, from a folder that holds nothing of the checkout but a copy of examples/
# (so an import of tests/, of the checkout's files or of a file the wheel lacks fails).
# Usage: .ci/wheel_check.sh [PYTHON] (default .venv/bin/python, which must have `build`); EXAMPLES="a b" to choose ("": none).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
EXAMPLES=${EXAMPLES-"foreign_models linen_fsdp_tp linen_pipeline nnx_moe nnx_moe_pipeline"}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/shardlib-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# From a copy of the files git tracks or would add (not ignored): a stale shardlib.egg-info/SOURCES.txt or
# build/ in the checkout would put files into the sdist that the package's own declarations leave out.
PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"  # absolute, its venv kept
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard | tar --null --files-from=- -cf - | tar -xf - -C "$WORK/src"
"$PYTHON" -m build --outdir "$WORK/dist" "$WORK/src" > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
ls "$WORK"/dist
echo "built in $SECONDS s"
WHEEL=$(ls "$WORK"/dist/*.whl)

# Every tracked non-Python file of the package (hardware profiles ...) must be in the wheel.
git ls-files shardlib | grep -v '\.py$' | "$PYTHON" -c '
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
missing = [f for f in sys.stdin.read().split() if f not in names]
sys.exit(f"the wheel lacks {missing}: add them to [tool.setuptools.package-data]" if missing else 0)' "$WHEEL"

"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet "$WHEEL" > "$WORK/install.log" 2>&1 || { cat "$WORK/install.log"; exit 1; }
echo "installed into a fresh virtual environment at $SECONDS s"
mkdir -p "$WORK/run/examples" && cp examples/*.py "$WORK/run/examples/"
cd "$WORK/run"
# -E -s: no PYTHONPATH, no user site; the folder holds only examples/, so shardlib is the wheel's.
"$WORK/venv/bin/python" -E -s -c '
import pathlib, shardlib, sys
where = pathlib.Path(shardlib.__file__).resolve()
assert pathlib.Path(sys.prefix).resolve() in where.parents, f"shardlib imported from {where}, not the wheel"
print(f"shardlib {shardlib.__version__} from {where.parent}")'
for example in $EXAMPLES; do
    echo "== examples/$example.py"
    "$WORK/venv/bin/python" -E -s -m "examples.$example"
    echo "== examples/$example.py ran; $SECONDS s so far"
done
