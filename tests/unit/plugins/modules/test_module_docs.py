"""Each module's documentation, with its fragments, agrees with its argument spec and parses.

These tests run where modules run (ansible-test gives them ansible.module_utils only), so the
fragments are merged here as ansible-doc merges them: what the module itself says wins.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from ansible_collections.fireap.consul.plugins.module_utils._connection import CONNECTION_ARGUMENT_SPEC
from ansible_collections.fireap.consul.plugins.module_utils._module import APP_ARGUMENT_SPEC, fireap_argument_spec
from ansible_collections.fireap.consul.plugins.modules import fireap_clear, fireap_fire, fireap_info, fireap_wait

COLLECTION = "fireap.consul"
ROOT = Path(__file__).resolve().parents[4]
ACTION_GROUP = yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text(encoding="utf-8"))["action_groups"]["consul"]

MODULES = [fireap_fire, fireap_info, fireap_clear, fireap_wait]
#: fireap_wait's argument spec belongs to its action plugin, which needs the controller.
SPEC_MODULES = [fireap_fire, fireap_info, fireap_clear]
#: The fragments every module extends, in this order.
SHARED_FRAGMENTS = [
    f"{COLLECTION}.connection",
    f"{COLLECTION}.app",
    f"{COLLECTION}.attributes",
    f"{COLLECTION}.attributes.action_group",
]


def short_name(module) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def load_fragment(name: str) -> dict:
    """``fireap.consul.FILE`` (its DOCUMENTATION) or ``fireap.consul.FILE.VARIABLE``, parsed."""
    assert name.startswith(f"{COLLECTION}."), name
    file, *variable = name[len(COLLECTION) + 1:].split(".")
    fragment = importlib.import_module(f"ansible_collections.fireap.consul.plugins.doc_fragments.{file}").ModuleDocFragment
    return yaml.safe_load(getattr(fragment, (variable[0] if variable else "documentation").upper()))


def resolved_doc(module) -> dict:
    """DOCUMENTATION with its fragments merged in."""
    doc = yaml.safe_load(module.DOCUMENTATION)
    for name in doc.pop("extends_documentation_fragment"):
        fragment = load_fragment(name)
        for section in ("options", "attributes"):
            merged = doc.setdefault(section, {})
            for key, value in (fragment.get(section) or {}).items():
                merged[key] = dict(value, **merged.get(key, {}))
    return doc


@pytest.mark.parametrize("module", MODULES, ids=short_name)
def test_every_module_extends_the_shared_fragments(module):
    own = yaml.safe_load(module.DOCUMENTATION)
    assert own["extends_documentation_fragment"] == SHARED_FRAGMENTS
    # What the fragments document is not documented again (fireap_wait's timeout is its own option).
    repeated = set(own.get("options", {})) & (set(CONNECTION_ARGUMENT_SPEC) | set(APP_ARGUMENT_SPEC))
    # fireap_info documents its own app: optional there, with view=apps.
    assert repeated <= ({"timeout"} if module is fireap_wait else {"app"} if module is fireap_info else set())
    assert "action_group" not in own["attributes"]
    for name in ("check_mode", "diff_mode"):
        assert "description" not in own["attributes"][name], name


@pytest.mark.parametrize("module", SPEC_MODULES, ids=short_name)
def test_documentation_matches_the_argument_spec(module):
    doc = resolved_doc(module)
    spec = module.ARGUMENT_SPEC
    assert doc["module"] == short_name(module)
    options = doc["options"]
    assert set(options) == set(spec)
    for name, option in spec.items():
        documented = options[name]
        assert documented["type"] == option["type"], name
        assert documented.get("default") == option.get("default"), name
        assert documented.get("required", False) == option.get("required", False), name
        assert documented.get("choices") == option.get("choices"), name
        assert documented["description"], name


@pytest.mark.parametrize("module", MODULES, ids=short_name)
def test_attributes_are_documented(module):
    attributes = resolved_doc(module)["attributes"]
    expected = {"check_mode", "diff_mode", "action_group"} | ({"action", "async"} if module is fireap_wait else set())
    assert set(attributes) == expected
    for name, attribute in attributes.items():
        assert attribute["description"], name
        assert attribute["support"] in ("full", "partial", "none", "N/A"), name


@pytest.mark.parametrize("module", MODULES, ids=short_name)
def test_action_group_membership_matches_meta_runtime(module):
    attribute = resolved_doc(module)["attributes"]["action_group"]
    assert short_name(module) in ACTION_GROUP
    assert (attribute["support"], attribute["membership"]) == ("full", [f"{COLLECTION}.consul"])


def test_every_member_of_the_action_group_is_documented():
    assert sorted(ACTION_GROUP) == sorted(short_name(module) for module in MODULES)


def test_the_shared_argument_spec():
    spec = fireap_argument_spec(extra={"type": "int"})
    assert list(spec) == [*CONNECTION_ARGUMENT_SPEC, *APP_ARGUMENT_SPEC, "extra"]
    assert spec["app"] == {"type": "str", "required": True}
    assert spec["kv_prefix"] == {"type": "str", "default": "fireap/"}
    spec["token"]["no_log"] = False
    assert CONNECTION_ARGUMENT_SPEC["token"]["no_log"] is True
    with pytest.raises(ValueError, match="kv_prefix, timeout"):
        fireap_argument_spec(timeout={"type": "float"}, kv_prefix={"type": "str"})


@pytest.mark.parametrize("module", MODULES, ids=short_name)
def test_examples_use_only_documented_options(module):
    name = f"{COLLECTION}.{short_name(module)}"
    documented = set(resolved_doc(module)["options"])
    tasks = yaml.safe_load(module.EXAMPLES)
    used = [task[name] for task in tasks if name in task]
    assert used, f"no example calls {name}"
    for args in used:
        assert set(args) <= documented, set(args) - documented
        assert "app" in args or args.get("view") == "apps"


@pytest.mark.parametrize("module", MODULES, ids=short_name)
def test_every_return_value_is_described(module):
    returned = yaml.safe_load(module.RETURN)
    for key, value in returned.items():
        assert {"description", "returned", "type"} <= set(value), key
