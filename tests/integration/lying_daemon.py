"""A modified daemon, as a hostile operator would run it: it computes its layers honestly but
announces a tempting throughput (1e6 tokens/s) to attract routes.

usage: python -m tests.integration.lying_daemon join ...   (the arguments of ``molinkd join``)
"""

import sys

from molinkd import service

_honest = service.Daemon.record_fields


def _lying(self):
    fields = _honest(self)
    fields["throughput"] = 1e6
    return fields


service.Daemon.record_fields = _lying

if __name__ == "__main__":
    from cli.molinkd import main

    sys.exit(main())
