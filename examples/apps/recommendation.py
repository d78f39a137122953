"""The recommendation app: the leaf. Answers `recommendation v1 from '<instance>': <count>`.

Run it twice with different `--version` to have the v1 and v2 the traffic split chooses between.
`GET /misbehave` makes this instance answer 503 from then on and `GET /behave` heals it, as in the
tutorial, for trying retries and outlier detection.
"""

from __future__ import annotations

import os
import socket
import threading
from http import HTTPStatus
from typing import Mapping

from examples.apps.common import base_arguments, serve


class Recommendation:
    """The counter and the misbehave switch of one instance. Requests arrive on several threads."""

    def __init__(self, version: str, instance_id: str) -> None:
        self.version = version
        self.instance_id = instance_id
        self.count = 0
        self.misbehaving = False
        self._lock = threading.Lock()

    def handle(self, path: str, headers: Mapping[str, str]) -> tuple[int, str]:
        if path == "/misbehave":
            self.misbehaving = True
            return HTTPStatus.OK, "Following requests to / will return a 503\n"
        if path == "/behave":
            self.misbehaving = False
            return HTTPStatus.OK, "Following requests to / will return a 200\n"
        if self.misbehaving:
            return HTTPStatus.SERVICE_UNAVAILABLE, f"recommendation misbehavior from '{self.instance_id}'\n"
        with self._lock:
            self.count += 1
            count = self.count
        return HTTPStatus.OK, f"recommendation {self.version} from '{self.instance_id}': {count}\n"


def main(argv: list[str] | None = None) -> None:
    parser = base_arguments(__doc__)
    parser.add_argument("--version", default=os.environ.get("VERSION", "v1"),
                        help="version this instance reports (env VERSION, default v1)")
    parser.add_argument("--instance-id", default=os.environ.get("INSTANCE_ID", socket.gethostname()),
                        help="name this instance reports (env INSTANCE_ID, default the host name)")
    args = parser.parse_args(argv)
    app = Recommendation(args.version, args.instance_id)
    serve(app.handle, bind=args.bind, port=args.port, verbose=args.verbose)


if __name__ == "__main__":
    main()
