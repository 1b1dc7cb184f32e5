# SPDX-License-Identifier: MIT
"""Stand-in for the get-pip.py script that ansible-test downloads to bootstrap pip.

ansible-test creates every sanity test's virtual environment without pip and fetches
get-pip.py from a host outside the package registries; this script does the same job
from the standard library's bundled pip, then installs the requested packages from
the configured package index. It accepts get-pip.py's command line.
"""

import subprocess
import sys

GET_PIP_ONLY_OPTIONS = {'--no-setuptools': 'setuptools', '--no-wheel': 'wheel'}


def main():
    """Install pip into the running interpreter, then the packages named on the command line."""
    args = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY_OPTIONS]
    unwanted = [GET_PIP_ONLY_OPTIONS[arg] for arg in sys.argv[1:] if arg in GET_PIP_ONLY_OPTIONS]
    # A child process: ensurepip.bootstrap() would point PIP_CONFIG_FILE at /dev/null in this
    # process and so hide the index and certificate settings from the install below.
    subprocess.run([sys.executable, '-m', 'ensurepip'], check=True)
    pip = [sys.executable, '-m', 'pip']
    subprocess.run(pip + ['install'] + args, check=True)
    if unwanted:
        # ensurepip brings setuptools along; pip skips a named package that is not installed.
        subprocess.run(pip + ['uninstall', '--yes'] + unwanted, check=True)


if __name__ == '__main__':
    main()
