"""Loaded by every Python process the tests start (conftest puts this folder first on PYTHONPATH):
installs the test instrumentation that the test's environment asks for (distlora_test_hooks)."""

import os

if any(k.startswith(("DISTLORA_TEST_", "DISTLORA_FAULT", "DISTLORA_TRACE")) for k in os.environ):
    import distlora_test_hooks

    distlora_test_hooks.install_from_env()
