#!/bin/bash
# Prepares an emulated aarch64 Python with jax/jaxlib on an x86-64 Debian machine, for
# tests/kernels/test_neon_emulated.py (NEON kernels and their run-time dispatch without ARM hardware).
# Needs apt (as root) for its three packages once; no binfmt_misc, chroot or other privileges.
# About 1.5 min and 1.3 GB from scratch; a second run reuses DIR.
#   usage: PYTHON=.venv/bin/python .ci/aarch64-emulation.sh DIR     then: RZ_AARCH64_EMULATION=DIR pytest ...
# PYTHON is the host's interpreter whose jax version the emulated one gets, and whose pip fetches
# the aarch64 wheels (default python3).
# What DIR holds:
#   rootfs/   a minimal arm64 Debian userland (python3.11, libstdc++), unpacked only: no maintainer
#             script runs, so nothing is emulated while it is made. qemu-aarch64-static reads it
#             through QEMU_LD_PREFIX.
#   venv/     an aarch64 virtual environment whose site-packages the host's pip fills.
# The tests run DIR/venv/bin/python under qemu-aarch64-static with QEMU_CPU set per check
# (max,sve=off: dotprod and i8mm, no SVE; neoverse-n1: dotprod; cortex-a72: neither), and the
# cross compiler aarch64-linux-gnu-g++ as CXX: an emulated process that runs a compiler runs the
# host's (x86-64) binary natively.
set -euo pipefail
DIR=$(realpath -m "${1:?usage: aarch64-emulation.sh DIR}")
PYTHON=${PYTHON:-python3}
JAX_VERSION=$("$PYTHON" -c 'import jax; print(jax.__version__)')
mkdir -p "$DIR"
export DEBIAN_FRONTEND=noninteractive
if ! command -v qemu-aarch64-static >/dev/null || ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v mmdebstrap >/dev/null; then
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends g++-aarch64-linux-gnu qemu-user-static mmdebstrap arch-test >/dev/null
fi
# mmdebstrap takes the mirror from this machine's apt sources.
[[ -x $DIR/rootfs/usr/bin/python3.11 ]] || mmdebstrap --quiet --arch=arm64 --variant=extract \
    --include=python3.11,libstdc++6,ca-certificates bookworm "$DIR/rootfs" </dev/null
export QEMU_LD_PREFIX="$DIR/rootfs" QEMU_CPU="max,sve=off"
[[ -x $DIR/venv/bin/python ]] || qemu-aarch64-static "$DIR/rootfs/usr/bin/python3.11" -m venv --without-pip "$DIR/venv"
# jaxlib >= 0.8 ships manylinux_2_27 aarch64 wheels only, and older pips do not widen manylinux
# tags: name them explicitly.
[[ -e $DIR/venv/.jax-$JAX_VERSION ]] || "$PYTHON" -m pip install -q --no-deps --target "$DIR/venv/lib/python3.11/site-packages" --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 \
    --platform manylinux_2_27_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    "jax==$JAX_VERSION" "jaxlib==$JAX_VERSION" numpy ml_dtypes opt_einsum scipy
touch "$DIR/venv/.jax-$JAX_VERSION"
echo "aarch64 emulation ready in $DIR (jax $JAX_VERSION)"
