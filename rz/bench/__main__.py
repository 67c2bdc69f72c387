import sys

from rz.bench.cli import main

sys.exit(main())
