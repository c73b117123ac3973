"""``molink bench``: measure a swarm of real daemons against a single node on this machine.

- :mod:`molinkd.bench.runner`: the orchestration (daemons, links, measurements, report);
- :mod:`molinkd.bench.load`: the one load generator (streamed completions, per-token timing);
- :mod:`molinkd.bench.wanlink`: a user-space WAN link (delay, rate) between stages;
- :mod:`molinkd.bench.procs`: pinned daemon processes and their cleanup.
"""
