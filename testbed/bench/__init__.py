"""``provisioner bench``: how fast we provision, how close that is to the machine's floor.

One run (:func:`run_bench`) does, on 127.0.0.1 inside one work directory:

1. **The floor** (:func:`measure_floor`): the raw NATS request/reply rate between two kinds of
   process on this machine (a tiny responder process per simulator process and one requester
   with many requests in flight, payload sizes like our RPCs), and the CA's raw signing rate
   (``LocalCA.sign_sync`` in a loop, or ``adapter.sign`` against the cfssl/OpenBao server the
   run uses). :func:`floor_model` turns them into the best nodes/minute this machine could do
   for the same number of round trips and signatures per node (``docs/benchmarks.md``).
2. **The run**: the provisioning broker (nats-server with the auth callout; or the static
   go-choria layout for shared simulator connections), the CA, one plain nats-server standing in
   for every overlay's brokers (provisioned nodes restart into it), the provisioner as a
   separate process (``provisioner run --config``) with the reference helper in the chosen mode,
   then ``N`` simulated nodes (:class:`testbed.fleet.Fleet`) in separate processes, from cold
   until every node is provisioned.
3. **The figures**: nodes/minute (cold start to the last node), time-to-provision percentiles
   (first sighting to ``restart`` acknowledged), per-stage latency percentiles (each RPC, the
   helper, from the audit log's stage timings; the provisioner's Prometheus histograms as a
   cross-check), CPU seconds of every process (psutil, sampled) and the provisioner's peak RSS.

It is a measurement, not a test: a slow run is reported, never failed. The result is written
to ``<results_dir>/<YYYY-MM-DD>-<name>.json`` with a markdown table appended as ``markdown``.

``python -m testbed.bench responder URL`` is the floor's responder process (internal).

Modules: :mod:`~testbed.bench.options` (what a run is asked for), :mod:`~testbed.bench.floor`
(the floor), :mod:`~testbed.bench.harness` (the run), :mod:`~testbed.bench.sampler` (CPU and
RSS by process), :mod:`~testbed.bench.stats` and :mod:`~testbed.bench.collect` (the figures),
:mod:`~testbed.bench.results` (the result file and its tables).
"""

from __future__ import annotations

from testbed.bench.floor import floor_model, measure_floor
from testbed.bench.harness import Bench, run_bench
from testbed.bench.options import (
    RPCS_PER_NODE,
    BenchError,
    BenchOptions,
    BenchUsageError,
)
from testbed.bench.results import default_results_dir, render_markdown, write_result
from testbed.bench.stats import histogram_quantiles, parse_prometheus, stage_percentiles

__all__ = [
    "RPCS_PER_NODE",
    "Bench",
    "BenchError",
    "BenchOptions",
    "BenchUsageError",
    "default_results_dir",
    "floor_model",
    "histogram_quantiles",
    "measure_floor",
    "parse_prometheus",
    "render_markdown",
    "run_bench",
    "stage_percentiles",
    "write_result",
]
