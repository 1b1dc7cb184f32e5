# SPDX-License-Identifier: MIT
"""The apps the nodes advertise, app by app: what ``fireap_info`` reports with ``view: apps``.

Controller side. Every node's handler advertises the apps of its task config in
``<prefix>.apps/<node>`` (``_kv.NodeAdvert``): each app's ``max_semaphores`` and filters,
the settings a release is targeted and sized by. Commands, timeouts and the failure policy
stay in the node's task config (``fireap-reap --list`` shows them there): commands may hold
credentials and have no size bound, and no release decision depends on the others.

Adverts are values read from KV, hence hostile: ``read_adverts`` validates each one by
NodeAdvert's reader (at most ADVERT_APPS_MAX apps, names and regexps by ``_validation``'s
rules) and an unreadable one becomes a warning. The view lists at most APPS_MAX apps, so a
flood of adverts of made-up apps cannot grow it past what one advert may hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ansible_collections.fireap.consul.plugins.module_utils._firing import read_adverts
from ansible_collections.fireap.consul.plugins.module_utils._kv import ADVERT_APPS_MAX, AppAdvert, NodeAdvert, Schema
from ansible_collections.fireap.consul.plugins.module_utils._validation import check_name

#: Most apps the view lists (by name); the others are counted in a warning.
APPS_MAX = ADVERT_APPS_MAX


def apps_view(client, schema: Schema, app: str | None = None) -> dict[str, Any]:
    """Read every node's advert and the catalog's nodes (two requests); see :func:`group_adverts`."""
    adverts, warnings = read_adverts(client, schema)
    _index, catalog = client.catalog.nodes()
    members = [entry.get("Node") for entry in catalog or () if isinstance(entry, dict)]
    return group_adverts(adverts, members, app, warnings)


def _members(names: Iterable[Any]) -> set[str]:
    """The catalog's node names that can be fireap nodes (a name unfit for KV keys has no advert)."""
    members = set()
    for name in names:
        try:
            members.add(check_name(name, "node"))
        except ValueError:
            continue
    return members


def group_adverts(adverts: Mapping[str, NodeAdvert], catalog: Iterable[Any], app: str | None = None,
                  warnings: Iterable[str] = ()) -> dict[str, Any]:
    """The view of ``adverts`` (node -> advert), only of ``app`` when given.

    ``apps``: app -> ``nodes`` (the catalog's nodes that advertise it, sorted), ``fanout``
    (the smallest max_semaphores among them: the fan-out of a release to all of them, as
    fireap_fire sizes it; None without such a node), ``settings`` (each distinct advert of
    the app with its nodes, most nodes first) and ``absent_nodes`` (nodes whose advert is
    still in KV but which the catalog no longer lists: a release leaves them out).
    ``nodes_without_apps``: the catalog's nodes that advertise no app. ``warnings``: the
    unreadable adverts and the apps left out beyond APPS_MAX.
    """
    members = _members(catalog)
    found: dict[str, dict[AppAdvert, list[str]]] = {}
    absent: dict[str, list[str]] = {}
    for node in sorted(adverts):
        for name, advert in adverts[node].apps.items():
            if app is not None and name != app:
                continue
            if node in members:
                found.setdefault(name, {}).setdefault(advert, []).append(node)
            else:
                absent.setdefault(name, []).append(node)
    names = sorted(set(found) | set(absent))
    shown = names[:APPS_MAX]
    warnings = list(warnings)
    if len(names) > len(shown):
        warnings.append(f"the nodes advertise {len(names)} apps; listed are the first {APPS_MAX} by name")
    apps = {}
    for name in shown:
        groups = sorted(found.get(name, {}).items(), key=lambda item: (-len(item[1]), item[1]))
        apps[name] = {
            "nodes": sorted(node for _advert, nodes in groups for node in nodes),
            "fanout": min((advert.max_semaphores for advert, _nodes in groups), default=None),
            "settings": [dict(advert.to_dict(), nodes=nodes) for advert, nodes in groups],
            "absent_nodes": absent.get(name, []),
        }
    without = sorted(node for node in members if node not in adverts or not adverts[node].apps)
    return {"apps": apps, "nodes_without_apps": without, "warnings": warnings}
