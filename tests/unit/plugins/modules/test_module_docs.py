"""Each module's DOCUMENTATION, EXAMPLES and RETURN agree with its argument spec and parse."""

from __future__ import annotations

import pytest
import yaml

from ansible_collections.fireap.consul.plugins.doc_fragments.connection import ModuleDocFragment
from ansible_collections.fireap.consul.plugins.modules import fireap_clear, fireap_fire, fireap_info

MODULES = [fireap_fire, fireap_info, fireap_clear]
FRAGMENT = yaml.safe_load(ModuleDocFragment.DOCUMENTATION)


def documented_options(module) -> dict:
    doc = yaml.safe_load(module.DOCUMENTATION)
    assert doc["extends_documentation_fragment"] == ["fireap.consul.connection"]
    return dict(FRAGMENT["options"], **doc["options"])


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_documentation_matches_the_argument_spec(module):
    doc = yaml.safe_load(module.DOCUMENTATION)
    assert doc["module"] == module.__name__.rsplit(".", 1)[-1]
    assert set(doc["attributes"]) == {"check_mode", "diff_mode"}
    options = documented_options(module)
    assert set(options) == set(module.ARGUMENT_SPEC)
    for name, spec in module.ARGUMENT_SPEC.items():
        documented = options[name]
        assert documented["type"] == spec["type"], name
        assert documented.get("default") == spec.get("default"), name
        assert documented.get("required", False) == spec.get("required", False), name
        assert documented.get("choices") == spec.get("choices"), name
        assert documented["description"], name


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_examples_use_only_documented_options(module):
    name = "fireap.consul." + module.__name__.rsplit(".", 1)[-1]
    tasks = yaml.safe_load(module.EXAMPLES)
    used = [task[name] for task in tasks if name in task]
    assert used, f"no example calls {name}"
    for args in used:
        assert set(args) <= set(module.ARGUMENT_SPEC), set(args) - set(module.ARGUMENT_SPEC)
        assert "app" in args


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_return_value_is_described(module):
    returned = yaml.safe_load(module.RETURN)
    for key, value in returned.items():
        assert {"description", "returned", "type"} <= set(value), key
