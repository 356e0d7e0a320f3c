#!/usr/bin/env python3
"""Device-side AWS IoT fleet provisioning, done with AWS's own device SDK.

Drives awsiot.iotidentity (aws-iot-device-sdk-python-v2) against an AWS IoT
Core endpoint -- in this repo, fake-iot-core -- the way AWS's fleet
provisioning samples do:

  1. connect with the claim certificate (mTLS),
  2. CreateKeysAndCertificate (--flow keys) or CreateCertificateFromCsr
     (--flow csr, with an EC P-256 key and CSR made here),
  3. write the issued certificate and private key to --out-dir,
  4. RegisterThing with the certificate ownership token and --param values,
  5. disconnect, then connect again with the issued certificate using the
     new thing's name as client id.

On success prints one JSON line on stdout:
  {"thingName": ..., "certificateId": ..., "deviceConfiguration": {...},
   "reconnected": true, "seconds": <total>, "connectedSeconds": <until
   connected with the issued certificate>, ...}
On any failure (rejected reply, no reply within 30 s, connection failure)
prints what failed on stderr and exits 1. Progress goes to stderr.

Service clients (--service-client): "v1" is iotidentity.IotIdentityClient,
which subscribes to the accepted/rejected topics itself and then publishes
(samples/fleetprovisioning.py); "v2" is iotidentity.IotIdentityClientV2, the
request-response client of the current samples
(samples/fleet_provisioning_basic.py / _csr.py). Default: v1 over MQTT 3.1.1,
v2 over MQTT 5; both work over either protocol.
"""

import argparse
import concurrent.futures
import json
import os
import sys
import time
import traceback
from concurrent.futures import Future

from awscrt import io, mqtt, mqtt5, mqtt_request_response
from awscrt.exceptions import AwsCrtError
import awsiot
from awsiot import iotidentity, mqtt5_client_builder, mqtt_connection_builder
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PROG = "fleet_provision"
TIMEOUT_S = 30.0
# The CRT's TLS (s2n) delays reporting a failed handshake -- e.g. a server
# certificate it does not trust -- by a random 10-30 s ("blinding"); waiting
# a little longer than that for a connect reports the TLS error instead of a
# bare timeout.
CONNECT_TIMEOUT_S = 45.0
# What the SDK's builders put in the TLS ClientHello on port 443 so that AWS
# IoT Core can serve MQTT there; --alpn sends it on any port.
ALPN_MQTT = "x-amzn-mqtt-ca"
# QoS 1, as AWS's samples use for every fleet provisioning topic.
QOS = mqtt.QoS.AT_LEAST_ONCE

_quiet = False


class ProvisioningError(Exception):
    """A step failed; the message names the step and what went wrong."""


def progress(message):
    if not _quiet:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def describe(error):
    """One-line description of an exception coming out of the SDK or CRT."""
    if isinstance(error, awsiot.V2ServiceException):
        if error.modeled_error is not None:
            return "rejected: " + describe_error_response(error.modeled_error)
        if error.inner_error is not None:
            return describe(error.inner_error)
        return error.message
    if isinstance(error, AwsCrtError):
        return f"{error.name}: {error.message}"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def describe_error_response(error):
    """iotidentity.ErrorResponse / V2ErrorResponse as text."""
    if error is None:
        return "reply payload is not valid JSON"
    return (f"statusCode={error.status_code} errorCode={error.error_code!r} "
            f"errorMessage={error.error_message!r}")


def settle(future, result=None, error=None):
    """Completes `future` once; CRT callbacks may fire more than once."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def wait_for(future, what, lost=None, timeout=TIMEOUT_S):
    """Waits for `future`; fails fast, naming `what`, if `lost` completes first
    (the connection dropped) or nothing happens within `timeout`."""
    watched = [future] if lost is None else [future, lost]
    done, _ = concurrent.futures.wait(
        watched, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
    if future in done:
        try:
            return future.result()
        except ProvisioningError:
            raise
        except awsiot.V2ServiceException as e:
            if e.modeled_error is not None:
                raise ProvisioningError(
                    f"{what} rejected: {describe_error_response(e.modeled_error)}") from e
            raise ProvisioningError(f"{what} failed: {describe(e)}") from e
        except Exception as e:
            raise ProvisioningError(f"{what} failed: {describe(e)}") from e
    if lost is not None and lost in done:
        raise ProvisioningError(f"{what} failed: connection lost ({lost.result()})")
    raise ProvisioningError(f"{what} failed: no answer within {timeout:.0f} s")


# --------------------------------------------------------------------------
# Connections


def alpn_tls_context(cert, key, ca):
    """The TLS context the SDK builders make for port 443, for any port.

    The builders add ALPN only when port == 443, and the fake's ALPN
    listener is on a free port, so with --alpn elsewhere we build the same
    context through awscrt's public API."""
    options = io.TlsContextOptions.create_client_with_mtls_from_path(cert, key)
    options.override_default_trust_store_from_path(None, ca)
    options.alpn_list = [ALPN_MQTT]
    return io.ClientTlsContext(options)


class Mqtt3Session:
    """awscrt.mqtt.Connection made by awsiot.mqtt_connection_builder."""

    protocol = "MQTT 3.1.1"

    def __init__(self, args, cert, key, client_id):
        self.label = f"{args.endpoint}:{args.port} as client id {client_id!r}"
        # Set when the connection drops after it was up; every wait watches it
        # so a server-side disconnect (e.g. a policy denial) fails fast.
        self.lost = Future()
        self._started = False
        if args.alpn and args.port != 443:
            self.connection = mqtt.Connection(
                client=mqtt.Client(io.ClientBootstrap.get_or_create_static_default(),
                                   alpn_tls_context(cert, key, args.ca)),
                host_name=args.endpoint,
                port=args.port,
                client_id=client_id,
                clean_session=True,
                on_connection_interrupted=self._on_interrupted)
        else:
            self.connection = mqtt_connection_builder.mtls_from_path(
                endpoint=args.endpoint,
                port=args.port,
                cert_filepath=cert,
                pri_key_filepath=key,
                ca_filepath=args.ca,
                client_id=client_id,
                clean_session=True,
                on_connection_interrupted=self._on_interrupted)

    @property
    def protocol_client(self):
        return self.connection

    def _on_interrupted(self, connection, error, **kwargs):
        settle(self.lost, describe(error))

    def start(self):
        connecting = self.connection.connect()
        try:
            wait_for(connecting, f"connect ({self.protocol}) to {self.label}",
                     timeout=CONNECT_TIMEOUT_S)
        except ProvisioningError:
            # A failed connect leaves nothing to close; a pending one does.
            self._started = not connecting.done()
            raise
        self._started = True

    def stop(self, timeout=TIMEOUT_S):
        if self._started:
            self._started = False
            disconnected = self.connection.disconnect()
            # After a drop the connection is waiting out its reconnect back-off
            # and disconnect() completes only after that; nothing to wait for.
            if not self.lost.done():
                wait_for(disconnected, f"disconnect from {self.label}", timeout=timeout)


class Mqtt5Session:
    """awscrt.mqtt5.Client made by awsiot.mqtt5_client_builder."""

    protocol = "MQTT 5"

    def __init__(self, args, cert, key, client_id):
        self.label = f"{args.endpoint}:{args.port} as client id {client_id!r}"
        self.connected = Future()
        self.lost = Future()
        self.stopped = Future()
        self._started = False
        if args.alpn and args.port != 443:
            self.client = mqtt5.Client(mqtt5.ClientOptions(
                host_name=args.endpoint,
                port=args.port,
                tls_ctx=alpn_tls_context(cert, key, args.ca),
                # What the builder would set, so the CONNECT is the same.
                connect_options=mqtt5.ConnectPacket(
                    client_id=client_id,
                    keep_alive_interval_sec=mqtt5_client_builder.DEFAULT_KEEP_ALIVE,
                    username=""),
                session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
                extended_validation_and_flow_control_options=(
                    mqtt5.ExtendedValidationAndFlowControlOptions.AWS_IOT_CORE_DEFAULTS),
                on_lifecycle_event_connection_success_fn=self._on_success,
                on_lifecycle_event_connection_failure_fn=self._on_failure,
                on_lifecycle_event_disconnection_fn=self._on_disconnection,
                on_lifecycle_event_stopped_fn=self._on_stopped))
        else:
            self.client = mqtt5_client_builder.mtls_from_path(
                endpoint=args.endpoint,
                port=args.port,
                cert_filepath=cert,
                pri_key_filepath=key,
                ca_filepath=args.ca,
                client_id=client_id,
                session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
                on_lifecycle_connection_success=self._on_success,
                on_lifecycle_connection_failure=self._on_failure,
                on_lifecycle_disconnection=self._on_disconnection,
                on_lifecycle_stopped=self._on_stopped)

    @property
    def protocol_client(self):
        return self.client

    def _on_success(self, data):
        settle(self.connected, data.connack_packet)

    def _on_failure(self, data):
        reason = describe(data.exception) if data.exception else "connection failed"
        if data.connack_packet is not None:
            reason += f"; CONNACK reason code {data.connack_packet.reason_code.name}"
            if data.connack_packet.reason_string:
                reason += f" ({data.connack_packet.reason_string})"
        settle(self.connected, error=ProvisioningError(
            f"connect ({self.protocol}) to {self.label} failed: {reason}"))

    def _on_disconnection(self, data):
        reason = describe(data.exception) if data.exception else "disconnected"
        if data.disconnect_packet is not None:
            reason += f"; DISCONNECT reason code {data.disconnect_packet.reason_code.name}"
            if data.disconnect_packet.reason_string:
                reason += f" ({data.disconnect_packet.reason_string})"
        settle(self.lost, reason)

    def _on_stopped(self, data):
        settle(self.stopped, True)

    def start(self):
        self._started = True
        self.client.start()
        wait_for(self.connected, f"connect ({self.protocol}) to {self.label}",
                 timeout=CONNECT_TIMEOUT_S)

    def stop(self, timeout=TIMEOUT_S):
        # Also after a failed connect: a started client retries forever.
        if self._started:
            self._started = False
            # Without a packet, stop() just closes the socket; send a normal
            # DISCONNECT like a well-behaved device (and like MQTT 3 does).
            self.client.stop(mqtt5.DisconnectPacket(
                reason_code=mqtt5.DisconnectReasonCode.NORMAL_DISCONNECTION))
            wait_for(self.stopped, f"disconnect from {self.label}", timeout=timeout)


def open_session(args, cert, key, client_id):
    cls = Mqtt3Session if args.protocol == "mqtt3" else Mqtt5Session
    return cls(args, cert, key, client_id)


def stop_quietly(session):
    """Stops a session on the error path. The first error is the one worth
    reporting, so a failure to disconnect after it is not."""
    try:
        session.stop(timeout=5)
    except Exception:
        pass


# --------------------------------------------------------------------------
# Fleet provisioning service clients


class IdentityV1:
    """iotidentity.IotIdentityClient: subscribe to accepted and rejected,
    wait for both SUBACKs, publish the request, wait for one reply."""

    name = "IotIdentityClient"

    def __init__(self, session):
        self.session = session
        self.client = iotidentity.IotIdentityClient(session.protocol_client)

    def _request(self, api, subscribe_accepted, subscribe_rejected, subscription,
                 publish, request):
        reply = Future()

        def on_accepted(response):
            if response is None:
                settle(reply, error=ProvisioningError(
                    f"{api} failed: accepted reply payload is not valid JSON"))
            else:
                settle(reply, response)

        def on_rejected(error):
            settle(reply, error=ProvisioningError(
                f"{api} rejected: {describe_error_response(error)}"))

        for subscribe, callback in ((subscribe_accepted, on_accepted),
                                    (subscribe_rejected, on_rejected)):
            suback, topic = subscribe(request=subscription, qos=QOS, callback=callback)
            # The reply may only be published once both subscriptions exist.
            granted = wait_for(suback, f"subscribe to {topic}", self.session.lost)
            if granted is None:
                raise ProvisioningError(f"subscribe to {topic} failed: refused by the server")
        wait_for(publish(request=request, qos=QOS), f"publish {api} request",
                 self.session.lost)
        return wait_for(reply, f"{api} reply", self.session.lost)

    def create_keys_and_certificate(self):
        c = self.client
        return self._request(
            "CreateKeysAndCertificate",
            c.subscribe_to_create_keys_and_certificate_accepted,
            c.subscribe_to_create_keys_and_certificate_rejected,
            iotidentity.CreateKeysAndCertificateSubscriptionRequest(),
            c.publish_create_keys_and_certificate,
            iotidentity.CreateKeysAndCertificateRequest())

    def create_certificate_from_csr(self, csr_pem):
        c = self.client
        return self._request(
            "CreateCertificateFromCsr",
            c.subscribe_to_create_certificate_from_csr_accepted,
            c.subscribe_to_create_certificate_from_csr_rejected,
            iotidentity.CreateCertificateFromCsrSubscriptionRequest(),
            c.publish_create_certificate_from_csr,
            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr_pem))

    def register_thing(self, template_name, token, parameters):
        c = self.client
        return self._request(
            "RegisterThing",
            c.subscribe_to_register_thing_accepted,
            c.subscribe_to_register_thing_rejected,
            iotidentity.RegisterThingSubscriptionRequest(template_name=template_name),
            c.publish_register_thing,
            iotidentity.RegisterThingRequest(
                template_name=template_name,
                certificate_ownership_token=token,
                parameters=parameters))


class IdentityV2:
    """iotidentity.IotIdentityClientV2: the SDK's request-response client
    subscribes, publishes and matches the reply by topic on its own."""

    name = "IotIdentityClientV2"

    def __init__(self, session):
        self.session = session
        options = mqtt_request_response.ClientOptions(
            # One request at a time, each needing accepted + rejected.
            max_request_response_subscriptions=2,
            max_streaming_subscriptions=0,
            operation_timeout_in_seconds=int(TIMEOUT_S))
        self.client = iotidentity.IotIdentityClientV2(session.protocol_client, options)

    def _request(self, api, future):
        # A little slack so the SDK's own operation timeout reports first.
        return wait_for(future, api, self.session.lost, timeout=TIMEOUT_S + 2)

    def create_keys_and_certificate(self):
        return self._request(
            "CreateKeysAndCertificate",
            self.client.create_keys_and_certificate(
                iotidentity.CreateKeysAndCertificateRequest()))

    def create_certificate_from_csr(self, csr_pem):
        return self._request(
            "CreateCertificateFromCsr",
            self.client.create_certificate_from_csr(
                iotidentity.CreateCertificateFromCsrRequest(
                    certificate_signing_request=csr_pem)))

    def register_thing(self, template_name, token, parameters):
        return self._request(
            "RegisterThing",
            self.client.register_thing(iotidentity.RegisterThingRequest(
                template_name=template_name,
                certificate_ownership_token=token,
                parameters=parameters)))


# --------------------------------------------------------------------------
# Keys and files


def make_key_and_csr(common_name):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def check_key_matches_certificate(api, certificate_pem, key_pem):
    """The issued certificate must certify the key we will connect with; a
    mismatch would otherwise surface later as an opaque TLS failure."""
    try:
        cert = x509.load_pem_x509_certificate(certificate_pem.encode())
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except ValueError as e:
        raise ProvisioningError(f"{api} reply: cannot parse certificate or key: {e}") from e
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ProvisioningError(
            f"{api} reply: the issued certificate is not for the device's private key")


def write_private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def require_fields(api, response, *names):
    missing = [n for n in names if not getattr(response, n)]
    if missing:
        raise ProvisioningError(f"{api} accepted reply lacks {', '.join(missing)}")


# --------------------------------------------------------------------------


def provision(args):
    started = time.monotonic()
    # The CRT would only say "No such file" without naming the file.
    for flag, path in (("--ca", args.ca), ("--cert", args.cert), ("--key", args.key)):
        if not os.path.isfile(path):
            raise ProvisioningError(f"reading {flag} {path} failed: no such file")
    os.makedirs(args.out_dir, exist_ok=True)
    cert_path = os.path.join(args.out_dir, "device.pem.crt")
    key_path = os.path.join(args.out_dir, "device.private.pem.key")
    identity_cls = {"v1": IdentityV1, "v2": IdentityV2}[args.service_client]

    claim = open_session(args, args.cert, args.key, args.client_id)
    try:
        progress(f"connecting ({claim.protocol}{', ALPN ' + ALPN_MQTT if args.alpn else ''}) "
                 f"to {claim.label} with the claim certificate")
        claim.start()
        identity = identity_cls(claim)

        if args.flow == "keys":
            api = "CreateKeysAndCertificate"
            progress(f"{api} via {identity.name}")
            created = identity.create_keys_and_certificate()
            require_fields(api, created, "certificate_id", "certificate_pem",
                           "private_key", "certificate_ownership_token")
            key_pem = created.private_key
        else:
            api = "CreateCertificateFromCsr"
            key_pem, csr_pem = make_key_and_csr(args.client_id)
            progress(f"{api} via {identity.name}")
            created = identity.create_certificate_from_csr(csr_pem)
            require_fields(api, created, "certificate_id", "certificate_pem",
                           "certificate_ownership_token")
        check_key_matches_certificate(api, created.certificate_pem, key_pem)
        with open(cert_path, "w") as f:
            f.write(created.certificate_pem)
        write_private(key_path, key_pem)
        progress(f"certificate {created.certificate_id} written to {cert_path}")

        progress(f"RegisterThing with template {args.template!r}")
        registered = identity.register_thing(
            args.template, created.certificate_ownership_token, args.params or None)
        require_fields("RegisterThing", registered, "thing_name")

        claim.stop()
    except BaseException:
        stop_quietly(claim)
        raise

    device = open_session(args, cert_path, key_path, registered.thing_name)
    try:
        progress(f"reconnecting to {device.label} with the issued certificate")
        device.start()
        connected = time.monotonic()
        if args.mark_connected:
            print("connected", flush=True)
        device.stop()
    except BaseException:
        stop_quietly(device)
        raise

    return {
        "thingName": registered.thing_name,
        "certificateId": created.certificate_id,
        "deviceConfiguration": registered.device_configuration or {},
        "reconnected": True,
        "seconds": round(time.monotonic() - started, 3),
        # Claim -> connected with the issued certificate, after the imports.
        "connectedSeconds": round(connected - started, 3),
        "certificateFile": os.path.abspath(cert_path),
        "privateKeyFile": os.path.abspath(key_path),
        "protocol": args.protocol,
        "flow": args.flow,
        "serviceClient": identity_cls.name,
    }


def parse_param(text):
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    return name, value


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="fleet_provision.py",
        description="Fleet-provision a device with AWS's IoT device SDK "
                    "(awsiot.iotidentity), then reconnect with the issued certificate.")
    p.add_argument("--endpoint", required=True, help="MQTT host name; also the TLS SNI (e.g. localhost)")
    p.add_argument("--port", required=True, type=int, help="MQTT over TLS port")
    p.add_argument("--ca", required=True, help="PEM root CA that signed the server certificate")
    p.add_argument("--cert", required=True, help="claim certificate (PEM)")
    p.add_argument("--key", required=True, help="claim private key (PEM)")
    p.add_argument("--template", required=True, help="provisioning template name")
    p.add_argument("--flow", required=True, choices=["csr", "keys"],
                   help="csr: CreateCertificateFromCsr with a local EC P-256 key; "
                        "keys: CreateKeysAndCertificate")
    p.add_argument("--protocol", required=True, choices=["mqtt3", "mqtt5"])
    p.add_argument("--client-id", required=True, help="client id for the claim connection")
    p.add_argument("--param", dest="params", action="append", type=parse_param, default=[],
                   metavar="K=V", help="RegisterThing parameter (repeatable)")
    p.add_argument("--out-dir", required=True, help="where the issued certificate and key go")
    p.add_argument("--alpn", action="store_true",
                   help=f"offer ALPN {ALPN_MQTT} in the TLS handshake (as the SDK does on port 443)")
    p.add_argument("--service-client", choices=["v1", "v2"],
                   help="v1: IotIdentityClient, v2: IotIdentityClientV2 "
                        "(default: v1 for mqtt3, v2 for mqtt5)")
    p.add_argument("--crt-log", choices=[l.name.lower() for l in io.LogLevel],
                   help="awscrt log level, logged to stderr")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--mark-connected", action="store_true",
                   help="print a line 'connected' on stdout the moment the connection with "
                        "the issued certificate is up (for timing from outside)")
    args = p.parse_args(argv)
    args.params = dict(args.params)
    if args.service_client is None:
        args.service_client = "v1" if args.protocol == "mqtt3" else "v2"
    return args


def main(argv=None):
    global _quiet
    args = parse_args(argv)
    _quiet = args.quiet
    if args.crt_log:
        io.init_logging(next(l for l in io.LogLevel if l.name.lower() == args.crt_log), "stderr")
    try:
        result = provision(args)
    except ProvisioningError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:
        print(f"{PROG}: error: unexpected {describe(e)}", file=sys.stderr)
        traceback.print_exc()
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
