"""``python -m shardstore`` runs the command line."""

import sys

from shardstore.cli import main

sys.exit(main())
