# The project's commands. `make setup` is the shared first step of every other target.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NODES ?= 20
FANOUT ?= 5
DEBIAN_TOOLS := rsync parallel shellcheck
COLLECTION_LINK := build/ansible_collections/fireap/consul

.PHONY: setup test demo bench clean

setup: $(VENV)/.installed $(COLLECTION_LINK) system-tools

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# ansible-test and ansible-playbook find the collection under ansible_collections/<ns>/<name>.
$(COLLECTION_LINK):
	mkdir -p $(dir $@)
	ln -sfn $(CURDIR) $@

.PHONY: system-tools
system-tools:
	@missing=""; for t in $(DEBIAN_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

test: setup lint sanity
	$(PY) -m pytest -q tests/unit tests/integration

# ansible-test sanity on a copy of the tree under build/sanity/ansible_collections/fireap/consul/.
sanity: setup
	tests/sanity/run.sh

# ansible-lint reads .ansible-lint (profile production); the venv's bin on PATH lets it find
# ansible-playbook and ansible-galaxy, and the collection link lets playbooks resolve fireap.consul.
lint: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/ansible-lint

demo: setup
	$(PY) -m devcluster demo --nodes $(NODES) --fanout $(FANOUT) --workdir build/demo

# The standard benchmark set; figures and plots go to build/bench/.
bench: setup
	$(PY) -m devcluster bench --standard

clean:
	rm -rf build .pytest_cache
