"""Development certificates: a chain that verifies for loopback, OpenSSH key pairs Flower reads,
private files readable by their owner only, and nothing overwritten."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedtune.deploy.certs import main, make_dev_certificates
from fedtune.errors import ConfigError


def test_the_server_certificate_is_signed_by_the_ca_for_the_names_given(tmp_path):
    made = make_dev_certificates(tmp_path, hosts=["superlink.example.org", "10.0.0.7"])
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}
    assert set(names.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(a)
                                                              for a in ("127.0.0.1", "::1", "10.0.0.7")}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_node_keys_are_p384_openssh_pairs_and_private_files_are_0600(tmp_path):
    made = make_dev_certificates(tmp_path, nodes=["clinic-a", "clinic-b"])
    private, public = made.node_keys["clinic-a"]
    key = load_ssh_private_key(private.read_bytes(), None)  # what flower-supernode does
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()) == key.public_key()  # what `flwr supernode register` reads
    for path in (private, made.server_key, tmp_path / "ca.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(made.ca_cert.stat().st_mode) == 0o644


def test_refuses_to_overwrite_and_checks_names(tmp_path):
    make_dev_certificates(tmp_path)
    before = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(ConfigError, match="Not overwriting"):
        make_dev_certificates(tmp_path)
    assert (tmp_path / "ca.crt").read_bytes() == before
    with pytest.raises(ConfigError, match="Invalid node name"):
        make_dev_certificates(tmp_path / "other", nodes=["../escape"])
    assert not (tmp_path / "other").exists()


def test_command_line(tmp_path, capsys):
    assert main([str(tmp_path / "c"), "--node", "clinic-a", "--host", "link.local"]) == 0
    assert "clinic-a" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "ca.crt", "ca.key", "clinic-a.key", "clinic-a.pub", "server.crt", "server.key"]
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "c")])
    assert exit_.value.code == 2


def test_command_line_words_its_output_for_whoever_runs_it(tmp_path, capsys):
    """An institution runs it without --host for its SuperNode's loopback API (docs/deployment.md,
    institution step 3): it used to be told its key "stays with the coordinator", and not what ca.key is."""
    assert main([str(tmp_path / "runtime-tls")]) == 0
    said = capsys.readouterr().out
    assert "coordinator" not in said and "SuperLink" not in said and "every institution" not in said, said
    assert "stays on this machine" in said and f"{tmp_path / 'runtime-tls' / 'ca.key'}" in said, said
    assert main([str(tmp_path / "coordinator"), "--host", "superlink.example.org"]) == 0
    said = capsys.readouterr().out
    assert "give it to every institution" in said and "stays with the coordinator" in said, said
    assert f"{tmp_path / 'coordinator' / 'ca.key'}" in said and "delete it" in said, said
