"""A loopback SMTP server for backflow-notify's tests, built on aiosmtpd.

    smtp_server.py PORT DIR [--starttls CERT KEY] [--smtps CERT KEY] [--auth USER:PASSWORD]

Listens on 127.0.0.1:PORT until killed. Every accepted message becomes DIR/NNNN.json: the envelope
(sender, recipients), whether it came over TLS, who authenticated, its subject and its decoded text
body, and the raw message. The file is complete before the server answers 250 to the message, so
a client that got its 250 finds it there.

`--starttls` offers STARTTLS and requires it before MAIL; `--smtps` speaks TLS from the first
byte; `--auth` requires AUTH (PLAIN or LOGIN) with these credentials.
"""

import argparse
import email
import email.policy
import itertools
import json
import os
import signal
import ssl
import sys

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Recorder:
    def __init__(self, directory):
        self.directory = directory
        self.counter = itertools.count()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        # A domain that stands for "no such mailbox": the tests' rejected recipient.
        if address.endswith("@rejected.invalid"):
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode()
        message = email.message_from_bytes(raw, policy=email.policy.default)
        body = message.get_body(preferencelist=("plain",))
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "tls": session.ssl is not None,
            "authenticated": bool(session.authenticated),
            "subject": str(message["subject"]),
            "from": str(message["from"]),
            "to": str(message["to"]),
            "content_type": message.get_content_type(),
            "body": body.get_content().replace("\r\n", "\n") if body is not None else None,
            "raw": raw.decode("utf-8", "replace"),
        }
        name = os.path.join(self.directory, "%04d.json" % next(self.counter))
        with open(name + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.rename(name + ".tmp", name)
        return "250 Message accepted for delivery"


def tls_context(cert, key):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("directory")
    parser.add_argument("--starttls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--smtps", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--auth", metavar="USER:PASSWORD")
    args = parser.parse_args()

    kwargs = {}
    if args.starttls:
        kwargs["tls_context"] = tls_context(*args.starttls)
        kwargs["require_starttls"] = True
    ssl_context = tls_context(*args.smtps) if args.smtps else None
    if args.auth:
        user, password = args.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login.decode() == user
                and auth_data.password.decode() == password
            )
            return AuthResult(success=ok)

        kwargs["authenticator"] = authenticator
        kwargs["auth_required"] = True
        # Plain SMTP with --auth (no TLS) is allowed only when asked for explicitly: never here.
        kwargs["auth_require_tls"] = True

    controller = Controller(
        Recorder(args.directory),
        hostname="127.0.0.1",
        port=args.port,
        ssl_context=ssl_context,
        **kwargs,
    )
    controller.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    controller.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(main())
