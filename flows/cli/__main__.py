"""`python -m flows.cli ...`, what torchrun and the flows' child processes run: the `dpo` command."""

import sys

from flows.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
