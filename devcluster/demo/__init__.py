"""The end-to-end release demo (`python -m devcluster demo`, run.py): the project's playbooks
(playbooks.py) install fireap on a dev cluster and release a build (builds.py) across it.

Importing the room makes ``ansible_collections.fireap.consul`` importable from the checkout
(run.py checks the fan-out by the collection's own rule).
"""

from .. import collection_path  # noqa: F401
