"""Set-up for the whole suite."""

from __future__ import annotations

import signal


def pytest_configure(config):
    # A shell starts background jobs (``cmd &``) with SIGINT ignored, and an ignored signal
    # stays ignored in every child after exec: the Ctrl-C tests' kenstream processes would
    # never see theirs and finish with exit 0. Handled here, children get the default.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
