"""A real S3 API on localhost for the tests: moto's S3 service behind werkzeug, in a thread of the test
process, with a request log and stop/start that keeps the buckets (moto's state lives in the process).

    server = S3Server().start()             # http://127.0.0.1:PORT, buckets survive stop() / start()
    env = server.env()                      # S3_ENDPOINT_URL + AWS_* as users set them for streaming
    server.count("GET", "/bucket/prefix/")  # requests seen since the last reset()
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int


class S3Server:
    REGION = "us-east-1"

    def __init__(self, port: int | None = None, auth: bool = True):
        self.port = port or _free_port()
        self.auth = auth
        self.access_key, self.secret_key = "testing-key", "testing-secret"
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = None
        self._thread: threading.Thread | None = None
        self._app = None
        self._outage: tuple[str, int] | None = None
        self._connections: set[socket.socket] = set()  # open client connections (HTTP/1.1 keep-alive)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.REGION,
        }

    # --- life cycle --------------------------------------------------------------------------------

    def start(self) -> "S3Server":
        from werkzeug.serving import make_server

        if self._app is None:
            from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

            self._app = DomainDispatcherApplication(create_backend_app)
        from moto.moto_server.werkzeug_app import MotoRequestHandler

        connections, lock = self._connections, self._lock

        class Quiet(MotoRequestHandler):
            def setup(self):
                super().setup()
                with lock:
                    connections.add(self.connection)

            def finish(self):
                with lock:
                    connections.discard(self.connection)
                super().finish()

            def log_request(self, *args, **kwargs):
                pass

        self._server = make_server(
            "127.0.0.1", self.port, self._counting(self._app), threaded=True, request_handler=Quiet
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="s3server")
        self._thread.start()
        if self.auth and self.access_key == "testing-key":
            self._require_credentials()
        return self

    def _require_credentials(self) -> None:
        """An IAM user with an access key that may do everything; from then on moto checks signatures,
        so wrong credentials are refused as a real store refuses them."""
        import json

        import boto3
        from moto import settings

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
            region_name=self.REGION,
        )
        iam.create_user(UserName="ditscale-tests")
        policy = iam.create_policy(
            PolicyName="ditscale-tests-all",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
            ),
        )
        iam.attach_user_policy(UserName="ditscale-tests", PolicyArn=policy["Policy"]["Arn"])
        key = iam.create_access_key(UserName="ditscale-tests")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0

    def stop(self) -> None:
        """An outage: new connections are refused, and the ones clients keep alive are reset (else a
        client's pooled connection would go on being served)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            with self._lock:
                alive = list(self._connections)
            for conn in alive:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def running(self) -> bool:
        return self._server is not None

    # --- what clients did ---------------------------------------------------------------------------

    def _counting(self, app):
        def wrapped(environ, start_response):
            seen = {}

            def recording_start(status, headers, exc_info=None):
                seen["status"] = int(status.split()[0])
                return start_response(status, headers, exc_info)

            try:
                return app(environ, recording_start)
            finally:
                with self._lock:
                    self.requests.append(
                        Request(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), seen.get("status", 0))
                    )
                    self._maybe_go_down()

        return wrapped

    def stop_after(self, count: int, path_contains: str) -> None:
        """Stop serving (as a crashed store does: connections refused) right after the `count`-th successful
        GET whose path contains `path_contains`, counted from now: an outage at a known point of a run."""
        with self._lock:
            done = sum(r.method == "GET" and path_contains in r.path and r.status == 200 for r in self.requests)
            self._outage = (path_contains, done + count)

    def _maybe_go_down(self) -> None:
        if self._outage is None:
            return
        needle, at = self._outage
        if sum(r.method == "GET" and needle in r.path and r.status == 200 for r in self.requests) >= at:
            self._outage = None
            threading.Thread(target=self.stop, daemon=True).start()  # not from inside a request

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def count(self, method: str | None = None, prefix: str = "") -> int:
        with self._lock:
            return sum((method is None or r.method == method) and r.path.startswith(prefix) for r in self.requests)

    # --- a client for the tests' own setup ----------------------------------------------------------

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.REGION,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
