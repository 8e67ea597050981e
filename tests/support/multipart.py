"""Reading a `206 multipart/byteranges` answer as a MIME parser does, for tests of range answers."""

from __future__ import annotations

import email.parser
import email.policy

import httpx


def parts_of(response: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Range, body) of each part, in order; fails on a malformed answer."""
    media_type = response.headers["Content-Type"]
    assert media_type.startswith("multipart/byteranges; boundary=")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + media_type.encode() + b"\r\n\r\n" + response.content
    )
    assert message.is_multipart() and not message.defects
    out = []
    for part in message.iter_parts():
        assert part.get_content_type() == "application/octet-stream"
        body = part.get_payload(decode=True)
        assert isinstance(body, bytes)
        out.append((str(part["Content-Range"]), body))
    return out
