# The project's commands. `make setup` is the shared first step of every other target.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NODES ?= 20
FANOUT ?= 5
# `make demo SWARM=1`: the build as an artifact, delivered by the swarm (see README's demo).
SWARM ?=
DEBIAN_TOOLS := rsync parallel shellcheck chromium logrotate
COLLECTION_LINK := build/ansible_collections/fireap/consul

.PHONY: setup test lint typecheck sanity units consul changelog molecule demo bench chaos clean

setup: $(VENV)/.installed $(COLLECTION_LINK) playbooks/collections system-tools

# requirements-dev.txt includes requirements.txt: a change to either rebuilds the venv.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# ansible-test and ansible-playbook find the collection under ansible_collections/<ns>/<name>.
$(COLLECTION_LINK):
	mkdir -p $(dir $@)
	ln -sfn $(CURDIR) $@

# ansible.cfg's playbook_dir is playbooks/: the checkout's collection is adjacent to the
# playbooks (and to ad hoc commands run from the root) without a collections_path, so that
# `ansible-galaxy collection install` from the root installs where it is told.
playbooks/collections: | $(COLLECTION_LINK)
	ln -sfn ../build $@

.PHONY: system-tools
system-tools:
	@missing=""; for t in $(DEBIAN_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# The unit tests (tests/unit) run under ansible-test, each in a fork of its own and on as many
# workers as there are CPUs; plain pytest runs the suite against Consul (tests/consul: the
# double, or the agent FIREAP_TEST_CONSUL_HTTP_ADDR names), the tests of devcluster's tooling
# (tests/devcluster) and the integration tests. The integration tests run two files at a time,
# each file on one worker (its clusters are module fixtures): much of their time is waiting on
# Consul's timers and the nodes' commands, which two files overlap.
test: setup lint typecheck sanity units consul changelog molecule
	$(PY) -m pytest -q -n 2 --dist loadfile -p no:cacheprovider tests/integration

consul: setup
	$(PY) -m pytest -q -n auto -p no:cacheprovider tests/consul tests/devcluster

# mypy reads mypy.ini: which files it checks, and how strictly.
typecheck: setup
	$(VENV)/bin/mypy

# ansible-test sanity and units run offline in the venv, on a copy of the tree under
# build/<command>/ansible_collections/fireap/consul/.
sanity: setup
	tests/ansible-test-offline/run.sh sanity

units: setup
	tests/ansible-test-offline/run.sh units

# ansible-lint reads .ansible-lint (profile production); the venv's bin on PATH lets it find
# ansible-playbook and ansible-galaxy, and the collection link lets playbooks resolve fireap.consul.
lint: setup
	ANSIBLE_COLLECTIONS_PATH="$(CURDIR)/build" PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/ansible-lint

# The fragments and changelogs/changelog.yaml lint clean, and CHANGELOG.md is what
# changelog.yaml generates (regenerated in a scratch copy, compared byte for byte).
changelog: setup
	$(VENV)/bin/antsibull-changelog lint
	$(VENV)/bin/antsibull-changelog lint-changelog-yaml changelogs/changelog.yaml
	@scratch=$$(mktemp -d) && mkdir "$$scratch/changelogs" \
	  && cp changelogs/config.yaml changelogs/changelog.yaml "$$scratch/changelogs/" && cp galaxy.yml "$$scratch/" \
	  && (cd "$$scratch" && $(CURDIR)/$(VENV)/bin/antsibull-changelog generate) \
	  && cmp "$$scratch/CHANGELOG.md" CHANGELOG.md; status=$$?; rm -rf "$$scratch"; \
	  if [ $$status -ne 0 ]; then echo "CHANGELOG.md is not what changelogs/changelog.yaml generates: run antsibull-changelog generate" >&2; fi; \
	  exit $$status

# The fireap_node role on this machine against a one-agent Consul double (extensions/molecule/default);
# HOME inside build/ keeps molecule's working files out of the user's home directory.
molecule: setup
	HOME="$(CURDIR)/build/molecule/home" PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/molecule test

demo: setup
	$(PY) -m devcluster demo --nodes $(NODES) --fanout $(FANOUT) --workdir build/demo $(if $(SWARM),--swarm)

# The standard benchmark set; figures and plots go to build/bench/. As root it includes the
# netns configurations (namespaces, links shaped with tc); otherwise it says it leaves them out.
bench: setup
	$(PY) -m devcluster bench --standard

# Releases on the dev cluster under injected faults; the outcome goes to build/chaos/chaos.json.
chaos: setup
	$(PY) -m devcluster chaos --json build/chaos/chaos.json

clean:
	rm -rf build .pytest_cache
