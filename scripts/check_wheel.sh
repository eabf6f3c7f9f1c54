#!/usr/bin/env bash
# Packaging check (CI runs it after the tests): builds a real wheel of lora_ext, installs it into a
# separate, fresh virtual environment and checks, from a folder outside the source tree, that
#   - the wheel holds exactly the Python modules of lora_ext/ in the source tree (so a subpackage
#     left out of the packaging fails here), and its compiled module;
#   - every module imports, the native module loads from the new environment (not the source
#     tree), and a native op gives the reference's result;
#   - the `lora-ext` command works;
#   - the wheel is tagged for this CPython (cpXY-cpXY-<platform>), not abi3.
#
# It needs the .venv made by scripts/setup.sh: the wheel is built with that python and without
# build isolation (the extension must compile against the torch already installed), and the new
# environment reuses .venv's torch, numpy, safetensors, transformers and peft through a .pth file
# instead of installing them again (minutes and gigabytes).
#
# To keep CI time down the wheel is built with the CPU kernels only (LORA_EXT_BUILD_CUDA=0, also
# when the caller exported LORA_EXT_BUILD_CUDA=1, as .ci/run does): packaging does not depend on the
# CUDA kernels, which the test run already builds. `--cuda` (or CHECK_WHEEL_CUDA=1) builds the
# CUDA kernels too and requires them.
#
# Usage: scripts/check_wheel.sh [--cuda] [--keep]
#   --keep (or CHECK_WHEEL_KEEP=1) leaves the temporary folder in place for inspection.
# The build copies the sources (tracked and untracked, not ignored files) into a temporary folder,
# so the working tree (build/, *.egg-info, csrc/generated_build_info.h) is left untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)

CUDA=${CHECK_WHEEL_CUDA:-0}
KEEP=${CHECK_WHEEL_KEEP:-0}
for arg in "$@"; do
  case "$arg" in
    --cuda) CUDA=1 ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "check_wheel: unknown argument '$arg' (use --cuda, --keep)" >&2; exit 2 ;;
  esac
done

STEP="starting"
fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "check_wheel: FAILED (exit $rc) during: $STEP" >&2; fi' EXIT

PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || fail "$PY not found: run ./scripts/setup.sh first"
"$PY" -c "import torch, setuptools, wheel" 2>/dev/null \
  || fail ".venv lacks torch, setuptools or wheel, needed to build without build isolation"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/lora_ext_check_wheel.XXXXXX")
cleanup() {
  local rc=$?
  if [ "$KEEP" = "1" ]; then
    echo "check_wheel: kept $TMP"
  else
    rm -rf "$TMP"
  fi
  if [ $rc -ne 0 ]; then echo "check_wheel: FAILED (exit $rc) during: $STEP" >&2; fi
}
trap cleanup EXIT
case "$TMP/" in "$ROOT"/*) fail "temporary folder $TMP is inside the source tree" ;; esac

# 1. The sources: what a checkout holds (tracked and untracked files, not ignored ones).
STEP="copying the sources"
mkdir -p "$TMP/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | (cd "$ROOT" && xargs -0 -r sh -c 'for f; do if [ -e "$f" ]; then printf "%s\0" "$f"; fi; done' _) \
    | tar -C "$ROOT" --null -T - -cf - | tar -C "$TMP/src" -xf -
else  # not a git checkout (an unpacked source archive): everything but build outputs
  tar -C "$ROOT" --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
    --exclude='*.so' --exclude=__pycache__ -cf - . | tar -C "$TMP/src" -xf -
fi
(cd "$TMP/src" && find lora_ext -name '*.py' | LC_ALL=C sort) > "$TMP/source_modules.txt"
[ -s "$TMP/source_modules.txt" ] || fail "no lora_ext/*.py files in the copied sources"

# 2. The wheel, built against .venv's torch.
if [ "$CUDA" = "1" ]; then BUILD_CUDA=1; WHAT="CPU and CUDA kernels"; else BUILD_CUDA=0; WHAT="CPU kernels only"; fi
STEP="building the wheel ($WHAT)"
echo "check_wheel: building the wheel ($WHAT; MAX_JOBS=${MAX_JOBS:-default})"
mkdir -p "$TMP/wheelhouse"
BUILD_START=$SECONDS
if ! LORA_EXT_BUILD_CUDA=$BUILD_CUDA "$PY" -m pip wheel --no-build-isolation --no-deps \
      -w "$TMP/wheelhouse" "$TMP/src" >"$TMP/build.log" 2>&1; then
  tail -n 40 "$TMP/build.log" >&2
  fail "pip wheel failed (last lines above)"
fi
shopt -s nullglob
WHEELS=("$TMP"/wheelhouse/lora_ext-*.whl)
shopt -u nullglob
[ ${#WHEELS[@]} -eq 1 ] || fail "expected one lora_ext wheel in $TMP/wheelhouse, found ${#WHEELS[@]}"
WHEEL=${WHEELS[0]}
echo "check_wheel: built $(basename "$WHEEL") in $((SECONDS - BUILD_START)) s"

# 3. The wheel's tag: this interpreter's cpXY-cpXY, never abi3 (setup.py does not build the module
#    for the limited API, and it only runs with the torch it was built against anyway).
STEP="checking the wheel's tag"
EXPECTED_TAG=$("$PY" -c 'import sys; v = "cp%d%d" % sys.version_info[:2]; print(v + "-" + v)')
NAME=$(basename "$WHEEL" .whl)
case "$NAME" in
  *-abi3-*) fail "wheel $NAME is tagged abi3" ;;
  *-"$EXPECTED_TAG"-linux_*|*-"$EXPECTED_TAG"-manylinux*) ;;
  *) fail "wheel $NAME is not tagged $EXPECTED_TAG-<linux platform>" ;;
esac

# 4. A fresh environment; .venv's third-party packages (not its lora_ext, pip or .pth files)
#    reach it through links in one folder named by a .pth file.
STEP="making the fresh environment"
"$PY" -m venv "$TMP/venv"
VPY="$TMP/venv/bin/python"
VSITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
SRC_SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$TMP/deps"
for entry in "$SRC_SITE"/*; do
  base=$(basename "$entry")
  case "$base" in
    lora_ext|lora_ext-*|lora_ext.*|__editable__*|*lora_ext*finder*|pip|pip-*|*.pth|__pycache__) continue ;;
  esac
  ln -s "$entry" "$TMP/deps/$base"
done
echo "$TMP/deps" > "$VSITE/zz_check_wheel_deps.pth"

STEP="installing the wheel"
"$VPY" -m pip install -q --no-deps --no-index --disable-pip-version-check "$WHEEL" \
  || fail "pip install of $(basename "$WHEEL") into the fresh environment failed"

# 5. From a folder outside the source tree, with nothing of the source tree on the path.
STEP="importing and checking the installed package"
mkdir -p "$TMP/run"
cd "$TMP/run"
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP
export PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
EXPECT_CUDA=$BUILD_CUDA "$VPY" - "$TMP/venv" "$WHEEL" "$TMP/source_modules.txt" "$ROOT" <<'EOF'
import importlib, os, pkgutil, sys, traceback, zipfile

venv, wheel, source_list, root = sys.argv[1:]
venv, root = os.path.realpath(venv), os.path.realpath(root)
problems = []


def module_name(path):  # lora_ext/a/b.py -> lora_ext.a.b, lora_ext/a/__init__.py -> lora_ext.a
    parts = path[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def inside(path, folder):
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


source = {module_name(p) for p in open(source_list).read().split()}
names = zipfile.ZipFile(wheel).namelist()
in_wheel = {module_name(n) for n in names if n.startswith("lora_ext/") and n.endswith(".py")}
if in_wheel != source:
    problems.append(f"the wheel's modules differ from the source tree's: missing from the wheel "
                    f"{sorted(source - in_wheel)}, only in the wheel {sorted(in_wheel - source)}")
native_files = [n for n in names if n.startswith("lora_ext/_C.") and n.endswith(".so")]
if len(native_files) != 1:
    problems.append(f"expected one compiled module lora_ext/_C.*.so in the wheel, found {native_files}")


def finish():
    if problems:
        print("check_wheel: FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)


try:
    import lora_ext
except Exception:
    problems.append(f"import lora_ext failed:\n{traceback.format_exc()}")
    finish()

if not inside(lora_ext.__file__, venv):
    problems.append(f"lora_ext imported from {lora_ext.__file__}, not from the fresh environment {venv}")
# transformers and peft are optional (extras): the package must import without them
import subprocess
bare = subprocess.run([sys.executable, "-c", "import sys; sys.modules['transformers'] = sys.modules['peft'] = None; "
                       "import lora_ext, lora_ext.ops, lora_ext.adapters"], capture_output=True, text=True)
if bare.returncode != 0:
    problems.append(f"import lora_ext needs transformers or peft, which are optional:\n{bare.stderr}")
if inside(lora_ext.__file__, root):
    problems.append(f"lora_ext imported from the source tree: {lora_ext.__file__}")

walk_errors = []
found = {"lora_ext"}
for info in pkgutil.walk_packages(lora_ext.__path__, "lora_ext.", onerror=walk_errors.append):
    found.add(info.name)
    if info.name == "lora_ext.__main__":  # runs the command on import; checked as `python -m`
        continue
    try:
        importlib.import_module(info.name)
    except Exception:
        problems.append(f"import {info.name} failed:\n{traceback.format_exc()}")
if walk_errors:
    problems.append(f"walking the package failed in {walk_errors}")
python_modules = found - {"lora_ext._C"}
if python_modules != source:
    problems.append(f"installed modules differ from the source tree's: missing "
                    f"{sorted(source - python_modules)}, extra {sorted(python_modules - source)}")

if not lora_ext.native_available():
    problems.append(f"the native module did not load: {lora_ext.native_error()}")
else:
    import lora_ext._C as native
    if not inside(native.__file__, venv):
        problems.append(f"lora_ext._C loaded from {native.__file__}, not from the fresh environment")
    info = lora_ext.build_info()
    want = ["CPU", "CUDA"] if os.environ.get("EXPECT_CUDA") == "1" else ["CPU"]
    if info["backends"] != want:
        problems.append(f"build_info() backends {info['backends']}, expected {want}: {info}")
    import torch
    from lora_ext.reference import lora_delta_ref
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 24, generator=g)
    a = torch.randn(3, 4, 24, generator=g)
    b = torch.randn(3, 16, 4, generator=g)
    ids = torch.tensor([0, -1, 2, 1, 0])
    got = torch.ops.lora_ext.lora_delta(x, a, b, ids, None, None, None)
    if not torch.allclose(got, lora_delta_ref(x, a, b, ids), rtol=1e-4, atol=1e-4):
        problems.append("torch.ops.lora_ext.lora_delta differs from the reference")
    print(f"check_wheel: lora_ext {lora_ext.__file__}, build {info['build']!r}")

finish()
print(f"check_wheel: {len(python_modules)} modules in the wheel match the source tree and import")
EOF

STEP="running the lora-ext command"
[ -x "$TMP/venv/bin/lora-ext" ] || fail "the wheel installed no lora-ext command"
"$TMP/venv/bin/lora-ext" --help >"$TMP/help.txt" 2>&1 || { cat "$TMP/help.txt" >&2; fail "lora-ext --help failed"; }
grep -q "inspect" "$TMP/help.txt" || { cat "$TMP/help.txt" >&2; fail "lora-ext --help does not list its commands"; }
"$VPY" -m lora_ext --help >"$TMP/help_m.txt" 2>&1 || { cat "$TMP/help_m.txt" >&2; fail "python -m lora_ext --help failed"; }

STEP="done"
echo "check_wheel: OK: $(basename "$WHEEL") ($SECONDS s in all)"
