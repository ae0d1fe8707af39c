#!/usr/bin/env bash
# Installs what deploy/tests needs on a fresh machine:
# - Debian's prometheus package (prometheus and promtool), without starting
#   its system service: the tests run the binary on their own port;
# - the Python packages of deploy/tests/requirements.txt into target/py.
# Idempotent; scripts/test runs it before the deploy tests.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "installing prometheus (Debian) for the deploy tests" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  # policy-rc.d answering 101 stops the package from starting its service
  # (invoke-rc.d and deb-systemd-invoke both ask it). One we add, we remove.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 0755 /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

[ -x target/py/bin/python ] || scripts/pyenv
PIP_DISABLE_PIP_VERSION_CHECK=1 target/py/bin/pip install -q -r deploy/tests/requirements.txt
