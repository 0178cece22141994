"""`provisioner helper` commands: dry-run a helper against a recorded or synthetic input.

`provisioner helper test` runs the helper exactly as the provisioner would (same runner, same
validation) and prints the validated output and what the provisioner would do with it. It
touches no node and no broker; the only side effects are the helper's own (a signing helper
really asks its CA to sign the synthetic CSR).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from rich.console import Console
from rich.table import Table

from choria_core.protocol import identity_problem
from helpers.models import CSRInput, HelperInput, HelperOutput, decision
from provisioner.cli._exit import EXIT_FAILED, EXIT_USAGE
from provisioner.helper_runner import (
    ExecHelper,
    HelperError,
    HelperRunner,
    PersistentHelper,
    PythonHelper,
    helper_environment,
)

app = typer.Typer(help="Helper tools (dry runs).", no_args_is_help=True)

#: The helper failed (crashed, timed out, bad exit code): the operation failed.
EXIT_HELPER_ERROR = EXIT_FAILED
#: The helper answered, but the provisioner would refuse the answer: the helper (or its
#: configuration) needs fixing, which counts as bad configuration.
EXIT_REFUSED = EXIT_USAGE


def synthetic_csr(identity: str, ssldir: str = "/etc/choria/ssl") -> CSRInput:
    """A real CSR (EC P-256, CN = identity) as a node's `gencsr` would return it."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .sign(key, hashes.SHA256())
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return CSRInput(
        csr=csr.public_bytes(serialization.Encoding.PEM).decode(),
        public_key=pub.decode(),
        ssldir=ssldir,
    )


def _load_facts(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
    except (OSError, yaml.YAMLError) as exc:
        raise typer.BadParameter(f"cannot read facts from {path}: {exc}") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path}: facts must be a mapping")
    return data


def _load_input(path: Path) -> HelperInput:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return HelperInput.model_validate(data)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"{path} is not a helper input JSON object: {exc}") from None


def _make_runner(
    helper: str, mode: str, args: list[str], timeout: float, env: dict[str, str]
) -> HelperRunner:
    # The same minimal environment the provisioner gives its helpers (plus --env).
    if mode == "exec":
        return ExecHelper(helper, args=args, timeout=timeout, env=env)
    if mode == "persistent":
        return PersistentHelper(helper, args=args, pool_size=1, timeout=timeout, env=env)
    if mode == "python":
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # `myhelper:decide` from the current directory
        return PythonHelper(helper, timeout=timeout)
    raise typer.BadParameter(f"unknown mode {mode!r} (exec, persistent, python)")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def _run_once(runner: HelperRunner, inp: HelperInput) -> HelperOutput:
    try:
        return await runner.run(inp)
    finally:
        await runner.aclose()


def describe_certificate(out: HelperOutput, inp: HelperInput) -> tuple[str, list[str]]:
    """One-line certificate summary and a list of problems the provisioner would hit."""
    problems: list[str] = []
    try:
        cert = x509.load_pem_x509_certificate(out.certificate.encode())
    except ValueError:
        return "certificate (unparseable PEM)", ["certificate is not a valid PEM certificate"]
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else "(none)"
    summary = (
        f"certificate CN={cn} serial {cert.serial_number:x} "
        f"not-after {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    )
    if cn != inp.identity:
        problems.append(f"certificate CN {cn!r} is not the identity {inp.identity!r}")
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if inp.identity not in sans.get_values_for_type(x509.DNSName):
            problems.append("certificate has no DNS SAN for the identity")
    except x509.ExtensionNotFound:
        problems.append("certificate has no subjectAltName")
    if cert.not_valid_after_utc < datetime.now(UTC):
        problems.append("certificate is already expired")
    if inp.csr is not None and not out.key:
        try:
            csr = x509.load_pem_x509_csr(inp.csr.csr.encode())
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            der = serialization.Encoding.DER
            if csr.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(
                der, spki
            ):
                problems.append("certificate does not carry the public key of the node's CSR")
        except ValueError:
            pass
    if out.ca:
        try:
            cas = x509.load_pem_x509_certificates(out.ca.encode())
            if not any(c.subject == cert.issuer for c in cas):
                problems.append("the ca bundle does not contain the certificate's issuer")
        except ValueError:
            problems.append("ca is not a valid PEM bundle")
    else:
        problems.append("no ca bundle: the node skips TLS setup without certificate, ca, ssldir")
    return summary, problems


def explain(out: HelperOutput, inp: HelperInput) -> tuple[str, list[str], int]:
    """What the provisioner would do: a sentence, problems, and the exit code for the CLI."""
    what = decision(out)
    if what == "defer":
        retry = f" (retry after {out.retry_after:g}s)" if out.retry_after is not None else ""
        return f"would defer: {out.msg or 'no reason given'}{retry}", [], 0
    if what == "shutdown":
        return f"would shut the node down: {out.msg or 'no reason given'}", [], 0
    if what == "upgrade":
        return f"would upgrade the node's server to {out.upgrade} first", [], 0
    if what == "refuse":
        return (
            "would refuse: leaves provisioning enabled (configuration sets "
            "plugin.choria.server.provision to true; it must be false or absent)",
            [],
            EXIT_REFUSED,
        )
    problems: list[str] = []
    parts = [f"would configure node {inp.identity}"]
    if out.overlay:
        parts.append(f"into overlay {out.overlay}")
    parts.append(f"with {len(out.configuration)} settings")
    sentence = " ".join(parts)
    if out.certificate:
        summary, problems = describe_certificate(out, inp)
        sentence += f", {summary}"
    if out.key:
        sentence += ", a private key sent encrypted (ECDH)"
    if out.server_claims is not None:
        sentence += ", a signed server JWT"
    n_pol = len(out.action_policies) + len(out.opa_policies)
    if n_pol:
        sentence += f", {n_pol} policy files"
    sentence += "; would restart"
    return sentence, problems, 0


def _print_output(console: Console, out: HelperOutput) -> None:
    table = Table(title="helper output (validated)", show_lines=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in out.to_json_obj().items():
        if key == "configuration":
            continue
        if key == "key" and value:
            value = f"[private key, {len(value)} bytes, not shown]"
        elif key in ("certificate", "ca") and value:
            value = f"[PEM, {value.count('BEGIN CERTIFICATE')} certificate(s)]"
        elif isinstance(value, dict):
            value = ", ".join(value) if key.endswith("policies") else json.dumps(value)
        table.add_row(key, str(value))
    console.print(table)
    if out.configuration:
        conf = Table(title="configuration", show_lines=False)
        conf.add_column("setting", style="cyan")
        conf.add_column("value")
        for k in sorted(out.configuration):
            conf.add_row(k, out.configuration[k])
        console.print(conf)


@app.command("test")
def test_helper(
    helper: str = typer.Option(
        ..., "--helper", help="helper command (exec/persistent) or module:callable (python)"
    ),
    mode: str = typer.Option("exec", "--mode", help="exec | persistent | python"),
    input_file: Path | None = typer.Option(
        None, "--input", help="a recorded helper input (JSON, as on the helper's stdin)"
    ),
    identity: str | None = typer.Option(None, "--identity", help="synthesize an input for ID"),
    facts: Path | None = typer.Option(
        None, "--facts", help="facts file (JSON/YAML) for --identity"
    ),
    version: str = typer.Option("0.29.4", "--server-version", help="server version to report"),
    ssldir: str = typer.Option("/etc/choria/ssl", "--ssldir", help="ssldir the node reports"),
    no_csr: bool = typer.Option(False, "--no-csr", help="synthesize without a CSR (pki off)"),
    arg: list[str] = typer.Option([], "--arg", help="extra helper argument (repeatable)"),
    env: list[str] = typer.Option(
        [], "--env", help="NAME or NAME=value for the helper's environment, like helper_env"
    ),
    timeout: float = typer.Option(10.0, "--timeout", help="helper timeout in seconds"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON report instead of tables"),
) -> None:
    """Run a helper once, validate its output and say what the provisioner would do."""
    console = Console(stderr=False, soft_wrap=True)
    if input_file is not None and identity is not None:
        raise typer.BadParameter("use either --input or --identity/--facts, not both")
    if input_file is not None:
        inp = _load_input(input_file)
    elif identity is not None:
        if (problem := identity_problem(identity)) is not None:
            raise typer.BadParameter(
                f"not a node identity ({problem}): a DNS name, ≤ 253 characters, labels ≤ 63",
                param_hint="--identity",
            )
        fact_data = _load_facts(facts) if facts is not None else {}
        csr = None if no_csr else synthetic_csr(identity, ssldir)
        inp = HelperInput.synthetic(identity, fact_data, csr=csr, version=version)
    else:
        raise typer.BadParameter("give --input FILE, or --identity ID [--facts FILE]")

    try:
        helper_env = helper_environment(list(env))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--env") from None
    runner = _make_runner(helper, mode, list(arg), timeout, helper_env)
    collect = _Collect()
    runner_log = logging.getLogger("provisioner.helper_runner")
    runner_log.addHandler(collect)
    try:
        out = asyncio.run(_run_once(runner, inp))
    except HelperError as exc:
        if as_json:
            print(json.dumps({"error": {"reason": exc.reason, "message": exc.message}}))
        else:
            console.print(f"[bold red]helper failed ({exc.reason}):[/] {exc.message}")
            if exc.stderr.strip():
                console.print("[dim]stderr (tail):[/]")
                console.print(exc.stderr.strip()[-2000:], markup=False, highlight=False)
            console.print("the provisioner would record the failure and retry the node later")
        raise typer.Exit(EXIT_HELPER_ERROR) from None
    finally:
        runner_log.removeHandler(collect)

    sentence, problems, code = explain(out, inp)
    if as_json:
        obj = out.to_json_obj()
        if obj.get("key"):
            obj["key"] = "[redacted]"
        report = {
            "output": obj,
            "decision": decision(out),
            "summary": sentence,
            "problems": problems,
            "warnings": collect.messages,
        }
        print(json.dumps(report, indent=2))
    else:
        _print_output(console, out)
        for w in collect.messages:
            console.print(f"[yellow]warning:[/] {w}", highlight=False)
        for p in problems:
            console.print(f"[red]problem:[/] {p}", highlight=False)
        style = "red" if code else "green"
        console.print(f"[bold {style}]{sentence}[/]", highlight=False)
    if code:
        raise typer.Exit(code)
