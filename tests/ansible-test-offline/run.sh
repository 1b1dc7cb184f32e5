#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Run an ansible-test command offline in the project's venv, on a copy of the collection laid
# out as build/<command>/ansible_collections/fireap/consul/ (ansible-test resolves the working
# directory, so the build/ansible_collections symlink to the repository does not do).
# Usage: tests/ansible-test-offline/run.sh sanity|units [ansible-test arguments], e.g.
# `tests/ansible-test-offline/run.sh sanity --test pylint` or
# `tests/ansible-test-offline/run.sh units tests/unit/plugins/modules/`.
set -euo pipefail

if [ $# -lt 1 ] || { [ "$1" != sanity ] && [ "$1" != units ]; }; then
  echo "usage: $0 sanity|units [ansible-test arguments]" >&2
  exit 2
fi
command=$1
shift

repo=$(cd "$(dirname "$0")/../.." && pwd)
python="$repo/.venv/bin/python"
work="$repo/build/$command"
tree="$work/ansible_collections/fireap/consul"

mkdir -p "$tree"
rsync -a --delete --filter=':- .gitignore' "$repo/" "$tree/"
# The copy's own build/ansible_collections link, as `make setup` makes it in the repository
# (the dev cluster's benchmark imports the collection through it).
mkdir -p "$tree/build/ansible_collections/fireap"
ln -sfn ../../.. "$tree/build/ansible_collections/fireap/consul"

# ansible-test keeps its virtual environments and its pip bootstrap script under
# ~/.ansible/test; a HOME inside build/ keeps them out of the user's home directory.
# The sanity tests' virtual environments get pip from get_pip.py (ensurepip + the package
# index) instead of the get-pip.py download ansible-test would otherwise attempt.
export HOME="$work/home"
pip_version=$("$python" -c '
import types
from ansible_test._internal.python_requirements import get_venv_packages
print(get_venv_packages(types.SimpleNamespace(version="3.11"))["pip"])')
cache="$HOME/.ansible/test/cache"
mkdir -p "$cache"
cp "$repo/tests/ansible-test-offline/get_pip.py" "$cache/get_pip_${pip_version//./_}.py"

cd "$tree"
exec "$python" "$repo/.venv/bin/ansible-test" "$command" --python 3.11 --local --color no "$@"
