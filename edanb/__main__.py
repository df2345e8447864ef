"`python -m edanb ...` (also under `torchrun -m edanb train ...`): the `edanb` command line."
import sys

from edanb.cli import main

if __name__ == "__main__": sys.exit(main())
