"""The reference helper's fork server (`--fork-server`) keeps the exec contract.

Real processes and sockets: the clients are `python -m helpers.reference --config FILE
--fork-server` and the light script form (`python -S .../forkserver_client.py --config FILE`),
the server is the real detached process they start. Checked here:

- the same stdout bytes, exit code and error lines as plain exec, for good and bad inputs,
  and the requests really were answered by forked children (the server's count);
- 50 clients arriving at once start exactly one server, and all get their answer;
- a changed configuration gives answers of the new configuration (the old server refuses
  and exits; a new one starts);
- a killed server never fails a request (in-flight children finish, clients fall back);
- the private directory and socket permissions, an unsafe directory is not used, a client of
  another uid is refused (SO_PEERCRED);
- the idle exit, SIGTERM, and a child whose client was killed goes away.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from ca_adapters import LocalCA
from helpers.models import HelperInput
from helpers.reference import example_config_path, forkserver
from helpers.reference import fast as fastmod
from helpers.reference import forkserver_client as client
from node_agent.facts import synthetic_facts, synthetic_identity
from provisioner.cli.helper import synthetic_csr

REPO = Path(__file__).resolve().parents[2]
CLIENT_SCRIPT = str(Path(client.__file__).with_name("forkserver_light.py"))

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ca")
    LocalCA.generate("ec", common_name="Fork Server Test CA").write(d)
    return d


@pytest.fixture
def fork_dir(tmp_path: Path) -> Iterator[str]:
    # Short (a socket path must fit in 108 bytes) and private, as the helper demands.
    d = tempfile.mkdtemp(prefix="rhf-", dir="/tmp")
    yield d
    for pid in server_pids(tmp_path):
        _kill(pid, signal.SIGTERM)
    import shutil

    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def env(tmp_path: Path, fork_dir: str) -> dict[str, str]:
    e = {
        **os.environ,
        fastmod.CACHE_ENV: str(tmp_path / "cache"),
        client.DIR_ENV: fork_dir,
        client.IDLE_ENV: "60",
    }
    for name in ("PROVISIONER_HELPER_MODE", client.WAIT_ENV, client.MAX_ENV):
        e.pop(name, None)
    return e


def write_config(tmp_path: Path, ca_dir: Path, **rules: Any) -> Path:
    cfg = yaml.safe_load(example_config_path().read_text())
    cfg["ca"] = {"type": "local", "cert": str(ca_dir / "ca.pem"), "key": str(ca_dir / "ca-key.pem")}
    cfg["rules"].update(rules)
    path = tmp_path / "reference.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def node_json(i: int, **extra: Any) -> dict[str, Any]:
    ident = synthetic_identity(i)
    inp = HelperInput.synthetic(ident, synthetic_facts(i), csr=synthetic_csr(ident))
    data: dict[str, Any] = json.loads(inp.model_dump_json())
    data.update(extra)
    return data


def plain_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "helpers.reference", "--config", str(cfg)]


def module_cmd(cfg: Path) -> list[str]:
    return [*plain_cmd(cfg), "--fork-server"]


def light_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-S", CLIENT_SCRIPT, "--config", str(cfg)]


def run(cmd: list[str], data: bytes, env: dict[str, str]) -> tuple[int, bytes, bytes]:
    proc = subprocess.run(
        cmd, input=data, capture_output=True, cwd=REPO, env=env, timeout=120, check=False
    )
    return proc.returncode, proc.stdout, proc.stderr


def server_pids(tmp_path: Path) -> list[int]:
    """Live fork servers whose configuration lies under ``tmp_path`` (from /proc)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmd = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            state = Path(entry.path, "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if (
            client.SERVER_FLAG.encode() in cmd
            and any(str(tmp_path).encode() in c for c in cmd)
            and state != b"Z"
        ):
            out.append(int(entry.name))
    return out


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def warm_server(cfg: Path, fork_dir: str, env: dict[str, str]) -> int:
    """Start the server with one request (served in process); its pid once it listens."""
    rc, _, err = run(
        light_cmd(cfg), json.dumps(node_json(0)).encode(), {**env, client.WAIT_ENV: "0"}
    )
    assert rc == 0, err
    pid: int = wait_for(
        lambda: forkserver.server_pid(cfg, fork_dir), what="the fork server to listen"
    )
    return pid


def served_count(cfg: Path, fork_dir: str, given_up: int = 0) -> int:
    """Stop the server; the number of requests its children answered (from its log)."""
    loc = client.Location(fork_dir, str(cfg))
    forkserver.stop_server(cfg, fork_dir)
    found = re.findall(r"\((\d+) served, (\d+) given up\)", Path(loc.log).read_text())
    assert found, Path(loc.log).read_text()
    assert int(found[-1][1]) == given_up
    return int(found[-1][0])


def cert_names(out: bytes) -> tuple[str, list[str]]:
    obj = json.loads(out)
    cert = x509.load_pem_x509_certificate(obj["certificate"].encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return cert.subject.rfc4514_string(), sans.get_values_for_type(x509.DNSName)


# -- the exec contract ------------------------------------------------------------------------


def test_same_bytes_codes_and_errors_as_plain_exec(
    tmp_path: Path, ca_dir: Path, fork_dir: str, env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, ca_dir, shutdown_facts={"role": "backend"})
    warm_server(cfg, fork_dir, env)
    good = next(node_json(i) for i in range(1, 40) if synthetic_facts(i)["role"] != "backend")
    backend = next(node_json(i) for i in range(2, 40) if synthetic_facts(i)["role"] == "backend")
    cases: list[bytes] = [
        json.dumps(backend).encode(),  # a rule: deterministic output
        json.dumps({**good, "csr": None}).encode(),  # placed, no certificate
        b"not json",
        b"[1, 2]",
        b"",
        json.dumps({**good, "identity": 5}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "identity"}).encode(),
        json.dumps({**good, "csr": {"csr": 7}}).encode(),
        json.dumps({**good, "inventory": {"facts": {}}}).encode(),
        json.dumps({**good, "identity": "victim.example.net"}).encode(),
        json.dumps({**good, "csr": {**good["csr"], "csr": "-----BEGIN NOTHING-----"}}).encode(),
    ]
    through_server = 0
    for data in cases:
        want = run(plain_cmd(cfg), data, env)
        for cmd in (light_cmd(cfg), module_cmd(cfg)):
            rc, out, err = run(cmd, data, env)
            through_server += 1
            assert (rc, out, err) == want, data[:80]
    assert any(run(plain_cmd(cfg), d, env)[0] != 0 for d in cases), "cases must include errors"
    # A signed node: the same names and chain (serial and dates are random).
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    data = json.dumps(good).encode()
    rc_p, out_p, _ = run(plain_cmd(cfg), data, env)
    for cmd in (light_cmd(cfg), module_cmd(cfg)):
        rc, out, _ = run(cmd, data, env)
        through_server += 1
        assert rc == rc_p == 0
        assert cert_names(out) == cert_names(out_p)
        cert = x509.load_pem_x509_certificate(json.loads(out)["certificate"].encode())
        cert.verify_directly_issued_by(ca)
        strip = {"certificate"}
        assert {k: v for k, v in json.loads(out).items() if k not in strip} == {
            k: v for k, v in json.loads(out_p).items() if k not in strip
        }
    assert served_count(cfg, fork_dir) == through_server, "requests were not forked"


def test_children_sign_with_fresh_randomness(
    tmp_path: Path, ca_dir: Path, fork_dir: str, env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, ca_dir)
    warm_server(cfg, fork_dir, env)
    serials = set()
    for _ in range(4):
        rc, out, err = run(light_cmd(cfg), json.dumps(node_json(5)).encode(), env)
        assert rc == 0, err
        cert = x509.load_pem_x509_certificate(json.loads(out)["certificate"].encode())
        serials.add(cert.serial_number)
    assert len(serials) == 4
    assert served_count(cfg, fork_dir) == 4


def test_fifty_concurrent_clients_start_one_server(
    tmp_path: Path, ca_dir: Path, fork_dir: str, env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, ca_dir, shutdown_facts={"role": "backend"})
    data = [json.dumps(node_json(i, csr=None)).encode() for i in range(50)]
    want = [run(plain_cmd(cfg), d, env)[1] for d in data[:3]]
    assert not server_pids(tmp_path)
    procs = [
        subprocess.Popen(
            light_cmd(cfg) if i % 2 else module_cmd(cfg),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        for i in range(50)
    ]
    with ThreadPoolExecutor(len(procs)) as pool:  # as the provisioner: every stdin at once
        outs = list(pool.map(lambda p, d: p.communicate(d, timeout=180), procs, data))
    assert all(p.returncode == 0 for p in procs), [o[1][-300:] for o in outs]
    assert [o[0] for o in outs[:3]] == want
    assert all(json.loads(o[0])["configuration"] or json.loads(o[0])["shutdown"] for o in outs)
    pids = wait_for(lambda: server_pids(tmp_path), what="the server")
    time.sleep(0.5)
    assert len(server_pids(tmp_path)) == len(pids) == 1
    log = Path(client.Location(fork_dir, str(cfg)).log).read_text()
    assert log.count(" serving ") == 1 and "another server" not in log, log


def test_config_change_gives_new_answers(
    tmp_path: Path, ca_dir: Path, fork_dir: str, env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, ca_dir)
    old_pid = warm_server(cfg, fork_dir, env)
    i = next(i for i in range(2, 40) if synthetic_facts(i)["role"] == "backend")
    data = json.dumps(node_json(i, csr=None)).encode()
    rc, out, _ = run(light_cmd(cfg), data, env)
    assert rc == 0 and json.loads(out)["shutdown"] is False
    write_config(tmp_path, ca_dir, shutdown_facts={"role": "backend"})
    want = run(plain_cmd(cfg), data, env)
    assert json.loads(want[1])["shutdown"] is True
    assert run(light_cmd(cfg), data, env) == want  # the old server refused: served here
    wait_for(lambda: old_pid not in server_pids(tmp_path), what="the old server to exit")
    assert run(module_cmd(cfg), data, {**env, client.WAIT_ENV: "0"}) == want  # starts one
    new_pid = wait_for(lambda: forkserver.server_pid(cfg, fork_dir), what="a new server")
    assert new_pid != old_pid
    assert run(light_cmd(cfg), data, env) == want
    assert served_count(cfg, fork_dir) == 1


def test_killed_server_never_fails_a_request(
    tmp_path: Path, ca_dir: Path, fork_dir: str, env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, ca_dir)
    pid = warm_server(cfg, fork_dir, env)
    data = [json.dumps(node_json(i)).encode() for i in range(12)]
    procs = [
        subprocess.Popen(
            light_cmd(cfg),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        for _ in data
    ]
    time.sleep(0.05)
    _kill(pid, signal.SIGKILL)  # mid-way: some children run, some clients not yet accepted
    for p, d in zip(procs, data, strict=True):
        out, err = p.communicate(d, timeout=180)
        assert p.returncode == 0, err[-500:]
        assert json.loads(out)["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    # The socket is left behind by the killed server: clients fall back and start a new one.
    rc, out, err = run(module_cmd(cfg), data[0], env)
    assert rc == 0 and json.loads(out)["certificate"], err
    new_pid = wait_for(lambda: forkserver.server_pid(cfg, fork_dir), what="a new server")
    assert new_pid != pid


# -- safety and lifetime ----------------------------------------------------------------------


def test_private_files_and_unsafe_directory(
    tmp_path: Path, ca_dir: Path, fork_dir: str, env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, ca_dir)
    warm_server(cfg, fork_dir, env)
    loc = client.Location(fork_dir, str(cfg))
    assert stat.S_IMODE(os.stat(fork_dir).st_mode) == 0o700
    for path in (loc.socket, loc.lock, loc.log):
        st = os.stat(path)
        assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o600, path
    assert stat.S_ISSOCK(os.stat(loc.socket).st_mode)
    forkserver.stop_server(cfg, fork_dir)
    # A directory others may enter is not used: answers still come, but no server starts.
    loose = tempfile.mkdtemp(prefix="rhl-", dir="/tmp")
    try:
        os.chmod(loose, 0o755)
        rc, out, err = run(light_cmd(cfg), json.dumps(node_json(3)).encode(),
                           {**env, client.DIR_ENV: loose})  # fmt: skip
        assert rc == 0 and json.loads(out)["certificate"], err
        assert os.listdir(loose) == [] and not server_pids(tmp_path)
    finally:
        os.rmdir(loose)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
def test_peer_of_another_uid_is_refused(
    tmp_path: Path, ca_dir: Path, fork_dir: str, env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, ca_dir)
    warm_server(cfg, fork_dir, env)
    loc = client.Location(fork_dir, str(cfg))
    # Open the way on purpose (the permissions are the first line of defence), so the
    # server's own SO_PEERCRED check is what refuses the foreign client.
    os.chmod(fork_dir, 0o711)
    os.chmod(loc.socket, 0o666)
    pid = os.fork()
    if pid == 0:  # a client of another uid (the interpreter lives where nobody can run it)
        code = 4
        try:
            import socket

            os.setgid(65534)
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(20)
            sock.connect(loc.socket)
            code = 3
            try:
                socket.send_fds(sock, [b"\0\0\0\x05"], [0, 1, 2])
                sock.sendall(b"hello")
                code = 0 if sock.recv(64) == b"" else 3
            except ConnectionError:  # closed on us: refused
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the server answered a foreign uid"
    assert "refused a client of uid 65534" in wait_for(
        lambda: "uid 65534" in Path(loc.log).read_text() and Path(loc.log).read_text(),
        what="the refusal in the log",
    )
    os.chmod(fork_dir, 0o700)


def test_idle_exit_and_sigterm(
    tmp_path: Path, ca_dir: Path, fork_dir: str, env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, ca_dir)
    loc = client.Location(fork_dir, str(cfg))
    pid = warm_server(cfg, fork_dir, {**env, client.IDLE_ENV: "1"})
    wait_for(lambda: pid not in server_pids(tmp_path), timeout=20, what="the idle exit")
    assert not os.path.exists(loc.socket)
    log = Path(loc.log).read_text()
    assert "idle for 1s" in log, log
    pid = warm_server(cfg, fork_dir, env)
    _kill(pid, signal.SIGTERM)
    wait_for(lambda: pid not in server_pids(tmp_path), timeout=20, what="exit on SIGTERM")
    assert not os.path.exists(loc.socket)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def test_child_of_a_killed_client_goes_away(
    tmp_path: Path, ca_dir: Path, fork_dir: str, env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, ca_dir)
    pid = warm_server(cfg, fork_dir, env)
    # stdin stays open: the child waits for the rest of the request, as a slow helper would.
    proc = subprocess.Popen(
        light_cmd(cfg), stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env=env
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(b'{"identity": ')
        proc.stdin.flush()
        child = wait_for(lambda: _children(pid), what="the forked child")[0]
        time.sleep(0.2)
        assert proc.poll() is None and os.path.exists(f"/proc/{child}")
        proc.kill()  # the provisioner's helper timeout kills the exec process group
        proc.wait(10)
        wait_for(lambda: child not in _children(pid), timeout=10, what="the child to exit")
    finally:
        proc.kill()
        proc.wait(10)
    assert forkserver.server_pid(cfg, fork_dir) == pid, "the server itself keeps serving"


def test_light_client_imports_no_heavy_module(
    tmp_path: Path, ca_dir: Path, fork_dir: str, env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, ca_dir)
    warm_server(cfg, fork_dir, env)
    runner = (
        "import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write('\\nMODULES ' + ' '.join(sys.modules) + '\\n'))\n"
        "sys.argv = ['helpers.reference', '--config', sys.argv[1], '--fork-server']\n"
        "import runpy\n"
        "runpy.run_module('helpers.reference', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", runner, str(cfg)],
        input=json.dumps(node_json(2)).encode(),
        capture_output=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    mods = set(re.findall(r"^MODULES (.*)$", proc.stderr.decode(), re.M)[-1].split())
    heavy = {"pydantic", "cryptography", "yaml", "helpers.reference.fast", "helpers.models"}
    assert not heavy & mods, heavy & mods
    assert "helpers.reference.forkserver_client" in mods
    assert served_count(cfg, fork_dir) == 1  # the warm-up request was served in process


def test_bounded_children_and_a_safe_give_up(
    tmp_path: Path, ca_dir: Path, fork_dir: str, env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, ca_dir, shutdown_facts={"role": "backend"})
    pid = warm_server(cfg, fork_dir, {**env, client.MAX_ENV: "1"})
    slow = subprocess.Popen(
        light_cmd(cfg),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    try:
        assert slow.stdin is not None
        first = json.dumps(node_json(7, csr=None)).encode()
        slow.stdin.write(first[:10])
        slow.stdin.flush()
        wait_for(lambda: _children(pid), what="the one child")
        # The only slot is taken: this client gives up waiting and answers itself, exactly.
        data = json.dumps(node_json(8, csr=None)).encode()
        start = time.monotonic()
        assert run(light_cmd(cfg), data, {**env, client.WAIT_ENV: "1"}) == run(
            plain_cmd(cfg), data, env
        )
        assert time.monotonic() - start < 60
        assert len(_children(pid)) == 1
        out, err = slow.communicate(first[10:], timeout=60)
        assert slow.returncode == 0, err
        assert out == run(plain_cmd(cfg), first, env)[1]
    finally:
        slow.kill()
        slow.wait(10)
    # The queued connection of the client that gave up gets a child that finds no go-ahead.
    time.sleep(0.5)
    wait_for(lambda: not _children(pid), what="the queued connection's child to end")
    assert served_count(cfg, fork_dir, given_up=1) == 1


# -- the benchmark's view ---------------------------------------------------------------------


def test_bench_counts_the_detached_server_and_its_children(
    tmp_path: Path, ca_dir: Path, fork_dir: str, env: dict[str, str]
) -> None:
    from testbed.bench.sampler import ProcSampler, fork_server_finder

    cfg = write_config(tmp_path, ca_dir)
    pid = warm_server(cfg, fork_dir, env)
    finder = fork_server_finder(cfg)
    assert [p.pid for p in finder()] == [pid]  # found by command line, not as a child
    sampler = ProcSampler()
    sampler.add_role("helpers", finder, reaped=True)
    sampler.add_role("server-alone", finder)
    sampler.baseline()
    for i in range(6):
        rc, _, err = run(light_cmd(cfg), json.dumps(node_json(i)).encode(), env)
        assert rc == 0, err
    wait_for(lambda: not _children(pid), what="the children to be reaped")
    sampler.sample()
    cpu = sampler.cpu_seconds()
    # Six signing children cost far more than the server's own accept/fork work.
    assert cpu["helpers"] > cpu.get("server-alone", 0.0)
    assert cpu["helpers"] >= 0.01
    assert served_count(cfg, fork_dir) == 6


def test_bench_option_needs_the_reference_helper_in_exec_mode() -> None:
    from testbed.bench import BenchOptions, BenchUsageError
    from testbed.bench.collect import options_dict

    with pytest.raises(BenchUsageError, match="--helper-fork-server needs"):
        BenchOptions(helper_mode="persistent", helper_fork_server=True).validate()
    opts = BenchOptions(helper_mode="exec", helper_fork_server=True)
    opts.validate()
    assert options_dict(opts)["helper_fork_server"] is True
    assert opts.default_name() == "1000-exec-fork-local-ec-pernode"
    assert BenchOptions(helper_mode="exec").default_name() == "1000-exec-local-ec-pernode"


@pytest.mark.integration
@pytest.mark.slow
def test_bench_exec_mode_through_the_fork_server(tmp_path: Path) -> None:
    """`provisioner bench --helper-fork-server`: a real run, its labels, and no server left."""
    from testbed.natsserver import INSTALL_HINT
    from tests.support import require_binary

    require_binary("nats-server", INSTALL_HINT)
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "provisioner", "bench", "--nodes", "30", "--json",
         "--helper-mode", "exec", "--helper-fork-server", "--no-floor",
         "--results-dir", str(tmp_path / "results"), "--workdir", str(work)],
        capture_output=True, text=True, timeout=400, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["provisioned"] == 30 and result["failed"] == 0
    assert result["name"] == "30-exec-fork-local-ec-pernode"
    assert result["setup"]["helper"] == "reference helper, exec mode, fork server"
    assert result["options"]["helper_fork_server"] is True
    assert result["cpu_s"]["helpers"] > 0
    config = (work / "helper" / "reference.yaml").read_text()
    assert config and not server_pids(work), "the stack stopped its fork server"
