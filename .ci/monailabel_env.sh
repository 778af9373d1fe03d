#!/usr/bin/env bash
# Build, once, a virtual environment holding MONAI Label 0.8.5 and print its path on the last line.
#
# The environment deliberately does NOT contain anatomask_components: it is where bundle archives made by
# `anatomask export-bundle` are served, to prove that they run on their own. It is cached under
# ${ANATOMASK_CACHE:-~/.cache/anatomask}/monailabel-venv-<key>, where <key> hashes the Python version and
# the requirements below; a marker file written after a successful build and import check makes later
# calls return at once. A build that did not finish leaves no marker and is redone from scratch.
#
# Usage: .ci/monailabel_env.sh            build if needed, print the environment's path
#        .ci/monailabel_env.sh --check    print the path if the cached environment is ready, else exit 1
# Environment: MONAILABEL_ENV_PYTHON (interpreter for the venv, default python3),
#              MONAILABEL_ENV_DIR (use this folder instead of the keyed cache folder),
#              ANATOMASK_CACHE (cache root).
#
# Why these pins (see docs/monailabel.md):
# - monailabel 0.8.5 needs numpy<2 and fails to import with pydicom 3; this set works:
#   pydicom==2.4.4 pynetdicom==2.0.2 dicomweb-client==0.59.1.
# - monailabel.tasks.infer.bundle imports torchvision.utils, and torchvision's compiled ops must come
#   from the same build as torch. The main environment's torch 2.13.0+cpu has no matching CPU torchvision
#   on the package index (torchvision 0.28.0 there is a CUDA build: with the CPU torch, `import torchvision`
#   fails with "RuntimeError: operator torchvision::nms does not exist"), so borrowing the main
#   environment's site-packages through a .pth does not work; this environment installs its own matching
#   pair, torch 2.14.1 + torchvision 0.29.1 (CUDA builds that also run on CPU; about 7.7 GB on disk,
#   installed from local wheel files on the project's machines). It also keeps the main environment's
#   numpy 2 and anatomask_components out of this one.
# - monailabel is installed without its dependency list, which pulls sam2 and monai extras (mlflow,
#   openslide, lmdb, gdown, ...) that serving a bundle does not use; what the server, the monaibundle app
#   and the bundle infer/train tasks import is listed here instead (itk: its label writer; scikit-image:
#   its post transforms).
set -euo pipefail

MODE=${1:-build}
PYTHON=${MONAILABEL_ENV_PYTHON:-python3}

TORCH_REQUIREMENTS="torch==2.14.1 torchvision==0.29.1"
MONAILABEL_REQUIREMENT="monailabel==0.8.5"
REQUIREMENTS="
numpy<2
pydicom==2.4.4
pynetdicom==2.0.2
dicomweb-client==0.59.1
monai==1.6.1
pytorch-ignite==0.5.5
nibabel>=5
SimpleITK>=2.2
scipy
einops>=0.7
fire
pillow
psutil
tqdm
tensorboard
uvicorn>=0.29.0
pydantic>=2.7.0
pydantic-settings>=2.2.1
python-dotenv>=1.0.1
fastapi>=0.110.2
python-multipart>=0.0.9
httpx>=0.27.0
schedule>=1.2.1
timeloop>=1.0.2
expiringdict>=1.2.2
expiring_dict>=1.1.0
cachetools>=5.3.3
watchdog>=4.0.0
pydicom-seg>=0.4.1
pynrrd>=1.0.0
girder-client>=3.2.3
pyyaml>=6.0.1
filelock>=3.11.0
passlib>=1.7.4
pyjwt>=2.8.0
bcrypt>=4.1.2
shapely>=2.0.4
requests>=2.31.0
requests-toolbelt>=1.0.0
urllib3>=2.2.1
scikit-learn
google-auth>=2.29.0
itk>=5.3
scikit-image
"

py_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$(printf '%s\n%s\n%s\n%s\n' "$py_version" "$TORCH_REQUIREMENTS" "$MONAILABEL_REQUIREMENT" "$REQUIREMENTS" \
    | sha256sum | cut -c1-12)
cache_root=${ANATOMASK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/anatomask}
env_dir=${MONAILABEL_ENV_DIR:-$cache_root/monailabel-venv-$key}
marker=$env_dir/.anatomask-monailabel-ready

if [ -f "$marker" ]; then
    echo "$env_dir"
    exit 0
fi
if [ "$MODE" = "--check" ]; then
    echo "no ready MONAI Label environment at $env_dir" >&2
    exit 1
fi

mkdir -p "$(dirname "$env_dir")"
# one build at a time (parallel test runs wait for the first)
exec 9>"$env_dir.lock"
flock 9
if [ -f "$marker" ]; then
    echo "$env_dir"
    exit 0
fi

start=$(date +%s)
echo "building the MONAI Label environment in $env_dir" >&2
rm -rf "$env_dir"
"$PYTHON" -m venv "$env_dir"
pip_log=$(mktemp)
trap 'rm -f "$pip_log"' EXIT
pip() {
    # the machine's extra local indexes warn about every package they lack: keep the rest of pip's output
    local status=0
    "$env_dir/bin/python" -m pip --disable-pip-version-check "$@" >"$pip_log" 2>&1 || status=$?
    grep -v "is ignored: it is neither a file nor a directory" "$pip_log" >&2 || true
    return "$status"
}
pip install -q --upgrade pip
# shellcheck disable=SC2086
pip install -q $TORCH_REQUIREMENTS
pip install -q --no-deps "$MONAILABEL_REQUIREMENT"
# keep torch and torchvision as installed above while resolving the rest
constraints=$env_dir/torch-constraints.txt
"$env_dir/bin/python" -m pip freeze | grep -i -E '^(torch|torchvision)==' >"$constraints"
# shellcheck disable=SC2086
pip install -q -c "$constraints" $REQUIREMENTS
echo "(pip's 'monailabel requires ninja / numpymaxflow / sam2' complaint is expected: left out on purpose)" >&2

# check from a neutral folder: MONAI Label's bundle tasks import, anatomask_components does not
(cd / && "$env_dir/bin/python" - <<'PY' >&2
import importlib.util
import sys

import monai
import monailabel
import monailabel.tasks.infer.bundle  # noqa: F401  (imports torchvision.utils)
import monailabel.tasks.train.bundle  # noqa: F401
import numpy
import pydicom
import torch
import torchvision

if importlib.util.find_spec("anatomask_components") is not None:
    sys.exit("anatomask_components must not be importable in the MONAI Label environment")
print(
    f"monailabel {monailabel.__version__}, monai {monai.__version__}, torch {torch.__version__}, "
    f"torchvision {torchvision.__version__}, numpy {numpy.__version__}, pydicom {pydicom.__version__}"
)
PY
)
(cd / && "$env_dir/bin/python" -m monailabel.main --help >/dev/null)
echo "built in $(($(date +%s) - start)) s" >&2
touch "$marker"
echo "$env_dir"
