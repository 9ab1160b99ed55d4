"""S3-style presigned URLs for the simulator's upload route (path-style, HMAC-SHA256)."""

from __future__ import annotations

import calendar
import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import quote, urlencode

ALGORITHM = "AWS4-HMAC-SHA256"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class UrlSigner:
    secret: bytes
    public_url: str  # http://HOST:PORT, the storage host as clients reach it

    def _signature(self, method: str, path: str, host: str, date: str, expires: str) -> str:
        canonical = "\n".join((method, path, f"host:{host}", date, expires))
        return hmac.new(self.secret, canonical.encode(), hashlib.sha256).hexdigest()

    def sign(self, bucket: str, key: str, ttl: int, method: str = "PUT") -> str:
        path = f"/{bucket}/{quote(key, safe='/')}"
        host = self.public_url.split("://", 1)[1]
        date = time.strftime(DATE_FORMAT, time.gmtime())
        query = {
            "X-Amz-Algorithm": ALGORITHM,
            "X-Amz-Credential": f"SIMULATOR/{date[:8]}/us-east-1/s3/aws4_request",
            "X-Amz-Date": date,
            "X-Amz-Expires": str(ttl),
            "X-Amz-SignedHeaders": "host",
            "X-Amz-Signature": self._signature(method, path, host, date, str(ttl)),
        }
        return f"{self.public_url}{path}?{urlencode(query)}"

    def verify(
        self, method: str, raw_path: str, host: str, query: dict[str, str], now: float
    ) -> tuple[str, str] | None:
        """None when valid, else an S3 error (code, message)."""
        try:
            date = query["X-Amz-Date"]
            expires = query["X-Amz-Expires"]
            signature = query["X-Amz-Signature"]
        except KeyError as missing:
            return ("AccessDenied", f"Query-string authentication requires {missing.args[0]}")
        expected = self._signature(method, raw_path, host, date, expires)
        if not hmac.compare_digest(expected, signature):
            return (
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        try:
            signed_at = calendar.timegm(time.strptime(date, DATE_FORMAT))
            ttl = int(expires)
        except ValueError:
            return ("AuthorizationQueryParametersError", "X-Amz-Date or X-Amz-Expires is invalid")
        if now > signed_at + ttl:
            return ("AccessDenied", "Request has expired")
        return None
