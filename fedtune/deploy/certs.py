"""A development CA, a TLS certificate signed by it, and SuperNode key pairs, for trying a
deployment on one machine (`fedtune deploy-local`, or the steps in docs/deployment.md).

    python -m fedtune.deploy.certs DIR [--host NAME ...] [--node NAME ...]

writes DIR/ca.crt (public: whoever connects to the server checks it with this), DIR/ca.key
(private; nothing reads it once the certificate is signed: delete it, or keep it offline),
DIR/server.crt and DIR/server.key (for the names in --host plus localhost, 127.0.0.1 and ::1),
and per --node NAME an EC P-384 key pair in OpenSSH format: DIR/NAME.key (private, stays at the
institution) and DIR/NAME.pub (the coordinator registers it with `flwr supernode register`).
Private files are mode 0600. Two parties run it (docs/deployment.md): the coordinator, with
--host, for its SuperLink (then ca.crt goes to every institution), and an institution, without
--host, for its own SuperNode's loopback runtime API (then nothing leaves its machine).

For production use certificates from your PKI, and let each institution make its own key pair
(`ssh-keygen -t ecdsa -b 384 -N "" -f clinic-a.key`): a private key never leaves its owner.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.durable import write_new_atomic
from fedtune.errors import ConfigError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
LOOPBACK = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 30  # development material should not outlive the experiment
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class DevCertificates:
    """Paths of what `make_dev_certificates` wrote."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, tuple[Path, Path]]  # name -> (private key, public key)


def node_key_paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.key", directory / f"{name}.pub"


def make_dev_certificates(directory: Path, hosts: Sequence[str] = (), nodes: Sequence[str] = (),
                          days: int = VALID_DAYS) -> DevCertificates:
    """Write a CA, a server certificate for `hosts` (and loopback) and one key pair per node.
    Refuses to overwrite any existing file."""
    for name in nodes:
        if not NODE_NAME.match(name):
            raise ConfigError(f"Invalid node name {name!r}: use letters, digits, `.`, `_` and `-` (at most 64).")
    if len(set(nodes)) != len(nodes):
        raise ConfigError("Each node name may appear only once.")
    planned = [directory / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
    planned += [path for name in nodes for path in node_key_paths(directory, name)]
    existing = [str(p) for p in planned if p.exists()]
    if existing:
        raise ConfigError(f"Not overwriting {', '.join(existing)}. Choose an empty directory.")
    directory.mkdir(parents=True, exist_ok=True)

    ca_key, ca_cert = _make_ca(days)
    server_key, server_cert = _make_server_certificate(ca_key, ca_cert, [*LOOPBACK, *hosts], days)
    _write(directory / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(directory / CA_KEY, _pem_private(ca_key), private=True)
    _write(directory / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(directory / SERVER_KEY, _pem_private(server_key), private=True)
    keys = {name: make_node_key_pair(directory, name) for name in nodes}
    return DevCertificates(directory, directory / CA_CERT, directory / SERVER_CERT, directory / SERVER_KEY, keys)


def make_node_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format, as `flower-supernode --auth-supernode-private-key`
    and `flwr supernode register` read them."""
    private_path, public_path = node_key_paths(directory, name)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()), private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(public_path, public + f" {name}\n".encode(), private=False)
    return private_path, public_path


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "fedtune development CA")])
    start = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def _make_server_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                             hosts: Sequence[str], days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # keep order, drop repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    start = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # tolerate small clock skew


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool) -> None:
    write_new_atomic(path, data, 0o600 if private else 0o644)


def _made_lines(made: DevCertificates, hosts: Sequence[str]) -> list[str]:
    """What `main` says it wrote, worded for whoever runs it: with a --host beyond loopback, the
    coordinator making its SuperLink's certificate; without, a server that only this machine reaches
    (an institution's SuperNode runtime API, docs/deployment.md), whose files all stay here."""
    names = ", ".join(dict.fromkeys([*LOOPBACK, *hosts]))
    ca_key = made.directory / CA_KEY
    if any(host not in LOOPBACK for host in hosts):
        lines = [f"CA certificate (public: give it to every institution): {made.ca_cert}",
                 f"SuperLink certificate for {names}: {made.server_cert}; its key (private: it stays with the "
                 f"coordinator): {made.server_key}"]
    else:
        lines = [f"CA certificate (public; this machine's own clients check the server with it, e.g. "
                 f"flower-superexec --root-certificates): {made.ca_cert}",
                 f"Server certificate for {names} only, for a server that only this machine reaches (e.g. a "
                 f"SuperNode's runtime API): {made.server_cert}; its key (private: it stays on this machine): "
                 f"{made.server_key}"]
    return [*lines, f"CA key (private; nothing reads it, it only signed the certificate: delete it, or keep it "
                    f"offline): {ca_key}"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedtune.deploy.certs", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="Where to write the files (created if missing).")
    parser.add_argument("--host", action="append", default=[],
                        help="A DNS name or IP address institutions use to reach the SuperLink (repeatable).")
    parser.add_argument("--node", action="append", default=[], help="Make a key pair for this SuperNode (repeatable).")
    parser.add_argument("--days", type=int, default=VALID_DAYS, help=f"Validity [default: {VALID_DAYS}].")
    args = parser.parse_args(argv)
    try:
        made = make_dev_certificates(args.directory, args.host, args.node, args.days)
    except ConfigError as err:
        parser.exit(2, f"Error: {err}\n")
    for line in _made_lines(made, args.host):
        print(line)
    for name, (private, public) in made.node_keys.items():
        print(f"{name}: private key {private} (stays at the institution), public key {public} (register it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
