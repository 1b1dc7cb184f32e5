"""The end-to-end release demo (`python -m devcluster demo`, run.py): the project's playbooks
(playbooks.py) install fireap on a dev cluster and release a build (builds.py) across it."""
