"""The collection's workshop: a Consul double and the tools that run releases against it.

Rooms (see README.md): ``consul`` the double itself (DevCluster runs it in this process,
ServeProcess as ``python -m devcluster serve``), ``demo`` the end-to-end release demo,
``bench`` the benchmark, ``chaos`` the fault-injection suite. ``polling`` and
``collection_path`` serve several rooms. Nothing in the collection imports this package.
"""

from pathlib import Path

#: The checkout this package lives in (the collection's root).
REPO_ROOT = Path(__file__).resolve().parent.parent
