"""The preference app: the middle hop. Answers `preference => <recommendation's answer>`."""

from __future__ import annotations

import os

from examples.apps.common import base_arguments, call_downstream, propagated_headers, serve


def main(argv: list[str] | None = None) -> None:
    parser = base_arguments(__doc__)
    parser.add_argument("--recommendation-url",
                        default=os.environ.get("RECOMMENDATION_URL", "http://recommendation:8080/"),
                        help="where recommendation lives (env RECOMMENDATION_URL)")
    args = parser.parse_args(argv)
    serve(lambda path, headers: call_downstream("preference", args.recommendation_url, propagated_headers(headers)),
          bind=args.bind, port=args.port, verbose=args.verbose)


if __name__ == "__main__":
    main()
