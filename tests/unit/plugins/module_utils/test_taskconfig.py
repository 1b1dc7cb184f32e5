"""Task config: schema, defaults merge, filters and every validation error."""

import json
import re
import textwrap

import pytest
import yaml

from ansible_collections.fireap.consul.plugins.module_utils import _taskconfig
from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import (
    AppConfig,
    ConfigError,
    check_app_name,
    load_config,
    parse_config,
)

SOURCE = "/etc/fireap/config.yml"
CMD = "rsync -a {{ remote.address }}::apps/{{ app }}/ /opt/{{ app }}/"


def app_config(**settings):
    """A one-app config document with ``settings`` for app ``myapp``."""
    settings.setdefault("exec_commands", [CMD])
    return {"apps": {"myapp": settings}}


def error_of(data):
    with pytest.raises(ConfigError) as info:
        parse_config(data, source=SOURCE)
    return str(info.value)


def write(tmp_path, text):
    path = tmp_path / "config.yml"
    path.write_text(textwrap.dedent(text))
    return str(path)


# --- loading and the whole schema -------------------------------------------------

def test_load_full_config(tmp_path):
    path = write(tmp_path, """\
        consul:
          host: 10.0.0.5
          port: 8501
          scheme: https
          token: secret
        node_name: node-003
        kv_prefix: deploy/fireap
        state_dir: /srv/fireap/state
        log_file: /srv/fireap/reap.log
        defaults:
          max_semaphores: 3
          watch_timeout: 900
          command_timeout: 60
          on_command_failure: ignore
          before_commands: ["systemctl stop {{ app }}"]
          after_commands: ["systemctl start {{ app }}"]
        apps:
          myapp:
            exec_commands:
              - rsync -a --delete {{ remote.address }}::apps/{{ app }}/ /opt/{{ app }}/
          other:
            max_semaphores: 1
            on_command_failure: abort
            exec_commands: ["echo {{ version }} {{ node }} {{ remote.name }}"]
            service: api
        """)
    config = load_config(path)
    assert config.source == path
    assert config.consul == {"host": "10.0.0.5", "port": 8501, "scheme": "https",
                             "token": "secret"}
    assert config.node_name == "node-003"
    assert config.kv_prefix == "deploy/fireap/"
    assert config.state_dir == "/srv/fireap/state"
    assert config.log_file == "/srv/fireap/reap.log"
    assert list(config.apps) == ["myapp", "other"]
    assert config.app("myapp") == AppConfig(
        name="myapp", max_semaphores=3, watch_timeout=900,
        command_timeout=60, on_command_failure="ignore",
        before_commands=("systemctl stop {{ app }}",),
        exec_commands=("rsync -a --delete {{ remote.address }}::apps/{{ app }}/ "
                       "/opt/{{ app }}/",),
        after_commands=("systemctl start {{ app }}",),
        service_filter=None, tag_filter=None)
    other = config.app("other")
    assert (other.max_semaphores, other.on_command_failure) == (1, "abort")
    assert other.before_commands == ("systemctl stop {{ app }}",)
    assert other.service_filter == "^api$"


def test_builtin_defaults():
    config = parse_config(app_config(), source=SOURCE)
    assert config.consul == {}
    assert config.node_name is None
    assert config.kv_prefix == "fireap/"
    assert config.state_dir == "/var/lib/fireap"
    assert config.log_file == "/var/log/fireap/reap.log"
    app = config.app("myapp")
    assert (app.max_semaphores, app.watch_timeout,
            app.command_timeout, app.on_command_failure) == (5, 600, 300, "abort")
    assert (app.before_commands, app.after_commands) == ((), ())
    assert (app.service_filter, app.tag_filter) == (None, None)


def test_docstring_example_is_valid():
    block = _taskconfig.__doc__.split(".. code-block:: yaml")[1].split("\nRules:")[0]
    config = parse_config(yaml.safe_load(textwrap.dedent(block)))
    assert list(config.apps) == ["myapp"]
    assert config.consul == {"host": "127.0.0.1", "port": 8500}


def test_defaults_merge_app_overrides_and_inherits():
    config = parse_config({
        "defaults": {"max_semaphores": 2, "command_timeout": 10, "exec_commands": ["true"]},
        "apps": {"a": {"max_semaphores": 7}, "b": None, "c": {}},
    })
    assert config.app("a").max_semaphores == 7
    assert config.app("a").command_timeout == 10
    assert config.app("a").exec_commands == ("true",)
    assert config.app("b").max_semaphores == 2
    assert config.app("c").exec_commands == ("true",)


def test_app_commands_replace_default_commands():
    config = parse_config({"defaults": {"exec_commands": ["a"], "after_commands": ["z"]},
                           "apps": {"x": {"exec_commands": ["b"], "after_commands": []}}})
    assert config.app("x").exec_commands == ("b",)
    assert config.app("x").after_commands == ()


def test_null_sections_are_empty():
    config = parse_config({"consul": None, "defaults": {"exec_commands": ["true"]},
                           "apps": {"myapp": None}})
    assert config.consul == {}
    assert config.app("myapp").exec_commands == ("true",)
    assert dict(parse_config({"apps": None}).apps) == {}


def test_apps_mapping_is_read_only():
    config = parse_config(app_config())
    with pytest.raises(TypeError):
        config.apps["new"] = config.app("myapp")


def test_unknown_app_lookup():
    config = parse_config(app_config(), source=SOURCE)
    with pytest.raises(ConfigError, match=r"^/etc/fireap/config.yml: no app 'nope' is "
                                          r"configured \(apps: myapp\)$"):
        config.app("nope")


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = write(tmp_path, """\
        apps:
          a: &base
            exec_commands: ["true"]
            max_semaphores: 2
          b:
            <<: *base
            max_semaphores: 3
        """)
    config = load_config(path)
    assert config.app("b").max_semaphores == 3
    assert config.app("b").exec_commands == ("true",)


# --- filters -------------------------------------------------------------------

def test_exact_names_become_anchored_escaped_regexps():
    app = parse_config(app_config(service="api.v1+x", tag="blue(1)")).app("myapp")
    assert app.service_filter == r"^api\.v1\+x$"
    assert app.tag_filter == r"^blue\(1\)$"
    assert re.search(app.service_filter, "api.v1+x")
    for other in ("apiXv1+x", "api.v1+x2", "my-api.v1+x", "api.v11x"):
        assert not re.search(app.service_filter, other)


def test_regexp_filters_are_kept_as_written():
    app = parse_config(app_config(service_regexp="^web-", tag_regexp="(?i)canary")).app("myapp")
    assert (app.service_filter, app.tag_filter) == ("^web-", "(?i)canary")


def test_app_filter_replaces_default_pair():
    config = parse_config({
        "defaults": {"service": "api", "tag": "blue", "exec_commands": ["true"]},
        "apps": {"regexp": {"service_regexp": "^web"},
                 "cleared": {"service": None, "tag": None},
                 "inherited": {}},
    })
    assert config.app("regexp").service_filter == "^web"
    assert config.app("regexp").tag_filter == "^blue$"
    assert config.app("cleared").service_filter is None
    assert config.app("cleared").tag_filter is None
    assert config.app("inherited").service_filter == "^api$"


# --- errors: files and YAML ------------------------------------------------------

def test_error_missing_file(tmp_path):
    path = str(tmp_path / "absent.yml")
    with pytest.raises(ConfigError, match=r"absent\.yml: cannot read the config: "
                                          r"No such file or directory"):
        load_config(path)


def test_error_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "apps:\n  myapp: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (path + ": invalid YAML: line 3, column 1: expected ',' or ']', "
                               "but got '<stream end>' (while parsing a flow sequence)")


def test_error_duplicate_key(tmp_path):
    path = write(tmp_path, """\
        apps:
          myapp:
            exec_commands: ["a"]
            exec_commands: ["b"]
        """)
    with pytest.raises(ConfigError, match=r"config\.yml: invalid YAML: line 4, column 5: "
                                          r"duplicate key 'exec_commands' \(first on line 3\)$"):
        load_config(path)


def test_error_empty_document(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.yml: must be a YAML mapping .* "
                                          r"got an empty document"):
        load_config(write(tmp_path, "# nothing\n"))


def test_error_without_pyyaml(tmp_path, monkeypatch):
    monkeypatch.setattr(_taskconfig, "YAML_IMPORT_ERROR", ImportError("No module named 'yaml'"))
    path = write(tmp_path, "apps: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (path + ": cannot parse the config: the PyYAML Python library is required "
                               "but cannot be imported: No module named 'yaml'")


def test_error_document_not_mapping():
    assert error_of(["apps"]).startswith(SOURCE + ": must be a YAML mapping")


# --- errors: unknown keys ---------------------------------------------------------

def test_error_unknown_top_level_key_suggests():
    message = error_of({"app": {}})
    assert message.startswith(SOURCE + ": app: unknown key; did you mean 'apps'?")


def test_error_app_setting_at_top_level():
    message = error_of({"exec_commands": ["true"]})
    assert message.startswith(SOURCE + ": exec_commands: unknown key")
    assert "app settings belong under 'defaults' or 'apps.<name>'" in message


def test_error_unknown_app_key_suggests():
    message = error_of(app_config(exec_command=["true"]))
    assert message.startswith(
        SOURCE + ": apps.myapp.exec_command: unknown key; did you mean 'exec_commands'?")


def test_error_unknown_defaults_key():
    message = error_of({"defaults": {"max_semaphore": 3}})
    assert message.startswith(
        SOURCE + ": defaults.max_semaphore: unknown key; did you mean 'max_semaphores'?")


def test_error_top_level_key_inside_app():
    message = error_of(app_config(kv_prefix="x/"))
    assert message.startswith(SOURCE + ": apps.myapp.kv_prefix: unknown key")
    assert "'kv_prefix' is a top-level key, not an app setting" in message


def test_error_unknown_key_without_close_match():
    message = error_of(app_config(zzz=1))
    assert message.startswith(SOURCE + ": apps.myapp.zzz: unknown key (known keys: ")


# --- errors: sections ---------------------------------------------------------

@pytest.mark.parametrize("key, what", [("consul", "connection options"),
                                       ("defaults", "settings"),
                                       ("apps", "app names to settings")])
def test_error_section_not_mapping(key, what):
    assert error_of({key: ["x"]}) == "%s: %s: must be a mapping of %s, got a list" % (
        SOURCE, key, what)


def test_error_app_section_not_mapping():
    assert error_of({"apps": {"myapp": "rsync"}}) == (
        SOURCE + ": apps.myapp: must be a mapping of settings, got 'rsync'")


def test_error_consul_option_names_not_strings():
    assert error_of({"consul": {1: "x"}}) == SOURCE + ": consul: option names must be strings"


# --- errors: scalar settings ------------------------------------------------------

@pytest.mark.parametrize("value, shown", [("x", "'x'"), (0, "0"), (65, "65"),
                                          (True, "true"), (2.5, "2.5"), (None, "null")])
def test_error_max_semaphores(value, shown):
    assert error_of(app_config(max_semaphores=value)) == (
        SOURCE + ": apps.myapp.max_semaphores: must be an integer from 1 to 64, got " + shown)


def test_max_semaphores_bounds_accepted():
    assert parse_config(app_config(max_semaphores=1)).app("myapp").max_semaphores == 1
    assert parse_config(app_config(max_semaphores=64)).app("myapp").max_semaphores == 64


@pytest.mark.parametrize("key, value", [
    ("watch_timeout", 0),
    ("watch_timeout", float("inf")),
    ("watch_timeout", "10"),
    ("command_timeout", -0.5),
    ("command_timeout", False),
    ("command_timeout", float("nan")),
])
def test_error_seconds(key, value):
    message = error_of(app_config(**{key: value}))
    assert message.startswith("%s: apps.myapp.%s: must be a number of seconds > 0, got " % (SOURCE, key))


def test_error_on_command_failure():
    assert error_of(app_config(on_command_failure="stop")) == (
        SOURCE + ": apps.myapp.on_command_failure: must be 'abort' or 'ignore', got 'stop'")


def test_error_defaults_value_names_defaults():
    assert error_of({"defaults": {"watch_timeout": "soon"}}) == (
        SOURCE + ": defaults.watch_timeout: must be a number of seconds > 0, got 'soon'")


# --- errors: commands ------------------------------------------------------------

def test_error_commands_not_a_list():
    assert error_of(app_config(exec_commands="rsync x y")) == (
        SOURCE + ": apps.myapp.exec_commands: must be a list of commands, got 'rsync x y' "
                 "(write a single command as a one-item list)")


def test_error_command_not_a_string():
    assert error_of(app_config(before_commands=["true", 42])) == (
        SOURCE + ": apps.myapp.before_commands[1]: must be a command string, got 42")


def test_error_command_empty():
    assert error_of(app_config(after_commands=["  "])) == (
        SOURCE + ": apps.myapp.after_commands[0]: must not be empty")


def test_error_command_nul():
    assert error_of(app_config(exec_commands=["echo a\0b"])) == (
        SOURCE + ": apps.myapp.exec_commands[0]: must not contain a NUL character")


def test_error_command_unknown_variable():
    message = error_of(app_config(exec_commands=["true", "echo {{ remote.host }}"]))
    assert message.startswith(
        SOURCE + ": apps.myapp.exec_commands[1]: unknown variable 'remote.host'")


def test_error_command_jinja_block():
    message = error_of(app_config(exec_commands=["{% if x %}a{% endif %}"]))
    assert message.startswith(SOURCE + ": apps.myapp.exec_commands[0]: '{%' starts a "
                                       "Jinja statement")


def test_error_command_quoted_variable():
    message = error_of(app_config(exec_commands=['cp x "/opt/{{ app }}/"']))
    assert message.startswith(SOURCE + ": apps.myapp.exec_commands[0]: {{ app }} is inside "
                                       "double quotes")


def test_error_defaults_command_names_defaults():
    message = error_of({"defaults": {"exec_commands": ["echo {{ ver }}"]}})
    assert message.startswith(SOURCE + ": defaults.exec_commands[0]: unknown variable 'ver'")


def test_error_app_without_commands():
    assert error_of({"apps": {"myapp": {"max_semaphores": 2}}}) == (
        SOURCE + ": apps.myapp: has no commands: set exec_commands (or before_commands, "
                 "after_commands) here or under defaults")


def test_commands_in_any_phase_suffice():
    app = parse_config({"apps": {"myapp": {"after_commands": ["true"]}}}).app("myapp")
    assert (app.exec_commands, app.after_commands) == ((), ("true",))


# --- errors: filters -----------------------------------------------------------

def test_error_filter_name_empty():
    assert error_of(app_config(service="")) == (
        SOURCE + ": apps.myapp.service: must be a non-empty name or null, got ''")


def test_error_filter_name_not_string():
    assert error_of(app_config(service="api", tag=["a"])) == (
        SOURCE + ": apps.myapp.tag: must be a non-empty name or null, got a list")


def test_error_regexp_invalid():
    message = error_of(app_config(service_regexp="web("))
    assert message.startswith(SOURCE + ": apps.myapp.service_regexp: is not a valid regular "
                                       "expression (missing ), unterminated subpattern")
    assert message.endswith(": 'web('")


@pytest.mark.parametrize("pattern, construct", [
    ("^web(?=-1)", "lookahead (?=...)"),
    ("(?<!x)web", "negative lookbehind (?<!...)"),
    (r"(w)\1", r"backreferences (\1)"),
    ("web++", "possessive quantifiers (++)"),
    ("w{2}+", "possessive quantifiers ({2}+)"),
    ("(?>web)", "atomic groups (?>...)"),
    ("(?x)web", "the inline flag group (?x) (only i, m and s)"),
    (r"web\Z", r"\Z (use $)"),
])
def test_error_regexp_not_supported_by_consul(pattern, construct):
    message = error_of(app_config(service="api", tag_regexp=pattern))
    assert message == "%s: apps.myapp.tag_regexp: uses %s, which Consul's regular " \
                      "expressions (Go RE2) do not support: %r" % (SOURCE, construct, pattern)


@pytest.mark.parametrize("pattern", [r"^api-\d+$", "(?i)web|db", "[(?=]x", r"a\(?=b",
                                     "x}+", "a{1,3}?", r"\++", "(?P<n>web)"])
def test_regexps_common_to_python_and_go_accepted(pattern):
    assert parse_config(app_config(service_regexp=pattern)).app("myapp").service_filter == pattern


def test_error_service_and_service_regexp():
    message = error_of(app_config(service="api", service_regexp="^api"))
    assert message.startswith(SOURCE + ": apps.myapp.service_regexp: cannot be combined "
                                       "with 'service'")


def test_error_tag_and_tag_regexp():
    message = error_of({"defaults": {"service": "api", "tag": "a", "tag_regexp": "b"}})
    assert message.startswith(SOURCE + ": defaults.tag_regexp: cannot be combined with 'tag'")


def test_error_tag_without_service():
    assert error_of(app_config(tag="blue")) == (
        SOURCE + ": apps.myapp.tag: a tag filter needs a service filter (service or "
                 "service_regexp), as Consul's event filters require")


def test_error_tag_from_defaults_without_service():
    message = error_of({"defaults": {"tag_regexp": "^b"}, **app_config()})
    assert message.startswith(SOURCE + ": apps.myapp.tag_regexp: a tag filter (set under "
                                       "defaults) needs a service filter")


# --- errors: names and top-level values ---------------------------------------------

@pytest.mark.parametrize("name, problem", [
    ("my/app", "may only contain letters, digits, '_', '.' and '-'"),
    ("with space", "may only contain letters"),
    ("é", "may only contain letters"),
    ("a..b", "must not contain '..'"),
    (".", "must start with a letter, a digit or '_'"),
    ("-x", "must start with a letter, a digit or '_'"),
    (".hidden", "must start with a letter, a digit or '_'"),
])
def test_error_app_name(name, problem):
    message = error_of({"apps": {name: {"exec_commands": ["true"]}}})
    assert message.startswith("%s: apps: app name %r " % (SOURCE, name))
    assert problem in message


def test_error_app_name_empty():
    assert error_of({"apps": {"": {"exec_commands": ["true"]}}}).startswith(
        SOURCE + ": apps: app name must be a non-empty string, got ''")


def test_error_app_name_too_long():
    name = "x" * 49
    assert error_of({"apps": {name: {"exec_commands": ["true"]}}}) == (
        "%s: apps: app name %r is 49 characters long, more than 48" % (SOURCE, name))


def test_error_app_name_not_string():
    assert error_of({"apps": {1.5: {"exec_commands": ["true"]}}}) == (
        SOURCE + ": apps: app name 1.5 must be a string (quote it in YAML)")


@pytest.mark.parametrize("name", ["x" * 48, "my.app-2_b", "1.0", "_x", "x-"])
def test_app_names_accepted(name):
    assert check_app_name(name) == name
    assert list(parse_config({"apps": {name: {"exec_commands": ["true"]}}}).apps) == [name]


@pytest.mark.parametrize("value", ["node/3", "..", "", 7])
def test_error_node_name(value):
    message = error_of({"node_name": value})
    assert message.startswith(SOURCE + ": node_name: node name ")
    assert message.endswith(" (it becomes part of Consul KV keys)")


def test_node_name_accepted():
    assert parse_config({"node_name": "ip-10-0-0-1.ec2.internal"}).node_name == \
        "ip-10-0-0-1.ec2.internal"


@pytest.mark.parametrize("value, problem", [
    ("/fireap/", "must not start with '/'"),
    ("a/../b", "must not contain empty, '.' or '..' segments"),
    ("a//b", "must not contain empty, '.' or '..' segments"),
    ("a/./b", "must not contain empty, '.' or '..' segments"),
    ("pre fix/", "may only contain"),
    ("", "must be a non-empty string"),
    (3, "must be a non-empty string"),
])
def test_error_kv_prefix(value, problem):
    message = error_of({"kv_prefix": value})
    assert message.startswith(SOURCE + ": kv_prefix: KV prefix ")
    assert problem in message


@pytest.mark.parametrize("value, expected", [("fireap", "fireap/"), ("a/b/", "a/b/")])
def test_kv_prefix_gets_trailing_slash(value, expected):
    assert parse_config({"kv_prefix": value}).kv_prefix == expected


@pytest.mark.parametrize("key", ["state_dir", "log_file"])
@pytest.mark.parametrize("value, shown", [("var/lib", "'var/lib'"), (5, "5")])
def test_error_paths_must_be_absolute(key, value, shown):
    assert error_of({key: value}) == "%s: %s: must be an absolute path, got %s" % (
        SOURCE, key, shown)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_config({"kv_prefix": "/x", "defaults": {"max_semaphores": 0},
                      "apps": {"a/b": {}, "ok": {"exec_commands": "x"}}}, source=SOURCE)
    problems = info.value.problems
    assert [problem.split(": ")[1] for problem in problems] == [
        "kv_prefix", "defaults.max_semaphores", "apps", "apps.ok.exec_commands"]
    assert all(problem.startswith(SOURCE + ": ") for problem in problems)
    assert str(info.value) == "\n".join(problems)


def test_config_error_is_a_fireap_error():
    assert issubclass(ConfigError, FireapError)


ARTIFACT = "/srv/builds/{{ app }}-{{ version }}.tar.gz"


def test_an_artifact_is_a_path_template_with_a_bounded_seed_time():
    config = parse_config(app_config(artifact={"path": ARTIFACT}, exec_commands=["tar -xzf {{ artifact }}"]))
    app = config.app("myapp")
    assert app.artifact == _taskconfig.ArtifactConfig(path=ARTIFACT, seed_seconds=60, port=6881)
    assert (app.advert().artifact, app.advert().artifact_port) == (ARTIFACT, 6881)
    assert app.listing()["artifact"] == {"path": ARTIFACT, "seed_seconds": 60, "port": 6881, "rate_limit": None}
    again = parse_config(app_config(artifact={"path": ARTIFACT, "seed_seconds": 0, "port": 1024},
                                    exec_commands=["true"]))
    assert again.app("myapp").artifact.seed_seconds == 0 and again.app("myapp").advert().artifact_port == 1024


def test_an_artifact_may_cap_the_nodes_swarm_in_bytes_per_second_which_it_does_not_advertise():
    app = parse_config(app_config(artifact={"path": ARTIFACT, "rate_limit": 1_250_000},
                                  exec_commands=["true"])).app("myapp")
    assert app.artifact.rate_limit == 1_250_000 and app.listing()["artifact"]["rate_limit"] == 1_250_000
    assert "rate_limit" not in json.dumps(app.advert().to_dict())


def test_an_app_without_an_artifact_advertises_and_lists_none():
    app = parse_config(app_config()).app("myapp")
    assert app.artifact is None and app.advert().artifact is None and app.advert().artifact_port is None
    assert "artifact" not in app.advert().to_dict() and "artifact_port" not in app.advert().to_dict()
    assert "artifact" not in app.listing()


def test_an_app_artifact_replaces_the_defaults_one():
    other = "/srv/other/{{ app }}.tar.gz"
    config = parse_config({"defaults": {"artifact": {"path": ARTIFACT, "seed_seconds": 5},
                                        "exec_commands": ["tar -xzf {{ artifact }}"]},
                           "apps": {"a": None, "b": {"artifact": {"path": other, "port": 6882}}}})
    assert config.app("a").artifact == _taskconfig.ArtifactConfig(ARTIFACT, 5, 6881)
    assert config.app("b").artifact == _taskconfig.ArtifactConfig(other, 60, 6882)


def test_two_apps_with_an_artifact_on_one_port_are_refused():
    error = error_of({"defaults": {"artifact": {"path": ARTIFACT}, "exec_commands": ["tar -xzf {{ artifact }}"]},
                      "apps": {"a": None, "b": None, "c": {"artifact": {"path": ARTIFACT, "port": 7000}}}})
    assert "apps.b.artifact.port: is 6881, as app a's: give each app with an artifact a port of its own" in error
    assert "apps.c" not in error


@pytest.mark.parametrize("artifact, message", [
    ("/srv/x.tar.gz", r"apps\.myapp\.artifact: must be a mapping with the keys path, seed_seconds, port, rate_limit"),
    ({}, r"apps\.myapp\.artifact\.path: needs a path"),
    ({"path": "/srv/{{ app }}/x.tar.gz"}, r"apps\.myapp\.artifact\.path: .*in the file name only"),
    ({"path": "/srv/../x"}, r"apps\.myapp\.artifact\.path: .*'\.\.' components"),
    ({"path": "/srv/{{ node }}.tgz"}, r"apps\.myapp\.artifact\.path: .*only \{\{ app \}\} and"),
    ({"path": ARTIFACT, "seed_seconds": 3601}, r"apps\.myapp\.artifact\.seed_seconds: must be an integer from 0"),
    ({"path": ARTIFACT, "seed_seconds": True}, r"apps\.myapp\.artifact\.seed_seconds: must be an integer"),
    ({"path": ARTIFACT, "port": 1023}, r"apps\.myapp\.artifact\.port: must be an integer from 1024 to 65535"),
    ({"path": ARTIFACT, "port": "6881"}, r"apps\.myapp\.artifact\.port: must be an integer"),
    ({"path": ARTIFACT, "rate_limit": 16383}, r"apps\.myapp\.artifact\.rate_limit: must be an integer from 16384 to 2147483647"),
    ({"path": ARTIFACT, "rate_limit": 2**31}, r"apps\.myapp\.artifact\.rate_limit: must be an integer from 16384"),
    ({"path": ARTIFACT, "rate_limit": "1M"}, r"apps\.myapp\.artifact\.rate_limit: must be an integer"),
    ({"path": ARTIFACT, "seed_secs": 1}, r"apps\.myapp\.artifact\.seed_secs: unknown key; did you mean 'seed_seconds'"),
])
def test_an_invalid_artifact_is_refused_naming_its_key(artifact, message):
    assert re.search(message, error_of(app_config(artifact=artifact, exec_commands=["true"])))


def test_artifact_commands_name_the_artifact_and_never_one_source():
    without = error_of(app_config(exec_commands=["tar -xzf {{ artifact }}"]))
    assert "apps.myapp.exec_commands[0]: uses {{ artifact }}, but the app has no artifact" in without
    with_source = error_of(app_config(artifact={"path": ARTIFACT},
                                      after_commands=["true", "scp {{ remote.address }}:x {{ artifact }}"]))
    assert ("apps.myapp.after_commands[1]: uses {{ remote.address }}, but the app has an artifact, which comes "
            "from the swarm, not one source") in with_source
