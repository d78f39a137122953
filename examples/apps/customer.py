"""The customer app: the edge-facing service. Answers `customer => <preference's answer>`.

Like the tutorial's customer it turns the caller's User-Agent into `baggage-user-agent`, which the
apps behind it pass on, so a VirtualService can route by browser deep in the chain.
"""

from __future__ import annotations

import os
from typing import Mapping

from examples.apps.common import base_arguments, call_downstream, propagated_headers, serve


def downstream_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    headers = propagated_headers(incoming)
    if "user-agent" in incoming:
        headers["baggage-user-agent"] = incoming["user-agent"]
    return headers


def main(argv: list[str] | None = None) -> None:
    parser = base_arguments(__doc__)
    parser.add_argument("--preference-url", default=os.environ.get("PREFERENCE_URL", "http://preference:8080/"),
                        help="where preference lives (env PREFERENCE_URL)")
    args = parser.parse_args(argv)
    serve(lambda path, headers: call_downstream("customer", args.preference_url, downstream_headers(headers)),
          bind=args.bind, port=args.port, verbose=args.verbose)


if __name__ == "__main__":
    main()
