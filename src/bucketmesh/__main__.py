"""``python -m bucketmesh``: the ``bucketmesh`` command line."""

import sys

from bucketmesh.node.cli import main

sys.exit(main())
