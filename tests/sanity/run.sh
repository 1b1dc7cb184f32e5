#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Run `ansible-test sanity` offline on a copy of the collection laid out as
# build/sanity/ansible_collections/fireap/consul/ (ansible-test resolves the working
# directory, so the build/ansible_collections symlink to the repository does not do).
# Extra arguments go to ansible-test, e.g. `tests/sanity/run.sh --test pylint`.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
python="$repo/.venv/bin/python"
work="$repo/build/sanity"
tree="$work/ansible_collections/fireap/consul"

mkdir -p "$tree"
rsync -a --delete --filter=':- .gitignore' "$repo/" "$tree/"

# ansible-test keeps its sanity virtual environments and its pip bootstrap script under
# ~/.ansible/test; a HOME inside build/ keeps them out of the user's home directory.
export HOME="$work/home"
pip_version=$("$python" -c '
import types
from ansible_test._internal.python_requirements import get_venv_packages
print(get_venv_packages(types.SimpleNamespace(version="3.11"))["pip"])')
cache="$HOME/.ansible/test/cache"
mkdir -p "$cache"
cp "$repo/tests/sanity/bootstrap_pip.py" "$cache/get_pip_${pip_version//./_}.py"

cd "$tree"
exec "$python" "$repo/.venv/bin/ansible-test" sanity --python 3.11 --local --color no "$@"
