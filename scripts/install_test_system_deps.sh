#!/usr/bin/env bash
# The Debian packages the tests need beyond pip: chromium, which the chat page's test drives through Playwright
# (never `playwright install`: that downloads browsers from outside the package registries). Uses sudo when not root;
# does nothing when chromium is already there.
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
    SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
    $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends chromium
fi
