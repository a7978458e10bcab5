"""`python -m jaxaccel ...` is the `jaxaccel` command. Imports only `jaxaccel.cli`."""
import sys

from jaxaccel.cli import main

sys.exit(main())
