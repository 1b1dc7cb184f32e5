"""Importing this module makes ``ansible_collections.fireap.consul`` importable from the checkout.

The benchmark and the chaos suite drive the collection's own code in-process (their rooms
import this module first); ``make setup`` links the checkout under
``build/ansible_collections/fireap/consul`` for that.
"""

import sys

from . import REPO_ROOT

COLLECTION_PARENT = REPO_ROOT / "build"

if not (COLLECTION_PARENT / "ansible_collections" / "fireap" / "consul").exists():
    raise ImportError(f"{COLLECTION_PARENT}/ansible_collections/fireap/consul is missing: run `make setup` first")
if str(COLLECTION_PARENT) not in sys.path:
    sys.path.insert(0, str(COLLECTION_PARENT))
