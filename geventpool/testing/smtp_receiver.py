"""A real SMTP server for tests, in a process of its own (aiosmtpd runs on asyncio, which does
not mix with a monkey-patched gevent process).

``python -m geventpool.testing.smtp_receiver --folder DIR [--security starttls|ssl|none]
[--cert C --key K] [--user U --password-file F]`` listens on 127.0.0.1 (a free port), prints
``{"event": "ready", "port": N}`` once it serves, and writes each message it accepts to
``DIR/<n>.json`` (sender, recipients, subject, body, whether TLS and AUTH were used).
"""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import sys
import threading
from email import message_from_bytes
from email.policy import default
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from geventpool.testing.zookeeper import free_port


class Recorder:
    """Writes every accepted message to the folder as JSON."""

    def __init__(self, folder: Path, implicit_tls: bool) -> None:
        self.folder = folder
        self.implicit_tls = implicit_tls  # SMTPS: every session is encrypted from the start
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.original_content or envelope.content, policy=default)
        body = message.get_body(preferencelist=("plain",))
        self.count += 1
        record = {
            "sender": envelope.mail_from,
            "recipients": list(envelope.rcpt_tos),
            "subject": str(message["Subject"]),
            "body": body.get_content() if body is not None else "",
            "tls": self.implicit_tls or session.ssl is not None,
            "authenticated": bool(session.authenticated),
        }
        target = self.folder / f"{self.count:04d}.json"
        target.with_suffix(".tmp").write_text(json.dumps(record))
        target.with_suffix(".tmp").rename(target)
        return "250 OK"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--security", choices=("starttls", "ssl", "none"), default="none")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--user")
    parser.add_argument("--password-file")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)

    context = None
    if args.security != "none":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    password = Path(args.password_file).read_text().strip() if args.password_file else None

    def authenticate(
        server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login.decode() == args.user
            and data.password.decode() == password
        )
        return AuthResult(success=ok, handled=False)

    options: dict[str, Any] = {}
    if args.security == "starttls":
        options.update(tls_context=context, require_starttls=True)
    if args.user:
        options.update(
            authenticator=authenticate,
            auth_required=True,
            auth_require_tls=args.security == "starttls",  # SMTPS is TLS from the start
        )
    controller = Controller(
        Recorder(args.folder, implicit_tls=args.security == "ssl"),
        hostname="127.0.0.1",
        port=free_port(),
        ssl_context=context if args.security == "ssl" else None,
        **options,
    )
    controller.start()
    print(json.dumps({"event": "ready", "port": controller.port}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
