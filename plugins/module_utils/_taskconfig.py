"""The task config: which apps a node releases and how (YAML, validated on load).

The fireap_node role writes it on every node (default ``/etc/fireap/config.yml``) from
role variables; the node's fireap-reap handler and the controller modules read it.

.. code-block:: yaml

    consul:                 # local agent connection, passed as-is to _connection
      host: 127.0.0.1       # (host, port, scheme, validate_certs, ca_path, token,
      port: 8500            #  timeout, retries)
    node_name: node-003     # optional; default: the agent's NodeName
    kv_prefix: fireap/      # Consul KV prefix of all fireap keys (a '/' is appended
                            # when missing)
    state_dir: /var/lib/fireap            # absolute: processed events, lock files
    log_file: /var/log/fireap/reap.log    # absolute
    log_level: info         # debug, info, warning or error: the least severe line logged
    defaults:               # settings for every app; each app may override any of them
      max_semaphores: 5     # fan-out k: pullers one source serves at once, 1..64; the
                            # default fanout of fireap_fire on this node
      watch_timeout: 600    # seconds a release may take before waiters give up, > 0
      command_timeout: 300  # seconds each command may run, > 0
      on_command_failure: abort   # abort: stop at the first failed command, the node
                                  # fails; ignore: run the rest, the node is done
      before_commands: []   # command templates, run in this order:
      exec_commands: []     # before_commands, exec_commands, the verification,
      after_commands: []    # after_commands
      verify_file: null     # path template of the build's file: its SHA-256 must be the
                            # release's checksum
      verify_commands: []   # commands that verify the build, given {{ checksum }}
      artifact: null        # {path: /srv/builds/{{ app }}-{{ version }}.tar.gz, seed_seconds: 60,
                            # port: 6881, rate_limit: null}: one file the swarm delivers
                            # before the commands run
      service: null         # target filters, see below
      service_regexp: null
      tag: null
      tag_regexp: null
    apps:                   # app name -> settings (null or {} = the defaults)
      myapp:
        exec_commands:
          - rsync -a --delete {{ remote.address }}::apps/{{ app }}/ /opt/{{ app }}/

Rules:

- App names match ``[A-Za-z0-9_][A-Za-z0-9_.-]*`` (``_validation.check_name``), are at most
  48 characters and contain no ``..`` (they become part of Consul KV keys, of the event
  payload and of commands). An
  app name that YAML reads as a number or boolean must be quoted.
- After merging with ``defaults``, every app needs at least one command other than
  verify_commands.
- Verification: when the release carries a checksum, the node checks its build after
  exec_commands and before after_commands: the SHA-256 of ``verify_file`` (an absolute path
  template with ``{{ app }}``, ``{{ version }}``, ``{{ node }}``, computed by the node
  itself), then ``verify_commands`` (command templates that may also use
  ``{{ checksum }}``). A release with a checksum on an app without verification, or an app
  with verification and a release without one, fails the node before anything runs
  (``_integrity.verification_problem``).
- Commands are templates with ``{{ app }}``, ``{{ version }}``, ``{{ node }}``,
  ``{{ remote.name }}`` and ``{{ remote.address }}`` (see ``_commands``). Values are
  inserted already shell-quoted: never put quotes around a variable.
- Artifact: an app may declare one file (``artifact.path``, an absolute path whose file name
  may hold ``{{ app }}`` and ``{{ version }}``; ``_validation.check_artifact_path``) that the
  leader publishes with each release and every target fetches from the swarm (``_swarm``)
  and verifies against the release's checksum before its commands run; they name it
  ``{{ artifact }}`` and, with no single source, never ``{{ remote.* }}``. A node serves it
  until every target is over, then for ``seed_seconds`` at most (0..SEED_SECONDS_MAX), on its
  cluster address at ``port`` (DEFAULT_SWARM_PORT, within SWARM_PORT_MIN..65535; two apps
  with an artifact need two ports), which its advert tells the leader. ``rate_limit`` caps
  the node's swarm at that many bytes per second each way (RATE_LIMIT_MIN..RATE_LIMIT_MAX;
  null, the default: no cap), so that a release leaves room on production links.
- Filters decide which nodes take an app: a node takes it only when one of its services
  has a matching name (``service``: exactly this name; ``service_regexp``: a regexp
  searched unanchored in the name) and, with a tag filter, that same service has a
  matching tag (``tag``: exactly; ``tag_regexp``: searched). Names, not service IDs. The
  exact names become ``^name$`` regexps (``AppConfig.service_filter``/``tag_filter``);
  the node advertises them (``AppConfig.advert``), the leader applies them to the
  catalog's services of each node and the node to its agent's own
  (``_kv.AppAdvert.accepts``). Regexps must use the syntax Python and Consul (Go RE2)
  share: no lookaround, backreferences, atomic groups, possessive quantifiers,
  conditionals or comments; a filter is at most FILTER_MAX_LENGTH characters.
  ``service`` and ``service_regexp`` exclude each other, as do ``tag`` and
  ``tag_regexp``; a tag filter needs a service filter. An app that sets either key of a
  pair replaces that pair of ``defaults`` (``service: null`` clears it).
- Unknown keys, wrong types and out-of-range values are errors; every error names the
  file and the key path, e.g. ``apps.myapp.max_semaphores``. Duplicate YAML keys are
  errors too.
"""

from __future__ import annotations

import difflib
import math
import re
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

try:
    import yaml
except ImportError as exc:
    # load_config() refuses to run; parse_config() checks data already parsed.
    YAML_IMPORT_ERROR = exc
    _SafeLoader = object
else:
    YAML_IMPORT_ERROR = None
    _SafeLoader = yaml.SafeLoader

from ansible_collections.fireap.consul.plugins.module_utils._commands import (
    ARTIFACT_VARIABLE,
    ON_FAILURE_CHOICES,
    PHASES,
    SOURCE_VARIABLES,
    VARIABLES,
    VERIFY_PHASE,
    VERIFY_VARIABLES,
    TemplateError,
    path_variables,
    template_variables,
)
from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError, InvalidValue
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    DEFAULT_PREFIX,
    AppAdvert,
    NodeAdvert,
    check_prefix,
)
from ansible_collections.fireap.consul.plugins.module_utils._validation import (
    FANOUT_MAX,
    FANOUT_MIN,
    DEFAULT_SWARM_PORT,
    SWARM_PORT_MIN,
    check_artifact_path,
    check_name,
)

DEFAULT_PATH = "/etc/fireap/config.yml"
#: The environment variable that names the task config when no path is given (``--config``, ``config_path``).
CONFIG_PATH_ENV = "FIREAP_CONFIG_PATH"
DEFAULT_STATE_DIR = "/var/lib/fireap"
DEFAULT_LOG_FILE = "/var/log/fireap/reap.log"
#: The handler's log levels, least severe first (the names of Python's logging levels).
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"
APP_NAME_MAX_LENGTH = 48
#: Longest service or tag filter as written: its exact-name regexp still fits an advert.
FILTER_MAX_LENGTH = 256
#: How long a node serves an artifact, at most, once every target of the run is over.
DEFAULT_SEED_SECONDS = 60
SEED_SECONDS_MAX = 3600
#: The bounds of an artifact's ``rate_limit`` (bytes/s each way): one 16 KiB block per second at
#: least; at most what libtorrent's rate settings (32-bit) hold.
RATE_LIMIT_MIN = 16 * 1024
RATE_LIMIT_MAX = 2**31 - 1

_FILTER_PAIRS = (("service", "service_regexp"), ("tag", "tag_regexp"))


class ConfigError(FireapError):
    """An invalid task config; ``problems`` lists every error found, one per line."""

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class ArtifactConfig:
    """An app's artifact: the path template of the file, how long a node serves it after the
    run, the swarm's port, and its cap in bytes per second each way (None: none)."""

    path: str
    seed_seconds: int = DEFAULT_SEED_SECONDS
    port: int = DEFAULT_SWARM_PORT
    rate_limit: Optional[int] = None


@dataclass(frozen=True)
class AppConfig:
    """One app's settings, merged with the config's defaults."""

    name: str
    max_semaphores: int
    watch_timeout: float
    command_timeout: float
    on_command_failure: str
    before_commands: Tuple[str, ...]
    exec_commands: Tuple[str, ...]
    after_commands: Tuple[str, ...]
    service_filter: Optional[str]   # regexp on the names of the node's services, or None
    tag_filter: Optional[str]       # regexp on the tags of that service, or None
    verify_file: Optional[str] = None   # path template of the file whose SHA-256 is checked
    verify_commands: Tuple[str, ...] = ()
    artifact: Optional[ArtifactConfig] = None

    def advert(self) -> AppAdvert:
        """What the node tells the leader about this app (no commands)."""
        return AppAdvert(max_semaphores=self.max_semaphores, service_filter=self.service_filter,
                         tag_filter=self.tag_filter, artifact=self.artifact.path if self.artifact else None,
                         artifact_port=self.artifact.port if self.artifact else None)

    def listing(self) -> Dict[str, Any]:
        """The app's merged settings as ``fireap-reap --list`` shows them: commands as
        configured (templates, not rendered), filters as the regexps the node applies."""
        return {
            "max_semaphores": self.max_semaphores,
            "watch_timeout": self.watch_timeout,
            "command_timeout": self.command_timeout,
            "on_command_failure": self.on_command_failure,
            "verify_file": self.verify_file,
            **({"artifact": {"path": self.artifact.path, "seed_seconds": self.artifact.seed_seconds,
                             "port": self.artifact.port, "rate_limit": self.artifact.rate_limit}}
               if self.artifact else {}),
            **{phase: list(getattr(self, phase)) for phase in PHASES},
            "service_filter": self.service_filter,
            "tag_filter": self.tag_filter,
        }


@dataclass(frozen=True)
class TaskConfig:
    """A validated task config."""

    source: str                     # file path (or label) used in error messages
    consul: Dict[str, Any]          # raw connection options for _connection
    node_name: Optional[str]        # None: ask the agent
    kv_prefix: str                  # always ends with '/'
    state_dir: str
    log_file: str
    apps: Mapping[str, AppConfig]   # read-only, in config order
    log_level: str = DEFAULT_LOG_LEVEL  # one of LOG_LEVELS

    def advert(self) -> NodeAdvert:
        """The node's advert of its apps (``<prefix>.apps/<node>``)."""
        return NodeAdvert({name: app.advert() for name, app in self.apps.items()})

    def app(self, name: str) -> AppConfig:
        """The merged settings of app ``name``; ConfigError when it is not configured."""
        try:
            return self.apps[name]
        except KeyError:
            known = ", ".join(self.apps) or "none"
            raise ConfigError("%s: no app %r is configured (apps: %s)"
                              % (self.source, name, known)) from None


class _Invalid(Exception):
    """A bad value; ``suffix`` extends the key path (e.g. ``[2]`` for a list item)."""

    def __init__(self, message: str, suffix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.suffix = suffix


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, briefly."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_app_name(name: Any) -> str:
    """Return ``name`` if it is a valid app name, else raise ValueError saying why.

    On top of the KV key rules (``_kv.check_name``) an app name is short, since it
    travels in the ~100-byte event payload.
    """
    if not isinstance(name, str):
        raise InvalidValue("app name %s must be a string (quote it in YAML)" % _show(name))
    check_name(name, "app")
    if len(name) > APP_NAME_MAX_LENGTH:
        raise InvalidValue(f"app name {name!r} is {len(name)} characters long, more than {APP_NAME_MAX_LENGTH}")
    return name


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _Invalid("must be an integer from %d to %d, got %s" % (low, high, _show(value)))
        return value
    return check


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _Invalid("must be a number of seconds > 0, got %s" % _show(value))
    return value


def _choice(value: Any) -> str:
    if value not in ON_FAILURE_CHOICES or not isinstance(value, str):
        raise _Invalid("must be %s, got %s"
                       % (" or ".join(repr(c) for c in ON_FAILURE_CHOICES), _show(value)))
    return value


def _command_list(names: Tuple[str, ...]) -> Callable[[Any], Tuple[str, ...]]:
    """The check of a command list whose templates may use the variables ``names``."""
    return lambda value: _commands(value, names)


def _commands(value: Any, names: Tuple[str, ...]) -> Tuple[str, ...]:
    if not isinstance(value, list):
        hint = " (write a single command as a one-item list)" if isinstance(value, str) else ""
        raise _Invalid("must be a list of commands, got %s%s" % (_show(value), hint))
    for index, command in enumerate(value):
        suffix = "[%d]" % index
        if not isinstance(command, str):
            raise _Invalid("must be a command string, got %s" % _show(command), suffix)
        if not command.strip():
            raise _Invalid("must not be empty", suffix)
        if "\0" in command:
            raise _Invalid("must not contain a NUL character", suffix)
        try:
            template_variables(command, names)
        except TemplateError as exc:
            raise _Invalid(str(exc), suffix) from None
    return tuple(value)


def _verify_file(value: Any) -> Optional[str]:
    if value is None:
        return None
    try:
        path_variables(value)
    except TemplateError as exc:
        raise _Invalid(str(exc)) from None
    return value


_ARTIFACT_KEYS = ("path", "seed_seconds", "port", "rate_limit")


def _artifact(value: Any) -> Optional[ArtifactConfig]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Invalid("must be a mapping with the keys %s, or null, got %s" % (", ".join(_ARTIFACT_KEYS), _show(value)))
    for key in value:
        if key not in _ARTIFACT_KEYS:
            raise _Invalid(_unknown_key(key, list(_ARTIFACT_KEYS)), ".%s" % key)
    if "path" not in value:
        raise _Invalid("needs a path", ".path")
    try:
        path = check_artifact_path(value["path"])
    except ValueError as exc:
        raise _Invalid(str(exc), ".path") from None
    seconds = value.get("seed_seconds", DEFAULT_SEED_SECONDS)
    port = value.get("port", DEFAULT_SWARM_PORT)
    rate_limit = value.get("rate_limit")
    bounded = [("seed_seconds", seconds, 0, SEED_SECONDS_MAX), ("port", port, SWARM_PORT_MIN, 65535)]
    if rate_limit is not None:
        bounded.append(("rate_limit", rate_limit, RATE_LIMIT_MIN, RATE_LIMIT_MAX))
    for key, number, low, high in bounded:
        try:
            _integer(low, high)(number)
        except _Invalid as exc:
            raise _Invalid(exc.message, "." + key) from None
    return ArtifactConfig(path=path, seed_seconds=seconds, port=port, rate_limit=rate_limit)


def _filter_text(value: str) -> None:
    """The rules every filter string follows, so that its regexp fits an advert."""
    if not value.isprintable():
        raise _Invalid("must not contain control characters, got %s" % _show(value))
    if len(value) > FILTER_MAX_LENGTH:
        raise _Invalid("has %d characters; at most %d" % (len(value), FILTER_MAX_LENGTH))


def _filter_name(value: Any) -> Optional[str]:
    if value is not None and (not isinstance(value, str) or not value):
        raise _Invalid("must be a non-empty name or null, got %s" % _show(value))
    if value is not None:
        _filter_text(value)
    return value


_PERL_ONLY_GROUPS = (
    ("(?=", "lookahead (?=...)"),
    ("(?!", "negative lookahead (?!...)"),
    ("(?<=", "lookbehind (?<=...)"),
    ("(?<!", "negative lookbehind (?<!...)"),
    ("(?>", "atomic groups (?>...)"),
    ("(?P=", "named backreferences (?P=...)"),
    ("(?(", "conditionals (?(...)...)"),
    ("(?#", "comments (?#...)"),
)
_INLINE_FLAGS = re.compile(r"\(\?([A-Za-z-]+)[:)]")
_COUNTED_REPEAT = re.compile(r"\{\d+(?:,\d*)?\}")


def _unsupported_by_go(pattern: str) -> Optional[str]:
    """Name a construct Python's re accepts but Consul's Go RE2 refuses, if any."""
    index = 0
    in_class = False
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            following = pattern[index + 1:index + 2]
            if not in_class and following.isdigit() and following != "0":
                return "backreferences (\\%s)" % following
            if following == "Z":
                return "\\Z (use $)"
            index += 2
            continue
        if in_class:
            in_class = char != "]"
            index += 1
            continue
        if char == "[":
            index += 1
            if pattern.startswith("^", index):
                index += 1
            if pattern.startswith("]", index):
                index += 1
            in_class = True
            continue
        for prefix, name in _PERL_ONLY_GROUPS:
            if pattern.startswith(prefix, index):
                return name
        flags = _INLINE_FLAGS.match(pattern, index)
        if flags and set(flags.group(1)) - set("ims-"):
            return "the inline flag group %s (only i, m and s)" % flags.group(0)
        repeat = _COUNTED_REPEAT.match(pattern, index)
        end = repeat.end() if repeat else index + 1
        if (repeat or char in "*+?") and pattern.startswith("+", end) and index > 0:
            return "possessive quantifiers (%s+)" % pattern[index:end]
        index = end
    return None


def _filter_regexp(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _Invalid("must be a non-empty regular expression or null, got %s" % _show(value))
    _filter_text(value)
    try:
        re.compile(value)
    except re.error as exc:
        raise _Invalid("is not a valid regular expression (%s): %s" % (exc, _show(value))) from None
    unsupported = _unsupported_by_go(value)
    if unsupported:
        raise _Invalid("uses %s, which Consul's regular expressions (Go RE2) do not "
                       "support: %s" % (unsupported, _show(value)))
    return value


_SETTINGS: Dict[str, Callable[[Any], Any]] = {
    "max_semaphores": _integer(FANOUT_MIN, FANOUT_MAX),
    "watch_timeout": _seconds,
    "command_timeout": _seconds,
    "on_command_failure": _choice,
    "before_commands": _command_list(VARIABLES),
    "exec_commands": _command_list(VARIABLES),
    "verify_commands": _command_list(VERIFY_VARIABLES),
    "after_commands": _command_list(VARIABLES),
    "verify_file": _verify_file,
    "artifact": _artifact,
    "service": _filter_name,
    "service_regexp": _filter_regexp,
    "tag": _filter_name,
    "tag_regexp": _filter_regexp,
}

BUILTIN_DEFAULTS: Mapping[str, Any] = types.MappingProxyType({
    "max_semaphores": 5,
    "watch_timeout": 600,
    "command_timeout": 300,
    "on_command_failure": "abort",
    "before_commands": (),
    "exec_commands": (),
    "verify_commands": (),
    "after_commands": (),
    "verify_file": None,
    "artifact": None,
    "service": None,
    "service_regexp": None,
    "tag": None,
    "tag_regexp": None,
})

_TOP_LEVEL = ("consul", "node_name", "kv_prefix", "state_dir", "log_file", "log_level", "defaults", "apps")


class _Problems:
    def __init__(self, source: str) -> None:
        self.source = source
        self.items: List[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append("%s: %s: %s" % (self.source, path, message))


def _unknown_key(key: Any, known, note: str = "") -> str:
    message = "unknown key"
    if isinstance(key, str):
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            message += "; did you mean %r?" % close[0]
    return message + note + " (known keys: %s)" % ", ".join(known)


def _mapping(value: Any, path: str, what: str, problems: _Problems) -> Optional[dict]:
    """``value`` as a dict (null counts as empty), or None after reporting it."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add(path, "must be a mapping of %s, got %s" % (what, _show(value)))
        return None
    return value


def _settings(section: Any, path: str, problems: _Problems) -> Dict[str, Any]:
    """The valid settings of a ``defaults`` or ``apps.<name>`` section."""
    section = _mapping(section, path, "settings", problems)
    checked: Dict[str, Any] = {}
    for key, value in (section or {}).items():
        key_path = "%s.%s" % (path, key)
        if key not in _SETTINGS:
            note = (" (%r is a top-level key, not an app setting)" % key
                    if key in _TOP_LEVEL else "")
            problems.add(key_path, _unknown_key(key, list(_SETTINGS), note))
            continue
        try:
            checked[key] = _SETTINGS[key](value)
        except _Invalid as exc:
            problems.add(key_path + exc.suffix, exc.message)
    for name_key, regexp_key in _FILTER_PAIRS:
        if checked.get(name_key) is not None and checked.get(regexp_key) is not None:
            problems.add("%s.%s" % (path, regexp_key),
                         "cannot be combined with %r: %r is an exact name, %r a regular "
                         "expression; set only one" % (name_key, name_key, regexp_key))
    return checked


def _event_filter(settings: Mapping[str, Any], name_key: str, regexp_key: str) -> Optional[str]:
    if settings[name_key] is not None:
        return "^%s$" % re.escape(settings[name_key])
    return settings[regexp_key]


def _artifact_commands_fit(path: str, settings: Mapping[str, Any], problems: _Problems) -> bool:
    """Whether the app's commands name only what it has: ``{{ artifact }}`` needs an artifact,
    and an app with one fetches it from the swarm, from no single source (no ``{{ remote.* }}``)."""
    fits = True
    for phase in PHASES:
        for index, command in enumerate(settings[phase]):
            used = set(template_variables(command, VERIFY_VARIABLES))
            if settings["artifact"] is None and ARTIFACT_VARIABLE in used:
                problems.add("%s.%s[%d]" % (path, phase, index),
                             "uses {{ artifact }}, but the app has no artifact: set artifact.path")
                fits = False
            wrong = sorted(used & set(SOURCE_VARIABLES)) if settings["artifact"] is not None else []
            if wrong:
                problems.add("%s.%s[%d]" % (path, phase, index),
                             "uses %s, but the app has an artifact, which comes from the swarm, not one source: "
                             "use {{ artifact }}" % ", ".join("{{ %s }}" % name for name in wrong))
                fits = False
    return fits


def _merge(name: str, defaults: Mapping[str, Any], own: Mapping[str, Any],
           problems: _Problems) -> Optional[AppConfig]:
    path = "apps.%s" % name
    settings = dict(BUILTIN_DEFAULTS)
    settings.update(defaults)
    for pair in _FILTER_PAIRS:
        if any(key in own for key in pair):
            for key in pair:
                settings[key] = own.get(key)
    settings.update((key, value) for key, value in own.items())
    if not any(settings[phase] for phase in PHASES if phase != VERIFY_PHASE):
        problems.add(path, "has no commands: set exec_commands (or before_commands, "
                           "after_commands) here or under defaults")
        return None
    if not _artifact_commands_fit(path, settings, problems):
        return None
    service_filter = _event_filter(settings, *_FILTER_PAIRS[0])
    tag_filter = _event_filter(settings, *_FILTER_PAIRS[1])
    if tag_filter is not None and service_filter is None:
        tag_key = "tag" if settings["tag"] is not None else "tag_regexp"
        origin = "" if tag_key in own else " (set under defaults)"
        problems.add("%s.%s" % (path, tag_key),
                     "a tag filter%s needs a service filter (service or service_regexp), "
                     "as Consul's event filters require" % origin)
        return None
    return AppConfig(
        name=name,
        max_semaphores=settings["max_semaphores"],
        watch_timeout=settings["watch_timeout"],
        command_timeout=settings["command_timeout"],
        on_command_failure=settings["on_command_failure"],
        before_commands=settings["before_commands"],
        exec_commands=settings["exec_commands"],
        after_commands=settings["after_commands"],
        service_filter=service_filter,
        tag_filter=tag_filter,
        verify_file=settings["verify_file"],
        verify_commands=settings["verify_commands"],
        artifact=settings["artifact"],
    )


def _absolute_path(value: Any, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise _Invalid("must be an absolute path, got %s" % _show(value))
    return value


def _log_level(value: Any) -> str:
    if value is None:
        return DEFAULT_LOG_LEVEL
    if not isinstance(value, str) or value not in LOG_LEVELS:
        raise _Invalid("must be %s, got %s" % (", ".join(LOG_LEVELS), _show(value)))
    return value


def _node_name(value: Any) -> Optional[str]:
    if value is None:
        return None
    try:
        return check_name(value, "node")
    except ValueError as exc:
        raise _Invalid("%s (it becomes part of Consul KV keys)" % exc) from None


def _kv_prefix(value: Any) -> str:
    if value is None:
        return DEFAULT_PREFIX
    if isinstance(value, str) and value and not value.endswith("/"):
        value += "/"
    try:
        return check_prefix(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _distinct_ports(apps: Mapping[str, Optional[AppConfig]], problems: _Problems) -> None:
    """Two apps of a node serve their artifacts at the same time: on two ports."""
    first: Dict[int, str] = {}
    for name in sorted(apps):
        artifact = apps[name].artifact if apps[name] is not None else None
        if artifact is None:
            continue
        if artifact.port in first:
            problems.add("apps.%s.artifact.port" % name,
                         "is %d, as app %s's: give each app with an artifact a port of its own"
                         % (artifact.port, first[artifact.port]))
        first.setdefault(artifact.port, name)


def parse_config(data: Any, source: str = "<config>") -> TaskConfig:
    """Validate a loaded config document; ConfigError lists every problem found."""
    problems = _Problems(source)
    if not isinstance(data, dict):
        shown = "an empty document" if data is None else _show(data)
        raise ConfigError("%s: must be a YAML mapping with the keys %s, got %s"
                          % (source, ", ".join(_TOP_LEVEL), shown))
    for key in data:
        if key not in _TOP_LEVEL:
            note = (" (app settings belong under 'defaults' or 'apps.<name>')"
                    if key in _SETTINGS else "")
            problems.add(str(key), _unknown_key(key, _TOP_LEVEL, note))

    consul = _mapping(data.get("consul"), "consul", "connection options", problems)
    if consul and not all(isinstance(key, str) for key in consul):
        problems.add("consul", "option names must be strings")
    scalars = {}
    for key, check in (("node_name", _node_name), ("kv_prefix", _kv_prefix),
                       ("state_dir", lambda v: _absolute_path(v, DEFAULT_STATE_DIR)),
                       ("log_file", lambda v: _absolute_path(v, DEFAULT_LOG_FILE)),
                       ("log_level", _log_level)):
        try:
            scalars[key] = check(data.get(key))
        except _Invalid as exc:
            problems.add(key, exc.message)

    defaults = _settings(data.get("defaults"), "defaults", problems)
    apps_section = _mapping(data.get("apps"), "apps", "app names to settings", problems) or {}
    own_settings = {}
    for name, section in apps_section.items():
        try:
            check_app_name(name)
        except ValueError as exc:
            problems.add("apps", str(exc))
            continue
        own_settings[name] = _settings(section, "apps.%s" % name, problems)
    if problems.items:
        raise ConfigError(problems.items)

    apps = {name: _merge(name, defaults, own, problems) for name, own in own_settings.items()}
    _distinct_ports(apps, problems)
    if problems.items:
        raise ConfigError(problems.items)
    return TaskConfig(
        source=source,
        consul=dict(consul),
        node_name=scalars["node_name"],
        kv_prefix=scalars["kv_prefix"],
        state_dir=scalars["state_dir"],
        log_file=scalars["log_file"],
        apps=types.MappingProxyType(apps),
        log_level=scalars["log_level"],
    )


class _Loader(_SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    seen = {}
    for key_node, _value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, "duplicate key %r (first on line %d)" % (key, seen[key]),
                key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node)


if YAML_IMPORT_ERROR is None:
    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str = DEFAULT_PATH) -> TaskConfig:
    """Read, parse and validate the task config file at ``path``."""
    if YAML_IMPORT_ERROR is not None:
        raise ConfigError("%s: cannot parse the config: the PyYAML Python library is required but cannot be "
                          "imported: %s" % (path, YAML_IMPORT_ERROR))
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError("%s: cannot read the config: %s" % (path, reason)) from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = "line %d, column %d: " % (mark.line + 1, mark.column + 1) if mark else ""
        problem = exc.problem or exc.context
        if exc.problem and exc.context:
            problem += " (%s)" % exc.context
        raise ConfigError("%s: invalid YAML: %s%s" % (path, where, problem)) from None
    except yaml.YAMLError as exc:
        raise ConfigError("%s: invalid YAML: %s" % (path, exc)) from None
    return parse_config(data, source=path)
