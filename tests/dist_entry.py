"""``torchrun`` entry point of tests/test_distributed.py: ``python -m common.run`` itself, except that
with ``HTD_TEST_EXIT_AFTER=N`` the rank named by ``HTD_TEST_EXIT_RANK`` (default 1) dies (``os._exit``) on
its ``N+1``-th proxy score, as a crashed or killed worker would, so a test can cut a search at a known point.
"""

from __future__ import annotations

import os
import sys

from common.run.experiment import main
from common.search.proxy import ProxyEvaluator

if "HTD_TEST_EXIT_AFTER" in os.environ and os.environ.get("RANK") == os.environ.get("HTD_TEST_EXIT_RANK", "1"):
    limit, calls, real = int(os.environ["HTD_TEST_EXIT_AFTER"]), [0], ProxyEvaluator.score

    def score(self, plan):
        calls[0] += 1
        if calls[0] > limit:
            os._exit(3)
        return real(self, plan)

    ProxyEvaluator.score = score

if __name__ == "__main__":
    main(sys.argv[1:])
