"""`python -m mmqa <tool> [args]`: the command-line tools of `mmqa.cli`."""

import sys

from mmqa.cli import main

sys.exit(main())
