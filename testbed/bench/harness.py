"""One benchmark run: the stack, the provisioner process, the fleet, the wait, the figures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from helpers.examples import gobuild
from node_agent.keys import KeyPool
from testbed.bench.collect import Observed, Progress, RunState, build_result
from testbed.bench.floor import measure_floor
from testbed.bench.options import (
    CA_LABELS,
    HELPER_LABELS,
    PROVISIONER_IDENTITY,
    SITE,
    BenchError,
    BenchOptions,
    is_tmpfs_path,
    simulator_dir,
)
from testbed.bench.profile import render_profile
from testbed.bench.results import default_results_dir, render_markdown, write_result
from testbed.bench.sampler import (
    ProcSampler,
    children_matching,
    fork_server_finder,
    pid_finder,
    safe_children,
)
from testbed.bench.stats import audit_timings, count_lines, loadavg, parse_prometheus, sample
from testbed.fleet import Fleet
from testbed.process import ServerNotAvailable, reap_children
from testbed.stack import (
    BrokerSpec,
    CASpec,
    HelperSpec,
    OverlaySpec,
    ProvisionerSpec,
    Stack,
    StackSpec,
)

__all__ = ["Bench", "bench_stack_spec", "run_bench"]

log = logging.getLogger(__name__)

Say = Callable[[str], None]


def bench_stack_spec(o: BenchOptions) -> StackSpec:
    """The stack a run measures: the provisioning broker of ``--broker``, the CA of ``--ca``,
    one plain nats-server standing in for every overlay of the sample registry (capacity raised
    so no node is deferred), the helper of ``--helper``/``--helper-mode``."""
    return StackSpec(
        broker=BrokerSpec(
            kind="isolated" if o.broker_kind() == "callout" else "dev",
            tls=o.tls,
            callout_mode=o.callout_mode,
        ),
        ca=CASpec(kind=o.ca, common_name="Fleet Bench CA"),
        overlays=OverlaySpec(
            registry="sample",
            accounts=False,
            max_connections=o.nodes + 1000,
            min_capacity=o.nodes,
        ),
        helper=HelperSpec(
            kind=o.helper,
            mode=o.helper_mode,
            timeout=60 if o.helper_mode == "exec" else 30,
            pool_size=o.helper_pool_size,
            fork_server=o.helper_fork_server,
        ),
        provisioner=ProvisionerSpec(
            identity=PROVISIONER_IDENTITY,
            site=SITE,
            admin=True,
            concurrency=o.concurrency,
            queue_size=max(200_000, o.nodes * 2),
            rpc_timeout=20,
            loglevel=o.loglevel,
            logfile=True,
        ),
    )


class Bench:
    """Everything one run starts; ``await setup()``, ``await run()``, ``await collect()``, and
    always ``await close()`` (stops what was started, in reverse order; never raises)."""

    def __init__(self, options: BenchOptions) -> None:
        options.validate()
        self.o = options
        self._own_workdir = options.workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="provisioner-bench-"))
            if options.workdir is None
            else Path(options.workdir).absolute()
        )
        self.stack = Stack(bench_stack_spec(options), self.workdir)
        self._closed = False
        self.sim_dir, self._own_sim_dir = simulator_dir(options.sim_dir, self.workdir)
        self.prov_proc: subprocess.Popen[bytes] | None = None
        self.admin_port = 0
        self.fleet: Fleet | None = None
        self.fleet_task: asyncio.Task[None] | None = None
        self.sampler = ProcSampler()
        self.state = RunState()
        self.floor: dict[str, Any] | None = None
        self.profile_out: Path | None = None
        self._http: httpx.AsyncClient | None = None

    # ------------------------------------------------------------------ setup

    async def setup(self, say: Say) -> None:
        o, stack = self.o, self.stack
        self.workdir.mkdir(parents=True, exist_ok=True)
        say(f"work directory {self.workdir}")
        await asyncio.to_thread(stack.make_keys)
        say(f"provisioning broker ({o.broker_kind()})")
        await stack.start_broker()
        say(f"CA ({o.ca})")
        try:
            await stack.start_ca()
        except ServerNotAvailable as exc:
            raise BenchError(f"--ca {o.ca}: {exc}") from None
        if o.floor:
            await self._measure_floor(say)
        say("overlay broker (plain nats-server for provisioned nodes)")
        await stack.start_overlays()
        try:
            await stack.prepare_helper()
        except gobuild.GoBuildError as exc:
            raise BenchError(str(exc)) from None
        if o.key_type == "rsa":
            say("RSA key pool for the simulated nodes (not timed)")
            pool = KeyPool(self.sim_dir / "keypool", "rsa")
            await asyncio.to_thread(pool.ensure, o.nodes)
        say(f"provisioner process ({o.helper_mode} helper)")
        await self._start_provisioner()

    async def _measure_floor(self, say: Say) -> None:
        o = self.o
        say("floor: raw NATS request/reply and raw CA signing")
        self.floor = floor = await measure_floor(
            self.workdir,
            self.stack.ca_section,
            self.workdir / "ca",
            key_type=o.key_type,
            responders=o.sim_processes,
            in_flight=o.concurrency,
            seconds=o.floor_seconds,
        )
        say(
            f"floor: {floor['rpc']['round_trips_per_s']:.0f} round trips/s, "
            f"{floor['sign']['signs_per_s']:.0f} signatures/s "
            f"-> {floor['model']['nodes_per_minute']:.0f} nodes/min"
        )

    def _provisioner_argv(self, config: Path) -> list[str]:
        run = ["-m", "provisioner", "run", "--config", str(config), "--log-format", "json"]
        if self.o.profile == "pyinstrument":
            self.profile_out = self.workdir / "provisioner.pyisession"
            return [sys.executable, "-m", "pyinstrument", "-r", "pyisession", "-o",
                    str(self.profile_out), *run]  # fmt: skip
        if self.o.profile == "cprofile":
            self.profile_out = self.workdir / "provisioner.prof"
            return [sys.executable, "-m", "cProfile", "-o", str(self.profile_out), *run]
        return [sys.executable, *run]

    async def _start_provisioner(self) -> None:
        """``provisioner run --config`` as a separate process, supervised by pid."""
        cfg = self.stack.provisioner_config()
        self.admin_port = cfg.admin.port
        path = self.stack.write_provisioner_config(cfg, self.workdir / "provisioner.yaml")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.stack.helper_env()}
        out = (self.workdir / "provisioner.stderr").open("ab")
        try:
            # Popen returns at once; the process is supervised by pid and polled.
            self.prov_proc = subprocess.Popen(  # noqa: ASYNC220
                self._provisioner_argv(path),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.workdir),
            )
        finally:
            out.close()
        self.stack.push_cleanup("provisioner", self._stop_provisioner)
        self._http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.admin_port}",
            headers={"Authorization": f"Bearer {self.stack.admin_token}"},
            timeout=60,
        )
        self.stack.push_cleanup("http client", self._http.aclose)
        await self._wait_ready(self.prov_proc, self._http)
        proc = psutil.Process(self.prov_proc.pid)
        self.sampler.set_provisioner(proc)
        self.sampler.add_role("provisioner", lambda: [proc] if proc.is_running() else [])
        # Exec helpers are children; the reference helper's fork server is detached (its own
        # session), so it is found by its command line, and the children it reaped count too.
        fork_servers = fork_server_finder(self.stack.helper_config_path)
        self.sampler.add_role(
            "helpers",
            lambda: [c for c in safe_children(proc) if c.is_running()] + fork_servers(),
            reaped=True,
        )

    async def _wait_ready(self, proc: subprocess.Popen[bytes], http: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise BenchError(
                    f"the provisioner exited with code {proc.returncode}: {self._stderr_tail()}"
                )
            with contextlib.suppress(Exception):
                resp = await http.get("/readyz")
                if resp.status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"the provisioner did not become ready: {self._stderr_tail()}")
            await asyncio.sleep(0.1)

    def _stderr_tail(self, lines: int = 15) -> str:
        try:
            text = (self.workdir / "provisioner.stderr").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop_provisioner(self) -> None:
        await self._stop_provisioner()

    async def _stop_provisioner(self) -> None:
        proc = self.prov_proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            # A profiled provisioner writes its profile on the way out: give it time.
            await asyncio.to_thread(proc.wait, 120 if self.o.profile != "none" else 40)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)

    # ------------------------------------------------------------------ run

    async def _scrape(self) -> list[tuple[str, dict[str, str], float]]:
        assert self._http is not None
        resp = await self._http.get("/metrics")
        resp.raise_for_status()
        return parse_prometheus(resp.text)

    def _sample_roles(self) -> None:
        me = psutil.Process()
        stack = self.stack
        self.sampler.add_role("simulator", lambda: children_matching(me, "testbed.fleet"))
        self.sampler.add_role("nats-server", pid_finder(stack.server.pid))
        self.sampler.add_role("overlay-nats", pid_finder(stack.overlay.pid))
        if stack.ca_pid is not None:
            self.sampler.add_role("ca-server", pid_finder(stack.ca_pid))
        if self.o.broker_kind() == "callout" and self.o.callout_mode == "process":
            self.sampler.add_role("callout", lambda: children_matching(me, "broker auth"))
        self.sampler.add_role("bench", lambda: [me])

    async def run(self, say: Say) -> None:
        """Start the fleet and wait until every node is provisioned (or timeout/stall)."""
        o = self.o
        self._sample_roles()
        self.fleet = Fleet(
            o.nodes,
            self.stack.token_path,
            None,
            self.sim_dir,
            seed=o.seed,
            key_type=o.key_type,
            processes=o.sim_processes,
            connections=o.connections,
            key_pool=o.key_type == "rsa",
            restart_delay_scale=o.restart_delay_scale,
        )
        self.stack.push_cleanup("fleet", self._stop_fleet)
        self.sampler.baseline()
        self.sampler.start()
        self.state.t0 = time.time()
        say(f"starting {o.nodes} nodes in {self.fleet.processes} simulator processes")
        self.fleet_task = asyncio.create_task(self._start_fleet(), name="bench-fleet")
        await self._wait_provisioned(self.fleet_task, say)
        self.state.t_end = time.time()
        self.sampler.stop()

    async def _wait_provisioned(self, fleet_task: asyncio.Task[None], say: Say) -> None:
        o, st = self.o, self.state
        deadline = time.monotonic() + o.effective_timeout()
        last_count, last_change = -1, time.monotonic()
        last_say = 0.0
        while True:
            # Once a second: a scrape costs the provisioner ~14 ms of CPU (measured under
            # pyinstrument: /metrics was 2.6% of its samples at two scrapes a second).
            await asyncio.sleep(1.0)
            if fleet_task.done() and fleet_task.exception() is not None:
                raise BenchError(f"the fleet did not start: {fleet_task.exception()}")
            if self.prov_proc is not None and self.prov_proc.poll() is not None:
                st.notes.append(f"provisioner exited early: {self._stderr_tail(5)}")
                return
            try:
                samples = await self._scrape()
            except Exception as exc:
                st.notes.append(f"metrics scrape failed: {type(exc).__name__}: {exc}")
                continue
            provisioned = int(sample(samples, "choria_provisioner_provisioned", site=SITE))
            waiting = int(sample(samples, "choria_provisioner_work_queue_entries", site=SITE))
            in_flight = int(sample(samples, "choria_provisioner_busy_workers", site=SITE))
            now = time.time()
            st.timeline.append(Progress(now - st.t0, provisioned, waiting, in_flight))
            st.peak_waiting = max(st.peak_waiting, waiting)
            if provisioned != last_count:
                last_count, last_change = provisioned, time.monotonic()
            if time.monotonic() - last_say >= 5:
                last_say = time.monotonic()
                say(
                    f"  {now - st.t0:6.1f}s provisioned {provisioned}/{o.nodes} "
                    f"waiting {waiting} in flight {in_flight} load {loadavg()[0]}"
                )
            if provisioned >= o.nodes:
                return
            if time.monotonic() - last_change > o.stall_timeout and fleet_task.done():
                st.stalled = True
                st.notes.append(f"no progress for {o.stall_timeout:.0f}s: stopped waiting")
                return
            if time.monotonic() > deadline:
                st.timed_out = True
                st.notes.append(f"timeout after {o.effective_timeout():.0f}s")
                return

    async def _start_fleet(self) -> None:
        assert self.fleet is not None
        t = time.monotonic()
        await self.fleet.start()
        self.state.fleet_started_s = time.monotonic() - t

    async def stop_fleet(self) -> None:
        await self._stop_fleet()

    async def _stop_fleet(self) -> None:
        if self.fleet_task is not None and not self.fleet_task.done():
            self.fleet_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.fleet_task
        if self.fleet is not None:
            await self.fleet.stop()

    # ------------------------------------------------------------------ collect

    async def _all_nodes(self) -> list[dict[str, Any]]:
        assert self._http is not None
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            resp = await self._http.get("/api/v1/nodes", params={"limit": 20_000, "offset": offset})
            resp.raise_for_status()
            body = resp.json()
            page = body.get("nodes", body) if isinstance(body, dict) else body
            out.extend(page)
            total = int(body.get("total", len(out))) if isinstance(body, dict) else len(out)
            offset += len(page)
            if not page or offset >= total:
                return out

    async def collect(self) -> dict[str, Any]:
        """Everything measured, as the result document (without ``markdown``)."""
        o, st = self.o, self.state
        samples: list[tuple[str, dict[str, str], float]] = []
        nodes: list[dict[str, Any]] = []
        try:
            samples = await self._scrape()
            nodes = await self._all_nodes()
        except Exception as exc:  # e.g. the provisioner died: report what the run saw
            st.notes.append(f"could not read the provisioner's figures: {type(exc).__name__}")
        # Stage timings: from the node records (the admin API); the audit log is the fallback
        # (its scrubber drops a key named "jwt", so it has no jwt stage).
        timings: list[Any] = [
            rec["stage_times"]
            for rec in nodes
            if rec.get("state") == "provisioned" and rec.get("stage_times")
        ]
        source = "node records (admin API)"
        audit = self.stack.audit_path
        if not timings:
            timings = await asyncio.to_thread(audit_timings, audit)
            source = "audit log"
        seen = Observed(
            samples=samples,
            nodes=nodes,
            cpu=self.sampler.cpu_seconds(),
            rss=self.sampler.peak_rss_mb(),
            floor=self.floor or {},
            fleet_counts=self.fleet.counts() if self.fleet is not None else {},
            timings=timings,
            timings_source=source,
            audit_records=await asyncio.to_thread(count_lines, audit),
            setup={
                "broker": o.broker_kind(),
                "ca": CA_LABELS[o.ca],
                "helper": HELPER_LABELS.get(o.helper, f"reference helper, {o.helper_mode} mode")
                + (", fork server" if o.helper_fork_server else ""),
                "callout_mode": o.callout_mode if o.broker_kind() == "callout" else None,
                "simulator_files": "tmpfs" if is_tmpfs_path(self.sim_dir) else "disk",
            },
        )
        return build_result(o, st, seen)

    async def render_profile(self) -> dict[str, str]:
        """After the provisioner stopped: render its profile (text + html), return the paths."""
        return await render_profile(self.o.profile, self.profile_out)

    # ------------------------------------------------------------------ stop

    async def close(self) -> None:
        """Stop everything in reverse start order. Never raises."""
        if self._closed:
            return
        self._closed = True
        self.sampler.stop()
        await self.stack.close(timeout=150)
        await asyncio.to_thread(reap_children, str(self.workdir))
        if self._own_sim_dir and not self.o.keep_workdir:
            await asyncio.to_thread(shutil.rmtree, self.sim_dir, True)
        if self._own_workdir and not self.o.keep_workdir:
            await asyncio.to_thread(shutil.rmtree, self.workdir, True)


async def run_bench(options: BenchOptions, say: Say | None = None) -> tuple[dict[str, Any], Path]:
    """One complete run; returns (result document, file written)."""
    say = say or (lambda _m: None)
    bench = Bench(options)
    load_start = loadavg()
    result: dict[str, Any] | None = None
    on_term = _interrupt_on_sigterm()
    try:
        await bench.setup(say)
        await bench.run(say)
        say("collecting figures")
        result = await bench.collect()
        result["loadavg_start"] = load_start
        result["workdir"] = str(bench.workdir) if options.keep_workdir else None
        if options.profile != "none":
            await bench.stop_fleet()
            await bench.stop_provisioner()
            say("rendering the profile")
            result["profile"] = await bench.render_profile()
    finally:
        try:
            await bench.close()
        finally:
            on_term()
    result["markdown"] = render_markdown(result)
    path = write_result(result, options.results_dir or default_results_dir())
    return result, path


def _interrupt_on_sigterm() -> Callable[[], None]:
    """Treat SIGTERM like Ctrl-C while a run is under way: the run is cancelled and its
    processes (brokers, provisioner, simulator) are stopped and its work directory removed,
    instead of being left running when the bench is killed. Returns the undo."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, os.kill, os.getpid(), signal.SIGINT)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
        return lambda: None

    def undo() -> None:
        loop.remove_signal_handler(signal.SIGTERM)

    return undo
