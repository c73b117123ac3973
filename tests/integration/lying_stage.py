"""The stage process of tests/integration/lying_daemon.py: molinkd.engine.stage, except that while
the file named by ``$MOLINK_TEST_LIE_FILE`` exists it negates the hidden states it receives before
computing its layers, so it returns wrong hidden states (or, as the last stage, wrong tokens) at an
honest speed, on the wire exactly as an honest stage would."""

import os
import sys

from molinkd.engine import stage

_recv = stage.Mailbox.recv_tensor_dict


def _lying_recv(self, src):
    d = _recv(self, src)
    lie = os.environ.get("MOLINK_TEST_LIE_FILE")
    if lie and os.path.exists(lie):
        d = {k: -v for k, v in d.items()}
    return d


stage.Mailbox.recv_tensor_dict = _lying_recv

if __name__ == "__main__":
    sys.exit(stage.main())
