"""python -m rz_kernels build: compile this machine's C++ CPU kernel variants into rz_kernels/lib/."""

import argparse
import sys

from rz_kernels.build import main

parser = argparse.ArgumentParser(prog="python -m rz_kernels", description=__doc__)
parser.add_argument("command", choices=["build"], help="build: compile the CPU kernels (a checkout's one-line rebuild)")
parser.parse_args()
sys.exit(main())
