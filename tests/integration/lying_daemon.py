"""A modified daemon, as a hostile operator would run it: it announces a tempting throughput
(1e6 tokens/s, or ``$MOLINK_TEST_ANNOUNCE``) to attract routes, and its stage process is
tests/integration/lying_stage.py, which computes honestly until the file named by
``$MOLINK_TEST_LIE_FILE`` exists and returns wrong values while it does (a test switches the lie on
only where it wants it).

With ``$MOLINK_TEST_HOLD_FILE`` set it announces its engine as "held" (no head routes through
it) until that file exists: a test can load it alongside other stages and release it later.

usage: python -m tests.integration.lying_daemon join ...   (the arguments of ``molinkd join``)
"""

import os
import sys

from molinkd import service

_honest = service.Daemon.record_fields
ANNOUNCE = float(os.environ.get("MOLINK_TEST_ANNOUNCE", "1e6"))


HOLD = os.environ.get("MOLINK_TEST_HOLD_FILE")


def _lying(self):
    fields = _honest(self)
    fields["throughput"] = ANNOUNCE
    if HOLD and not os.path.exists(HOLD):
        fields["extras"]["engine"] = "held"
    return fields


service.Daemon.record_fields = _lying
service.STAGE_MODULE = "tests.integration.lying_stage"

if __name__ == "__main__":
    from cli.molinkd import main

    sys.exit(main())
