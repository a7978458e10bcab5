"""`python -m jaxaccel ...` is the `jaxaccel` command."""
import sys

from jaxaccel.cli import main

sys.exit(main())
