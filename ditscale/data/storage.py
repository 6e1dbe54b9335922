"""Local paths and remote URLs (s3://, gs://, oci://, azure://, hf://, …) through streaming's clients.

Remote objects are read with the credentials and endpoint streaming uses (S3: the AWS_* variables or
~/.aws, `S3_ENDPOINT_URL` for an S3-compatible store; GCS: GCS_KEY / GCS_SECRET or the default
credentials). Errors say which: an absent object is a FileNotFoundError; refused credentials, a missing
bucket or an unreachable endpoint are a `RemoteError` naming the URL and the endpoint. `patiently`
retries what may pass (endpoint down, time-outs, 5xx) for a stated time before giving up.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import urllib.parse
from typing import Callable, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

# S3 error codes by what the user must fix.
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "403",
    "AllAccessDisabled",
    "AccountProblem",
}
_NO_BUCKET = {"NoSuchBucket"}
_ABSENT = {"NoSuchKey", "404", "NotFound"}
_TRANSIENT_CODES = {
    "500",
    "502",
    "503",
    "504",
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeTooSkewed",
}


class RemoteError(OSError):
    """A remote object that cannot be read for a reason other than its absence; the message names the URL,
    the endpoint and what to check. `transient` is True where waiting may help (endpoint down, 5xx)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def is_remote(path: str) -> bool:
    """True for a URL with a scheme (s3://bucket/x); False for a plain local path."""
    return urllib.parse.urlparse(str(path)).scheme not in ("", "file")


def local_path(path: str) -> str:
    """A local path with any file:// prefix removed."""
    path = str(path)
    return urllib.parse.urlparse(path).path if path.startswith("file://") else path


def join(root: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and URLs alike."""
    root = str(root)
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)]) if parts else root


def endpoint(url: str) -> str:
    """Who serves `url`: `S3_ENDPOINT_URL` (or "AWS S3") for s3://, the scheme's service otherwise."""
    scheme = urllib.parse.urlparse(str(url)).scheme
    if scheme == "s3":
        return os.environ.get("S3_ENDPOINT_URL") or "AWS S3 (no S3_ENDPOINT_URL set)"
    return f"the {scheme}:// store"


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", "")) or None
    return None


def classify(url: str, exc: BaseException) -> Exception:
    """The error a reader of `url` should raise for `exc` from a storage client: FileNotFoundError for
    an absent object, RemoteError (transient or not) for the rest, each naming URL and endpoint."""
    where = endpoint(url)
    code = _error_code(exc)
    name = type(exc).__name__
    bucket = urllib.parse.urlparse(str(url)).netloc
    if code in _DENIED:
        return RemoteError(
            f"{url}: access denied by {where} ({code}): check the credentials "
            f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws) and the bucket policy"
        )
    if code in _NO_BUCKET:
        return RemoteError(f"{url}: bucket '{bucket}' does not exist at {where}")
    if code in _ABSENT:
        return FileNotFoundError(f"{url}: no such object at {where}")
    if (
        code in _TRANSIENT_CODES
        or name
        in (
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
            "ConnectionClosedError",
            "ProxyConnectionError",
            "ResponseStreamingError",
            "IncompleteReadError",
        )
        or isinstance(exc, (ConnectionError, TimeoutError))
    ):
        return RemoteError(
            f"{url}: cannot reach {where} ({name}: {exc}): is the store up and S3_ENDPOINT_URL right?", transient=True
        )
    if isinstance(exc, FileNotFoundError) or "not found" in str(exc).lower():
        return FileNotFoundError(f"{url}: no such object at {where}")
    return RemoteError(f"{url}: cannot be read from {where} ({name}: {exc})")


def _download(url: str, timeout: float) -> bytes:
    from streaming.base.storage.download import CloudDownloader

    with tempfile.TemporaryDirectory(prefix="ditscale-fetch-") as tmp:
        dest = os.path.join(tmp, "object")
        try:
            CloudDownloader.direct_download(url, dest, timeout)
        except Exception as e:  # each client raises its own kind of error: sort them once, here
            error = classify(url, e)
            if isinstance(error, FileNotFoundError) and _s3_bucket_missing(url):
                error = RemoteError(
                    f"{url}: bucket '{urllib.parse.urlparse(url).netloc}' does not exist at {endpoint(url)}"
                )
            raise error from e
        if not os.path.exists(dest):
            raise FileNotFoundError(f"{url}: no such object at {endpoint(url)}")
        with open(dest, "rb") as f:
            return f.read()


def _s3_client():
    """A boto3 S3 client configured as streaming configures its own (environment, S3_ENDPOINT_URL)."""
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL"))


def _s3_bucket_missing(url: str) -> bool:
    """For an absent s3:// object: whether its whole bucket is missing (a HEAD Object cannot tell)."""
    if urllib.parse.urlparse(url).scheme != "s3":
        return False
    try:
        client = _s3_client()
        client.head_bucket(Bucket=urllib.parse.urlparse(url).netloc)
        return False
    except Exception as e:
        return _error_code(e) in ("404", "NoSuchBucket")


def list_sizes(prefix: str) -> dict[str, int] | None:
    """{url: bytes} of every object under an s3:// prefix (one LIST request per 1,000 objects), for a
    quick check of a remote dataset's shards; None for other schemes (not listed)."""
    parsed = urllib.parse.urlparse(str(prefix))
    if parsed.scheme != "s3":
        return None
    client = _s3_client()
    key = parsed.path.lstrip("/").rstrip("/") + "/"
    out = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=parsed.netloc, Prefix=key):
            for obj in page.get("Contents", []):
                out[f"s3://{parsed.netloc}/{obj['Key']}"] = int(obj["Size"])
    except Exception as e:
        raise classify(str(prefix), e) from e
    return out


def read_bytes(path: str, timeout: float = 60.0) -> bytes:
    """The bytes of a local file or a remote object; FileNotFoundError when it is absent, RemoteError when
    the store refuses or cannot be reached."""
    if not is_remote(path):
        with open(local_path(path), "rb") as f:
            return f.read()
    return _download(str(path), timeout)


def exists(path: str) -> bool:
    """Whether a (small) file or object can be read: used for completion markers. Refused credentials or an
    unreachable store raise RemoteError rather than answer False."""
    try:
        read_bytes(path)
        return True
    except FileNotFoundError:
        return False


def patiently(
    fetch: Callable[[], T],
    what: str,
    patience_s: float,
    *,
    first_wait_s: float = 1.0,
    max_wait_s: float = 30.0,
    say: Callable[[str], None] | None = None,
) -> T:
    """fetch(), retried with exponential back-off while it raises a transient RemoteError, for at most
    `patience_s` seconds from the first failure; then the last RemoteError, saying how long it waited.
    Permanent errors (denied, absent) are raised at once."""
    say = say or log.warning
    deadline, wait = None, first_wait_s
    while True:
        try:
            return fetch()
        except RemoteError as e:
            if not e.transient:
                raise
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + patience_s
            if now >= deadline:
                raise RemoteError(
                    f"{e} (gave up on {what} after waiting {patience_s:.0f} s: data.remote_wait_s)"
                ) from e
            pause = min(wait, max_wait_s, deadline - now)
            say(f"{what}: {e}; retrying in {pause:.0f} s (giving up {deadline - now:.0f} s from now)")
            time.sleep(pause)
            wait *= 2
