"""python -m rz_kernels build: compile a machine's C++ CPU kernel variants (default: this one's, into rz_kernels/lib/)."""

import argparse
import sys
from pathlib import Path

from rz_kernels.build import main

parser = argparse.ArgumentParser(prog="python -m rz_kernels", description=__doc__)
parser.add_argument("command", choices=["build"], help="build: compile the CPU kernels (a checkout's one-line rebuild)")
parser.add_argument("--machine", help="the target machine's variants (x86_64, aarch64; default: this machine)")
parser.add_argument("--cxx", help="the C++ compiler (default: $CXX, else c++, g++ or clang++); a cross compiler for --machine")
parser.add_argument("--output", type=Path, help="the directory for the libraries (default: rz_kernels/lib/)")
args = parser.parse_args()
sys.exit(main(args.machine, args.cxx, args.output))
