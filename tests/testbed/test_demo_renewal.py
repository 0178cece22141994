"""The demo's renewal watch and settings (testbed/demo/renewal.py), on real certificate files."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from testbed.demo import DemoOptions, DemoUsageError
from testbed.demo.renewal import MARGIN_S, CertificateWatch, bucket_stats, renewal_settings

KEY = ec.generate_private_key(ec.SECP256R1())


def _write_cert(path: Path, serial: int, not_after: datetime) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n.example.net")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(KEY.public_key())
        .serial_number(serial)
        .not_valid_before(datetime.now(UTC) - timedelta(minutes=5))
        .not_valid_after(not_after)
        .sign(KEY, hashes.SHA256())
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def test_bucket_stats() -> None:
    assert bucket_stats([]) == (0, 0.0)
    assert bucket_stats([5.0]) == (1, 1.0)
    # 0..29 s: three buckets of 10 s; 4, 1, 1 renewals
    assert bucket_stats([0, 1, 2, 3, 15, 29]) == (4, 2.0)


def test_settings_end_the_window_before_expiry_with_room_for_the_whole_fleet() -> None:
    for validity in (40.0, 90.0, 3600.0):
        cfg = renewal_settings(validity, 60)
        assert cfg.enabled
        assert (1 - cfg.window_end) * validity >= MARGIN_S - 0.01
        window_s = (cfg.window_end - cfg.window_start) * validity
        assert cfg.rate >= 60 * 60 / window_s  # the fleet fits in the window


def test_options_refuse_a_validity_too_short_to_renew() -> None:
    with pytest.raises(DemoUsageError, match="certificate-validity"):
        DemoOptions(certificate_validity=10).validate()
    DemoOptions(certificate_validity=90, run_for=240).validate()


def test_the_watch_counts_renewals_and_expired_certificates(tmp_path: Path) -> None:
    ids = ["a.example.net", "b.example.net", "c.example.net"]
    watch = CertificateWatch(tmp_path, lambda: ids)
    soon = datetime.now(UTC) + timedelta(hours=1)
    for i, ident in enumerate(ids):
        _write_cert(tmp_path / ident / "ssl" / "certificate.pem", 100 + i, soon)
    watch.look()
    assert watch.summary()["renewals"] == 0
    # a renews twice, b once; c's certificate expires in place
    a_cert = tmp_path / ids[0] / "ssl" / "certificate.pem"
    _write_cert(a_cert, 200, soon)
    _write_cert(tmp_path / ids[1] / "ssl" / "certificate.pem", 201, soon)
    _write_cert(tmp_path / ids[2] / "ssl" / "certificate.pem", 202, datetime.now(UTC))
    watch.look()
    time.sleep(0.01)
    _write_cert(a_cert, 300, soon)
    watch.look()
    s = watch.summary()
    assert s["renewals"] == 4  # c's replacement counts as a renewal too (new serial)
    assert s["renewed_nodes"] == 3
    assert s["expired_certificates"] == 1 and watch.expired == {ids[2]}
    assert s["max_renewals_per_10s"] == 4 and s["mean_renewals_per_10s"] == 4.0
