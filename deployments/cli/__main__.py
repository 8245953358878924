"""`python -m deployments.cli`, as the `textgen` script."""

import sys

from deployments.cli import main

sys.exit(main())
