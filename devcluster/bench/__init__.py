"""The benchmark (`python -m devcluster bench`, cli.py): how long a release takes against the
ideal and push baselines.

double.py   the double a benchmark runs against (in this process or as a child) and the leader's client
core.py     what one run measured and the figures derived from it (no I/O)
inproc.py   the in-process mode: every node's real pull as a greenlet of a worker process
client.py   the nodes' py-consul clients over a lean keep-alive transport (inproc mode)
process.py  the process mode: the real node side installed by Ansible, real rsync transfers
baselines.py  the push baselines: ansible-playbook and GNU parallel
plot.py     the plots of a set of records

Its modules drive the collection's own code: importing the room makes
``ansible_collections.fireap.consul`` importable from the checkout.
"""

from .. import collection_path  # noqa: F401
