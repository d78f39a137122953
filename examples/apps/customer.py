"""The customer app: the edge-facing service. Answers `customer => <preference's answer>`."""

from __future__ import annotations

import os

from examples.apps.common import base_arguments, call_downstream, serve


def main(argv: list[str] | None = None) -> None:
    parser = base_arguments(__doc__)
    parser.add_argument("--preference-url", default=os.environ.get("PREFERENCE_URL", "http://preference:8080/"),
                        help="where preference lives (env PREFERENCE_URL)")
    args = parser.parse_args(argv)
    serve(lambda path: call_downstream("customer", args.preference_url),
          bind=args.bind, port=args.port, verbose=args.verbose)


if __name__ == "__main__":
    main()
