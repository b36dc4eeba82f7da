"""Loaded by every Python process the tests start (conftest puts this folder first on PYTHONPATH):
installs the test instrumentation that the test's environment asks for (distlora_test_hooks)."""

import os

if any(os.environ.get(k) for k in ("DISTLORA_FAULT", "DISTLORA_TRACE_IDS", "DISTLORA_TEST_GRAD_BYTES",
                                    "DISTLORA_TEST_SKIP_GATHER", "DISTLORA_TEST_COMM")):
    import distlora_test_hooks

    distlora_test_hooks.install_from_env()
