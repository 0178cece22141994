"""A tiny authoritative DNS server on loopback that answers SRV queries, for tests and demos.

Real UDP DNS (dnspython builds and parses the packets): the provisioner's SRV lookup
(``provisioner.srv``) is pointed at it with ``broker_srv_nameservers: ["127.0.0.1:PORT"]``.
Names it does not know get NXDOMAIN; known names asked for another type get an empty answer.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Mapping, Sequence

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

__all__ = ["SrvDnsServer"]

#: (priority, weight, port, target)
SrvRecord = tuple[int, int, int, str]


class SrvDnsServer:
    """Answers SRV queries for ``records`` (``{"_mcollective-server._tcp.example.net":
    [(10, 5, 4222, "broker1.example.net")]}``) on 127.0.0.1, UDP."""

    def __init__(self, records: Mapping[str, Sequence[SrvRecord]] | None = None) -> None:
        self.records: dict[str, list[SrvRecord]] = {
            self._key(k): list(v) for k, v in (records or {}).items()
        }
        self.queries: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="srv-dns", daemon=True)

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().rstrip(".")

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as ``broker_srv_nameservers`` takes it."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> SrvDnsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> SrvDnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(self, data: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= 0x0400  # AA: authoritative
        for question in query.question:
            name = self._key(question.name.to_text())
            self.queries.append(name)
            if name not in self.records:
                response.set_rcode(dns.rcode.NXDOMAIN)
                continue
            if question.rdtype != dns.rdatatype.SRV or not self.records[name]:
                continue
            texts = [f"{p} {w} {port} {t.rstrip('.')}." for p, w, port, t in self.records[name]]
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "SRV", *texts))
        return response.to_wire()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self._answer(data)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self._sock.sendto(reply, peer)
